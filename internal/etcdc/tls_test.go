package etcdc

import (
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/die-net/deployer/internal/testca"
)

// tlsEnv is a set of certificate files for one test.
type tlsEnv struct {
	dir               string
	ca, otherCA       *testca.CA
	caFile            string
	certFile, keyFile string
}

func newTLSEnv(t *testing.T) *tlsEnv {
	e := &tlsEnv{dir: t.TempDir(), ca: testca.New(t, "etcd CA"), otherCA: testca.New(t, "other CA")}
	e.caFile = testca.WriteFile(t, e.dir, "ca.pem", e.ca.PEM)
	c, k := e.ca.Issue(t, "client-a", false, time.Now().Add(time.Hour))
	e.certFile, e.keyFile = testca.WriteFile(t, e.dir, "client.pem", c), testca.WriteFile(t, e.dir, "client-key.pem", k)
	return e
}

// renew replaces the client certificate with one for cn signed by ca.
func (e *tlsEnv) renew(t *testing.T, ca *testca.CA, cn string) {
	c, k := ca.Issue(t, cn, false, time.Now().Add(time.Hour))
	testca.ReplaceFile(t, e.certFile, c)
	testca.ReplaceFile(t, e.keyFile, k)
}

func TestTLSFilesReload(t *testing.T) {
	e := newTLSEnv(t)
	var mu sync.Mutex
	var seen []string
	ts := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.TLS.PeerCertificates[0].Subject.CommonName)
		mu.Unlock()
	}))
	ts.TLS = e.ca.ServerTLS(t, e.ca)
	ts.StartTLS()
	defer ts.Close()

	files := newTLSFiles(e.caFile, e.certFile, e.keyFile)
	get := func() error {
		cfg, err := files.config()
		if err != nil {
			return err
		}
		tr := &http.Transport{TLSClientConfig: cfg, DisableKeepAlives: true}
		resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Get(ts.URL)
		if err != nil {
			return err
		}
		return resp.Body.Close()
	}
	last := func() string {
		mu.Lock()
		defer mu.Unlock()
		if len(seen) == 0 {
			return ""
		}
		return seen[len(seen)-1]
	}
	if err := get(); err != nil || last() != "client-a" {
		t.Fatalf("first connection: %v, client %q; want client-a", err, last())
	}
	e.renew(t, e.ca, "client-b")
	if err := get(); err != nil || last() != "client-b" {
		t.Fatalf("after renewal: %v, client %q; want the renewed client-b", err, last())
	}
	// A renewal half written (a new certificate, the old key) keeps the
	// previous pair until the key follows.
	c, k := e.ca.Issue(t, "client-c", false, time.Now().Add(time.Hour))
	testca.ReplaceFile(t, e.certFile, c)
	if err := get(); err != nil || last() != "client-b" {
		t.Fatalf("half-written renewal: %v, client %q; want client-b kept", err, last())
	}
	testca.ReplaceFile(t, e.keyFile, k)
	if err := get(); err != nil || last() != "client-c" {
		t.Fatalf("completed renewal: %v, client %q; want client-c", err, last())
	}
	// The CA file is re-read too: a server moved to another CA is trusted
	// once -etcd_cacert says so.
	ts2 := httptest.NewUnstartedServer(http.NotFoundHandler())
	ts2.TLS = e.otherCA.ServerTLS(t, nil)
	ts2.StartTLS()
	defer ts2.Close()
	get2 := func() error {
		cfg, err := files.config()
		if err != nil {
			return err
		}
		resp, err := (&http.Client{Transport: &http.Transport{TLSClientConfig: cfg}, Timeout: 5 * time.Second}).Get(ts2.URL)
		if err == nil {
			resp.Body.Close()
		}
		return err
	}
	if err := get2(); err == nil {
		t.Fatal("a server of another CA was trusted")
	}
	testca.ReplaceFile(t, e.caFile, append(append([]byte{}, e.ca.PEM...), e.otherCA.PEM...))
	if err := get2(); err != nil {
		t.Fatalf("after adding the CA to -etcd_cacert: %v", err)
	}
}

