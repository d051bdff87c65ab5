// Package etcdc is the etcd client of the daemon and of the subcommands
// (deployer status, and any later one): one constructor (New), TLS client
// certificates re-read when they are renewed, and a start-up check that
// turns a certificate problem into a line naming it (gRPC alone only ever
// says "context deadline exceeded"); leases kept alive on a timer of our
// own (Session, NodeLease); the view of a prefix (InPrefix) and the
// connection options (DialOptions).
package etcdc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
)

// ErrTLS marks a TLS problem with etcd that retrying cannot fix: a
// certificate file that cannot be used, a server the CA does not vouch
// for, or a server that refuses our client certificate.
var ErrTLS = errors.New("etcd TLS")

// Options are the client's settings; the daemon's config fills them from
// its flags.
type Options struct {
	Endpoints   []string      // -etcd_nodes, or the embedded etcd's client URL
	DialTimeout time.Duration // -etcd_dial_timeout

	Username, Password string // -etcd_username and its password

	CACert, Cert, Key string // -etcd_cacert, -etcd_cert, -etcd_key
}

// New connects to etcd as opts say. With TLS, it first makes one TLS
// connection to an endpoint with the same configuration, so that a
// certificate problem fails at once with an error naming it (ErrTLS)
// instead of timing out in gRPC; an endpoint that does not answer yet is
// not an error (the client keeps trying).
func New(ctx context.Context, opts Options, log *slog.Logger) (*clientv3.Client, error) {
	endpoints := opts.Endpoints
	ccfg := clientv3.Config{
		Endpoints:   endpoints,
		DialTimeout: opts.DialTimeout,
		Logger:      zap.NewNop(),
		// Keepalives notice a dead member so the client moves to another.
		DialKeepAliveTime:    5 * time.Second,
		DialKeepAliveTimeout: 3 * time.Second,
		DialOptions:          DialOptions(),
	}
	if opts.Username != "" {
		ccfg.Username, ccfg.Password = opts.Username, opts.Password
		if !strings.HasPrefix(endpoints[0], "https://") {
			log.Warn("the etcd password travels in clear text: use https:// -etcd_nodes", "etcd_username", opts.Username)
		}
	}
	if strings.HasPrefix(endpoints[0], "https://") {
		files := newTLSFiles(opts.CACert, opts.Cert, opts.Key)
		if err := files.check(); err != nil {
			return nil, err
		}
		if err := checkTLS(ctx, endpoints, files, opts.DialTimeout, log); err != nil {
			return nil, err
		}
		// clientv3 only takes a fixed *tls.Config; these credentials build
		// one per connection from the files, so a renewed certificate is
		// used by the next connection. A later WithTransportCredentials
		// replaces the one clientv3 sets (DialOptions come last).
		ccfg.DialOptions = append(ccfg.DialOptions, grpc.WithTransportCredentials(&reloadingCreds{files: files, warn: newTLSWarner(log)}))
	}
	cli, err := clientv3.New(ccfg)
	if err != nil {
		return nil, fmt.Errorf("etcd client %s: %w", strings.Join(endpoints, ","), err)
	}
	return cli, nil
}
