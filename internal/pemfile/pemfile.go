// Package pemfile holds a key pair and a CA pool read from PEM files and
// read again when their files change (a renewal), without a restart.
//
// A version of a file is its size and modification time. A read that
// fails (a file missing, a renewal caught half written: a new certificate
// with the old key) leaves the previous value in use, and is tried again
// once the files change again.
package pemfile

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"os"
	"sync"
	"time"
)

// stamp identifies one version of a file.
type stamp struct {
	mod  time.Time
	size int64
}

// A StatError is a file that cannot be looked at (os.Stat failed): no read
// was tried.
type StatError struct {
	Path string
	Err  error
}

func (e *StatError) Error() string { return e.Err.Error() }

func (e *StatError) Unwrap() error { return e.Err }

func stampOf(path string) (stamp, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return stamp{}, &StatError{Path: path, Err: err}
	}
	return stamp{fi.ModTime(), fi.Size()}, nil
}

// KeyPair is a certificate and its key, read from two PEM files (which may
// be one), and read again when either changes.
type KeyPair struct {
	certFile, keyFile string
	check             func(*tls.Certificate) error

	mu     sync.Mutex
	stamp  [2]stamp
	pair   *tls.Certificate
	failed [2]stamp // the version whose read failed with err
	err    error
}

// NewKeyPair returns the key pair of certFile and keyFile; it reads
// nothing yet. A pair check refuses (an expired one, say) is a failed
// read; check may be nil.
func NewKeyPair(certFile, keyFile string, check func(*tls.Certificate) error) *KeyPair {
	return &KeyPair{certFile: certFile, keyFile: keyFile, check: check}
}

// Get returns the pair, read again when either file changed since the
// last read. When that read fails, it returns the previous pair (nil
// before the first) with the error, until the files change again; a
// *StatError when a file cannot be looked at. changed reports a read by
// this call, successful or not.
func (k *KeyPair) Get() (pair *tls.Certificate, changed bool, err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	cs, err := stampOf(k.certFile)
	if err != nil {
		return k.pair, false, err
	}
	ks, err := stampOf(k.keyFile)
	if err != nil {
		return k.pair, false, err
	}
	st := [2]stamp{cs, ks}
	switch {
	case k.pair != nil && st == k.stamp:
		return k.pair, false, nil
	case k.err != nil && st == k.failed:
		return k.pair, false, k.err
	}
	p, err := tls.LoadX509KeyPair(k.certFile, k.keyFile)
	if err == nil && k.check != nil {
		err = k.check(&p)
	}
	if err != nil {
		k.failed, k.err = st, err
		return k.pair, true, err
	}
	k.pair, k.stamp, k.err = &p, st, nil
	return k.pair, true, nil
}

// ErrNoCertificate is a CA file without a PEM certificate in it.
var ErrNoCertificate = errors.New("no PEM certificate in it")

// CAPool is the pool of the CA certificates in a PEM file, read again
// when the file changes.
type CAPool struct {
	file string

	mu     sync.Mutex
	stamp  stamp
	pool   *x509.CertPool
	failed stamp // the version whose read failed with err
	err    error
}

// NewCAPool returns the pool of file; it reads nothing yet.
func NewCAPool(file string) *CAPool { return &CAPool{file: file} }

// Get returns the pool, read again when the file changed since the last
// read. When that read fails, it returns the previous pool (nil before
// the first) with the error, until the file changes again; a *StatError
// when the file cannot be looked at, ErrNoCertificate when it holds no
// certificate.
func (c *CAPool) Get() (*x509.CertPool, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	st, err := stampOf(c.file)
	if err != nil {
		return c.pool, err
	}
	switch {
	case c.pool != nil && st == c.stamp:
		return c.pool, nil
	case c.err != nil && st == c.failed:
		return c.pool, c.err
	}
	pem, err := os.ReadFile(c.file)
	if err == nil {
		pool := x509.NewCertPool()
		if pool.AppendCertsFromPEM(pem) {
			c.pool, c.stamp, c.err = pool, st, nil
			return pool, nil
		}
		err = ErrNoCertificate
	}
	c.failed, c.err = st, err
	return c.pool, err
}
