package main

// tlsreload.go: the HTTPS listener's certificate, read again when its
// files change.

import (
	"crypto/tls"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"
)

// certReloader serves the certificate of -tls_cert/-tls_key and reads the
// files again when either changes (a renewal), without a restart. A
// renewal caught half-written is retried at the next handshake; the
// previous certificate stays in use meanwhile.
type certReloader struct {
	certFile, keyFile string
	log               *slog.Logger

	mu     sync.Mutex
	cert   *tls.Certificate
	stamp  string // size and mtime of both files when cert was read
	failed string // stamp of the last failed reload, logged once
}

func newCertReloader(certFile, keyFile string, log *slog.Logger) (*certReloader, error) {
	c := &certReloader{certFile: certFile, keyFile: keyFile, log: log}
	stamp, err := c.fileStamp()
	if err != nil {
		return nil, err
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("-tls_cert/-tls_key: %w", err)
	}
	c.cert, c.stamp = &cert, stamp
	return c, nil
}

func (c *certReloader) fileStamp() (string, error) {
	var s string
	for _, f := range []string{c.certFile, c.keyFile} {
		fi, err := os.Stat(f)
		if err != nil {
			return "", fmt.Errorf("-tls_cert/-tls_key: %w", err)
		}
		s += fmt.Sprintf("%d/%d;", fi.Size(), fi.ModTime().UnixNano())
	}
	return s, nil
}

// GetCertificate is tls.Config.GetCertificate.
func (c *certReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	stamp, err := c.fileStamp()
	if err != nil || stamp == c.stamp || stamp == c.failed {
		return c.cert, nil
	}
	cert, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		c.failed = stamp
		c.log.Warn("cannot read the renewed TLS certificate; keeping the previous one", "err", err)
		return c.cert, nil
	}
	c.cert, c.stamp, c.failed = &cert, stamp, ""
	if cert.Leaf != nil {
		c.log.Info("TLS certificate reloaded", "subject", cert.Leaf.Subject.String(), "not_after", cert.Leaf.NotAfter.Format(time.RFC3339))
	} else {
		c.log.Info("TLS certificate reloaded")
	}
	return c.cert, nil
}

func (c *certReloader) tlsConfig() *tls.Config {
	return &tls.Config{GetCertificate: c.GetCertificate, MinVersion: tls.VersionTLS12}
}
