package main

// tlsreload.go: the HTTPS listener's certificate, read again when its
// files change.

import (
	"crypto/tls"
	"fmt"
	"log/slog"
	"time"

	"github.com/die-net/deployer/internal/pemfile"
)

// certReloader serves the certificate of -tls_cert/-tls_key and reads the
// files again when either changes (a renewal), without a restart. A
// renewal caught half-written is retried at the next handshake; the
// previous certificate stays in use meanwhile.
type certReloader struct {
	pair *pemfile.KeyPair
	log  *slog.Logger
}

func newCertReloader(certFile, keyFile string, log *slog.Logger) (*certReloader, error) {
	c := &certReloader{pair: pemfile.NewKeyPair(certFile, keyFile, nil), log: log}
	if _, _, err := c.pair.Get(); err != nil {
		return nil, fmt.Errorf("-tls_cert/-tls_key: %w", err)
	}
	return c, nil
}

// GetCertificate is tls.Config.GetCertificate.
func (c *certReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	cert, changed, err := c.pair.Get()
	switch {
	case !changed:
	case err != nil:
		c.log.Warn("cannot read the renewed TLS certificate; keeping the previous one", "err", err)
	case cert.Leaf != nil:
		c.log.Info("TLS certificate reloaded", "subject", cert.Leaf.Subject.String(), "not_after", cert.Leaf.NotAfter.Format(time.RFC3339))
	default:
		c.log.Info("TLS certificate reloaded")
	}
	return cert, nil
}

func (c *certReloader) tlsConfig() *tls.Config {
	return &tls.Config{GetCertificate: c.GetCertificate, MinVersion: tls.VersionTLS12}
}