// TestEtcdTLSErrors: each certificate problem ends New at once
// with an error naming it, instead of a gRPC timeout.
func TestEtcdTLSErrors(t *testing.T) {
	e := newTLSEnv(t)
	ts := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `{"etcdserver":"3.4.23","etcdcluster":"3.4.0"}`)
	}))
	ts.TLS = e.ca.ServerTLS(t, e.ca)
	ts.StartTLS()
	defer ts.Close()
	plain := httptest.NewServer(http.NotFoundHandler())
	defer plain.Close()
	tls12 := httptest.NewUnstartedServer(http.NotFoundHandler())
	tls12.TLS = e.ca.ServerTLS(t, e.ca)
	tls12.TLS.MaxVersion = tls.VersionTLS12
	tls12.StartTLS()
	defer tls12.Close()
	closed := strings.Replace(freeURL(t), "http://", "https://", 1)

	otherCert, otherKey := e.otherCA.Issue(t, "intruder", false, time.Now().Add(time.Hour))
	expCert, expKey := e.ca.Issue(t, "old", false, time.Now().Add(-time.Minute))
	_, strayKey := e.ca.Issue(t, "stray", false, time.Now().Add(time.Hour))
	otherCAFile := testca.WriteFile(t, e.dir, "other-ca.pem", e.otherCA.PEM)
	files := func(c, k []byte) (string, string) {
		d := t.TempDir()
		return testca.WriteFile(t, d, "c.pem", c), testca.WriteFile(t, d, "k.pem", k)
	}
	oc, ok := files(otherCert, otherKey)
	ec, ek := files(expCert, expKey)
	goodCert, _ := files(mustRead(t, e.certFile), nil)
	_, sk := files(nil, strayKey)

	tests := []struct {
		name          string
		endpoint      string
		ca, cert, key string
		wantErr       string // "" for a client
	}{
		{"good", ts.URL, e.caFile, e.certFile, e.keyFile, ""},
		{"good over TLS 1.2", tls12.URL, e.caFile, e.certFile, e.keyFile, ""},
		{"endpoint down is not a certificate problem", closed, e.caFile, e.certFile, e.keyFile, ""},
		{"no client certificate", ts.URL, e.caFile, "", "", "requires a client certificate and none was given"},
		{"no client certificate, TLS 1.2", tls12.URL, e.caFile, "", "", "requires a client certificate and none was given"},
		{"client certificate of another CA", ts.URL, e.caFile, oc, ok, "refused the client certificate -etcd_cert " + oc},
		{"expired client certificate", ts.URL, e.caFile, ec, ek, "-etcd_cert " + ec + ": expired"},
		{"missing certificate file", ts.URL, e.caFile, filepath.Join(e.dir, "nope.pem"), e.keyFile, "-etcd_cert " + filepath.Join(e.dir, "nope.pem")},
		{"key of another certificate", ts.URL, e.caFile, goodCert, sk, "private key does not match"},
		{"missing CA file", ts.URL, filepath.Join(e.dir, "nope-ca.pem"), e.certFile, e.keyFile, "-etcd_cacert"},
		{"server of another CA", ts.URL, otherCAFile, e.certFile, e.keyFile, "is not trusted by -etcd_cacert " + otherCAFile},
		{"server without TLS", strings.Replace(plain.URL, "http://", "https://", 1), e.caFile, e.certFile, e.keyFile, "does not speak TLS"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts := Options{Endpoints: []string{tt.endpoint}, DialTimeout: 2 * time.Second, CACert: tt.ca, Cert: tt.cert, Key: tt.key}
			start := time.Now()
			cli, err := New(t.Context(), opts, slog.New(slog.DiscardHandler))
			if cli != nil {
				cli.Close()
			}
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("New = %v; want a client", err)
				}
				return
			}
			if !errors.Is(err, ErrTLS) || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("New = %v; want ErrTLS naming %q", err, tt.wantErr)
			}
			if d := time.Since(start); d > time.Second {
				t.Errorf("took %s; want the error at once, not after a timeout", d)
			}
		})
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// freeURL returns a loopback URL with a port that was free a moment ago.
func freeURL(tb testing.TB) string {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	return "http://" + ln.Addr().String()
}
