package main

// secret_cmd.go: `deployer secret`, and the etcd flags and client it shares
// with `deployer status`.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// commandEtcd is the etcd connection of a subcommand: the daemon's etcd
// flags (endpoints, prefix, dial timeout, TLS and authentication), with
// the daemon's defaults; no -etcd_nodes means this machine's embedded etcd.
type commandEtcd struct {
	cfg   config
	nodes *string
}

func addCommandEtcdFlags(fs *flag.FlagSet) *commandEtcd {
	c := &commandEtcd{cfg: defaultConfig(os.Getenv)}
	c.nodes = fs.String("etcd_nodes", strings.Join(c.cfg.EtcdNodes, ","), "comma-separated etcd endpoints; empty: the embedded etcd at "+c.cfg.EtcdListenClient)
	fs.StringVar(&c.cfg.EtcdPrefix, "etcd_prefix", c.cfg.EtcdPrefix, "etcd key prefix")
	fs.DurationVar(&c.cfg.EtcdDialTimeout, "etcd_dial_timeout", c.cfg.EtcdDialTimeout, "timeout for connecting to etcd")
	addEtcdTLSFlags(fs, &c.cfg)
	return c
}

// client connects as the daemon would with the same flags.
func (c *commandEtcd) client(ctx context.Context, stderr io.Writer) (*clientv3.Client, error) {
	c.cfg.EtcdNodes = splitList(*c.nodes)
	if err := c.cfg.validateEtcdTLS(); err != nil {
		return nil, err
	}
	return newEtcdClient(ctx, c.cfg, slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
}

// read connects as the daemon would and runs f on the keys under
// -etcd_prefix, within the dial timeout and 5 s more.
func (c *commandEtcd) read(ctx context.Context, stderr io.Writer, f func(ctx context.Context, kv clientv3.KV) error) error {
	cli, err := c.client(ctx, stderr)
	if err != nil {
		return err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(ctx, c.cfg.EtcdDialTimeout+5*time.Second)
	defer cancel()
	return f(ctx, inPrefix(cli, c.cfg.EtcdPrefix))
}

// secretCommand is `deployer secret`: it prints the cluster's webhook
// secret, which every deployer started without -webhook_secret accepts.
func secretCommand(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("deployer secret", flag.ContinueOnError)
	fs.SetOutput(stderr)
	ce := addCommandEtcdFlags(fs)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, fs.Arg(0))
	}
	var secret string
	err := ce.read(ctx, stderr, func(ctx context.Context, kv clientv3.KV) (err error) {
		secret, err = readClusterSecret(ctx, kv)
		return err
	})
	if err != nil {
		return fmt.Errorf("read the webhook secret %s from %s: %w", ce.cfg.EtcdPrefix+clusterSecretKey, strings.Join(ce.cfg.etcdEndpoints(), ","), err)
	}
	_, err = fmt.Fprintln(stdout, secret)
	return err
}
