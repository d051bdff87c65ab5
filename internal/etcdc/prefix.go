package etcdc

// prefix.go: the client's view of a prefix, and its connection options.

import (
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/namespace"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
)

// InPrefix returns a client that sees only the keys under prefix, as
// relative keys: reads, writes, transactions, watches and leases go
// through etcd's namespace package. It shares cli's connection and ends
// with it; it must not be closed itself (closing it would close cli's
// watcher and lessor).
//
//nolint:contextcheck // the view lives as long as cli (cli.Ctx), not a call
func InPrefix(cli *clientv3.Client, prefix string) *clientv3.Client {
	ns := clientv3.NewCtxClient(cli.Ctx())
	ns.KV = namespace.NewKV(cli.KV, prefix)
	ns.Watcher = namespace.NewWatcher(cli.Watcher, prefix)
	ns.Lease = namespace.NewLease(cli.Lease, prefix)
	ns.Cluster, ns.Maintenance, ns.Auth = cli.Cluster, cli.Maintenance, cli.Auth
	return ns
}

// DialOptions caps gRPC's reconnect backoff (2 minutes by default), so
// that the client is back within seconds of an etcd member's return.
func DialOptions() []grpc.DialOption {
	return []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
		Backoff:           grpcbackoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 3 * time.Second},
		MinConnectTimeout: 2 * time.Second,
	})}
}
