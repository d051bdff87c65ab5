# make test: every test, unit and end-to-end on a real stack (root, Debian).
# make demo: the main job on one machine, step by step.
GO ?= go
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)

.PHONY: build test unit e2e lint lint-tool demo clean bench

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w -X main.version=$(VERSION)" -o deployer .

test: lint unit e2e

# go test runs a part of vet itself; make lint runs all of it.
unit:
	$(GO) test -race -count=1 ./...

e2e:
	./scripts/install-deps.sh
	$(GO) test -tags e2e -count=1 -run '^TestE2E' -parallel 3 -v -timeout 25m .

# make lint: gofmt, go vet with each build tag, then the linters this
# project keeps (govet's every pass, staticcheck, unused, errcheck,
# errorlint, sloglint, contextcheck, bodyclose, noctx, gosec, ineffassign,
# misspell) as one vet tool, tools/lint: its own module, pinned to the
# analyzers' versions in golangci-lint v2.15.0 and configured as
# .golangci.yml configured them, //nolint:name directives included. It
# builds in a fraction of golangci-lint's time; go vet caches its work per
# package, and the binary in .bin/ is rebuilt only when tools/lint changes.
LINT_TOOL := $(CURDIR)/.bin/deployer-lint

# The tool runs every pass of go vet (a superset of go vet's default
# ones), on every file: the build tags are e2e and bench, and no file is
# excluded by a tag.
lint: lint-tool
	test -z "$$(gofmt -l .)"
	$(GO) vet -vettool=$(LINT_TOOL) -tags e2e,bench ./...

# .ci/run builds it while apt installs the end-to-end suite's packages.
lint-tool:
	$(GO) build -C tools/lint -o $(LINT_TOOL) .

demo:
	./scripts/install-deps.sh
	./scripts/demo.sh

clean:
	rm -f deployer
	rm -rf .bin

# make bench: the benchmarks on the real stack (about 25 minutes with the
# 10-minute idle test; BENCH_IDLE=1m BENCH_RUNS=3 for a quick look;
# BENCH=FanOut for some of them; BENCH=Fleet for the fleet simulation,
# BENCH_FLEET_N=100,300,1000 BENCH_FLEET_ROLLOUTS=100 BENCH_FLEET_IDLE=30s
# by default: N=1000 alone takes the better part of an hour). Prints each table and merges it into
# BENCHMARKS.md (scripts/benchmarks-md.sh bench-results.md BENCHMARKS.md,
# which can also be run by hand): each section of a benchmark that ran
# replaces that benchmark's section, stamped with the date and commit; the
# sections of benchmarks that did not run stay; everything below the marker
# line (hand-written analysis) is kept as it is.
bench:
	./scripts/install-deps.sh
	rm -f bench-results.md
	BENCH_OUT=$(CURDIR)/bench-results.md $(GO) test -tags bench -run '^$$' -bench '$(or $(BENCH),.)' -benchtime 1x -timeout 90m .
	./scripts/benchmarks-md.sh bench-results.md BENCHMARKS.md
	@echo "updated BENCHMARKS.md"
