package etcdc

// tls.go: the TLS of the etcd client: the start-up check, the files
// re-read when they are renewed, the gRPC credentials built from them per
// connection, and the warnings that name a certificate problem.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	grpccredentials "google.golang.org/grpc/credentials"

	"github.com/die-net/deployer/internal/pemfile"
)

// checkTLS makes one HTTPS request (GET /version) to the endpoints in
// turn with the client's TLS configuration, until one answers. A TLS
// failure ends it with ErrTLS; an endpoint that is down is logged and
// skipped. A request, not only a handshake: with TLS 1.3 the server
// rejects a client certificate after the client's handshake is done.
//
//nolint:gosec // G704: the endpoints are the operator's -etcd_nodes
func checkTLS(ctx context.Context, endpoints []string, files *tlsFiles, timeout time.Duration, log *slog.Logger) error {
	for _, ep := range endpoints {
		u, err := url.Parse(ep)
		if err != nil {
			return fmt.Errorf("etcd endpoint %q: %w", ep, err)
		}
		tcfg, err := files.config()
		if err != nil {
			return err
		}
		tcfg.ServerName = u.Hostname()
		tr := &http.Transport{TLSClientConfig: tcfg, DisableKeepAlives: true, Proxy: nil}
		rctx, cancel := context.WithTimeout(ctx, timeout)
		req, _ := http.NewRequestWithContext(rctx, http.MethodGet, strings.TrimRight(ep, "/")+"/version", nil)
		resp, err := (&http.Client{Transport: tr}).Do(req)
		if err == nil {
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
			_ = resp.Body.Close()
		}
		cancel()
		tr.CloseIdleConnections()
		if err == nil {
			return nil
		}
		if terr := classifyTLSError(ep, files, err); terr != nil {
			return terr
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		log.Warn("etcd endpoint not answering; cannot check its TLS yet", "endpoint", ep, "err", err)
	}
	return nil
}

// classifyTLSError turns the failure of a TLS request into an error
// naming the certificate problem, or returns nil for a failure that is
// not about certificates (a refused connection, a timeout).
func classifyTLSError(ep string, files *tlsFiles, err error) error {
	var fileErr *certFileError
	var verr *tls.CertificateVerificationError
	var uerr x509.UnknownAuthorityError
	var herr x509.HostnameError
	var cerr x509.CertificateInvalidError
	var opErr *net.OpError
	switch {
	case errors.As(err, &fileErr):
		return fmt.Errorf("%w: %w", ErrTLS, fileErr)
	case errors.As(err, &verr), errors.As(err, &uerr), errors.As(err, &herr), errors.As(err, &cerr):
		ca := "the system's roots (set -etcd_cacert)"
		if files.caFile != "" {
			ca = "-etcd_cacert " + files.caFile
		}
		return fmt.Errorf("%w: the server certificate of %s is not trusted by %s: %w", ErrTLS, ep, ca, err)
	case errors.As(err, &opErr) && opErr.Op == "remote error":
		// A TLS alert from the server: it refused our certificate.
		if files.certFile == "" {
			return fmt.Errorf("%w: %s requires a client certificate and none was given (set -etcd_cert and -etcd_key): %w", ErrTLS, ep, err)
		}
		return fmt.Errorf("%w: %s refused the client certificate -etcd_cert %s (not signed by a CA it trusts, expired, or not for client auth?): %w", ErrTLS, ep, files.certFile, err)
	case errors.As(err, new(tls.RecordHeaderError)),
		// net/http's own error for a plain HTTP answer (not exported).
		strings.Contains(err.Error(), "server gave HTTP response to HTTPS client"):
		return fmt.Errorf("%w: %s does not speak TLS (use http:// for a plain etcd): %w", ErrTLS, ep, err)
	}
	return nil
}

// certFileError is a certificate or key file that cannot be used.
type certFileError struct {
	flag, path string
	err        error
}

func (e *certFileError) Error() string {
	return fmt.Sprintf("-%s %s: %v", e.flag, e.path, e.err)
}

func (e *certFileError) Unwrap() error { return e.err }

// tlsFiles holds the CA, certificate and key read from files, re-reading
// each when its modification time or size changes (pemfile). A renewal
// that is half written (a new certificate with the old key) keeps the
// previous pair in use until both files agree.
type tlsFiles struct {
	caFile, certFile, keyFile string

	pool *pemfile.CAPool  // nil without caFile
	pair *pemfile.KeyPair // nil without certFile
}

func newTLSFiles(caFile, certFile, keyFile string) *tlsFiles {
	f := &tlsFiles{caFile: caFile, certFile: certFile, keyFile: keyFile}
	if caFile != "" {
		f.pool = pemfile.NewCAPool(caFile)
	}
	if certFile != "" {
		f.pair = pemfile.NewKeyPair(certFile, keyFile, notExpired(certFile))
	}
	return f
}

// notExpired refuses a client certificate that has expired.
func notExpired(certFile string) func(*tls.Certificate) error {
	return func(pair *tls.Certificate) error {
		if pair.Leaf != nil && time.Now().After(pair.Leaf.NotAfter) {
			return &certFileError{"etcd_cert", certFile, fmt.Errorf("expired on %s", pair.Leaf.NotAfter.UTC().Format(time.RFC3339))}
		}
		return nil
	}
}

// check loads every file once, for an error at start.
func (f *tlsFiles) check() error {
	if _, err := f.roots(); err != nil {
		return fmt.Errorf("%w: %w", ErrTLS, err)
	}
	if _, err := f.clientCert(); err != nil {
		return fmt.Errorf("%w: %w", ErrTLS, err)
	}
	return nil
}

// config returns a TLS client configuration with the current files.
func (f *tlsFiles) config() (*tls.Config, error) {
	pool, err := f.roots()
	if err != nil {
		return nil, err
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool}
	if f.certFile != "" {
		c.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return f.clientCert() }
	}
	return c, nil
}

