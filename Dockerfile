# Build: docker build -t dienet/deployer .
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY *.go ./
# The infrastructure packages of the binary (internal/etcdc, dockerc, ...).
COPY internal/ ./internal/
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /deployer .

# The final image holds the static binary and CA certificates (for Slack
# and registries over TLS), nothing else. It runs as root, as the original
# did: it needs the Docker socket.
FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/
COPY --from=build /deployer /deployer
ENV HOME=/root
EXPOSE 4500
VOLUME /var/lib/deployer
ENTRYPOINT ["/deployer"]
