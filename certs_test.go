package main

import (
	"crypto/x509"
	"testing"
	"time"

	"github.com/die-net/deployer/internal/testca"
)

// testCA is a certificate authority made for one test (internal/testca).
type testCA struct {
	*testca.CA
	pem []byte
}

func newTestCA(tb testing.TB, name string) *testCA {
	ca := testca.New(tb, name)
	return &testCA{CA: ca, pem: ca.PEM}
}

// issue returns the PEM certificate and key of a leaf: a server
// certificate for 127.0.0.1 and localhost, or a client certificate.
func (ca *testCA) issue(tb testing.TB, cn string, server bool, notAfter time.Time) (certPEM, keyPEM []byte) {
	tb.Helper()
	return ca.Issue(tb, cn, server, notAfter)
}

// pool returns a pool trusting only this CA.
func (ca *testCA) pool() *x509.CertPool { return ca.Pool() }

// issueFiles writes a server certificate and its key as dir/name.pem and
// dir/name-key.pem (testca.CA.IssueFiles).
func (ca *testCA) issueFiles(tb testing.TB, dir, name, cn string) (certFile, keyFile string) {
	tb.Helper()
	return ca.IssueFiles(tb, dir, name, cn)
}

// writeFile writes data to dir/name and returns the path.
func writeFile(tb testing.TB, dir, name string, data []byte) string {
	tb.Helper()
	return testca.WriteFile(tb, dir, name, data)
}

// replaceFile writes data to path as a renewal tool does
// (testca.ReplaceFile).
func replaceFile(tb testing.TB, path string, data []byte) {
	tb.Helper()
	testca.ReplaceFile(tb, path, data)
}