// roots returns the CA pool of caFile, or nil (the system's roots).
func (f *tlsFiles) roots() (*x509.CertPool, error) {
	if f.pool == nil {
		return nil, nil
	}
	pool, err := f.pool.Get()
	if pool != nil {
		return pool, nil
	}
	if se := (*pemfile.StatError)(nil); errors.As(err, &se) {
		err = se.Err
	}
	return nil, &certFileError{"etcd_cacert", f.caFile, err}
}

// clientCert returns the client certificate, re-read when either file
// changed; nil without -etcd_cert (an empty Certificate message).
func (f *tlsFiles) clientCert() (*tls.Certificate, error) {
	if f.pair == nil {
		return &tls.Certificate{}, nil
	}
	pair, _, err := f.pair.Get()
	if pair != nil {
		return pair, nil
	}
	var se *pemfile.StatError
	var fe *certFileError
	switch {
	case errors.As(err, &se) && se.Path == f.certFile:
		return nil, &certFileError{"etcd_cert", f.certFile, se.Err}
	case errors.As(err, &se):
		return nil, &certFileError{"etcd_key", f.keyFile, se.Err}
	case errors.As(err, &fe): // expired
		return nil, err
	}
	return nil, &certFileError{"etcd_cert", f.certFile, fmt.Errorf("with -etcd_key %s: %w", f.keyFile, err)}
}

// reloadingCreds are gRPC transport credentials that build the TLS
// configuration from tlsFiles for every new connection, and log why a
// connection failed on TLS (gRPC itself only reports a timeout).
type reloadingCreds struct {
	files *tlsFiles
	warn  *tlsWarner
}

var _ grpccredentials.TransportCredentials = (*reloadingCreds)(nil)

func (r *reloadingCreds) ClientHandshake(ctx context.Context, authority string, conn net.Conn) (net.Conn, grpccredentials.AuthInfo, error) {
	cfg, err := r.files.config()
	if err != nil {
		r.warn.warn(authority, err)
		return nil, nil, err
	}
	c, info, err := grpccredentials.NewTLS(cfg).ClientHandshake(ctx, authority, conn)
	if err != nil {
		if terr := classifyTLSError(authority, r.files, err); terr != nil {
			r.warn.warn(authority, terr)
		}
		return nil, nil, err
	}
	return &alertConn{Conn: c, authority: authority, creds: r}, info, nil
}

func (r *reloadingCreds) ServerHandshake(net.Conn) (net.Conn, grpccredentials.AuthInfo, error) {
	return nil, nil, errors.New("etcd client credentials cannot serve")
}

func (r *reloadingCreds) Info() grpccredentials.ProtocolInfo {
	return grpccredentials.NewTLS(nil).Info()
}

func (r *reloadingCreds) Clone() grpccredentials.TransportCredentials {
	return &reloadingCreds{files: r.files, warn: r.warn}
}

// OverrideServerName is deprecated in gRPC and unused by it.
func (r *reloadingCreds) OverrideServerName(string) error { return nil }

// alertConn logs a TLS alert from the server: with TLS 1.3 a refused
// client certificate arrives on the first read, after the handshake.
type alertConn struct {
	net.Conn
	authority string
	creds     *reloadingCreds
}

func (c *alertConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	var opErr *net.OpError
	if err != nil && errors.As(err, &opErr) && opErr.Op == "remote error" {
		c.creds.warn.warn(c.authority, classifyTLSError(c.authority, c.creds.files, err))
	}
	return n, err
}

// tlsWarner logs TLS failures, the same one at most every 30 seconds.
type tlsWarner struct {
	log  *slog.Logger
	mu   sync.Mutex
	last string
	at   time.Time
}

func newTLSWarner(log *slog.Logger) *tlsWarner { return &tlsWarner{log: log} }

func (w *tlsWarner) warn(endpoint string, err error) {
	w.mu.Lock()
	msg := err.Error()
	if msg == w.last && time.Since(w.at) < 30*time.Second {
		w.mu.Unlock()
		return
	}
	w.last, w.at = msg, time.Now()
	w.mu.Unlock()
	w.log.Warn("etcd TLS connection failed", "endpoint", endpoint, "err", err)
}
