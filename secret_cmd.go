package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// commandEndpoints is the etcd of `deployer status` and `deployer secret`:
// -etcd_nodes, or, when it is empty (the default), the embedded etcd's
// default client URL on this machine.
func commandEndpoints(nodes string) []string {
	if eps := splitList(nodes); len(eps) > 0 {
		return eps
	}
	return []string{defaultConfig(func(string) string { return "" }).EtcdListenClient}
}

// secretCommand is `deployer secret`: it prints the cluster's webhook
// secret, which every deployer started without -webhook_secret accepts.
// It takes the same etcd flags as `deployer status` and builds its client
// the same way.
func secretCommand(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	def := defaultConfig(func(string) string { return "" })
	fs := flag.NewFlagSet("deployer secret", flag.ContinueOnError)
	fs.SetOutput(stderr)
	nodes := fs.String("etcd_nodes", strings.Join(def.EtcdNodes, ","), "comma-separated etcd endpoints; empty: the embedded etcd at "+def.EtcdListenClient)
	prefix := fs.String("etcd_prefix", def.EtcdPrefix, "etcd key prefix")
	dial := fs.Duration("etcd_dial_timeout", def.EtcdDialTimeout, "timeout for connecting to etcd")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, fs.Arg(0))
	}
	endpoints := commandEndpoints(*nodes)
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: *dial, Logger: zap.NewNop(), DialOptions: etcdDialOptions()})
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(ctx, *dial+5*time.Second)
	defer cancel()
	secret, err := readClusterSecret(ctx, cli, *prefix)
	if err != nil {
		return fmt.Errorf("read the webhook secret from %s: %w", strings.Join(endpoints, ","), err)
	}
	_, err = fmt.Fprintln(stdout, secret)
	return err
}
