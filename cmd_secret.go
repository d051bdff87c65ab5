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
	"slices"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/etcdc"
)

// commandEtcd is the etcd connection of a subcommand, from the daemon's
// own flags (endpoints, prefix, dial timeout, TLS and authentication);
// no -etcd_nodes means this machine's embedded etcd at
// -etcd_listen_client.
type commandEtcd struct {
	cfg config
}

// parseCommand parses the command line of a subcommand: the daemon's whole
// command line (the flags of bindFlags, one definition for both), so that
// `deployer secret` in front of the line a daemon was started with reaches
// that daemon's etcd, plus the subcommand's own flags, which own defines.
// Flags that do not concern the subcommand are accepted and ignored; the
// etcd flags are checked as the daemon checks them (validateEtcd). -h
// shows the etcd flags, the subcommand's own and those named in shown.
func parseCommand(name string, args []string, getenv func(string) string, stderr io.Writer, own func(*flag.FlagSet), shown ...string) (*commandEtcd, error) {
	b := bindFlags(name, getenv, stderr)
	var mine []string
	if own != nil {
		before := map[string]bool{}
		b.fs.VisitAll(func(f *flag.Flag) { before[f.Name] = true })
		own(b.fs)
		b.fs.VisitAll(func(f *flag.Flag) {
			if !before[f.Name] {
				mine = append(mine, f.Name)
			}
		})
	}
	b.fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: %s [flags]\n\nIt takes the daemon's whole command line: the flags below concern it, the daemon's others are accepted and ignored.\n", name)
		help := flag.NewFlagSet(name, flag.ContinueOnError)
		help.SetOutput(stderr)
		b.fs.VisitAll(func(f *flag.Flag) {
			if strings.HasPrefix(f.Name, "etcd_") || slices.Contains(mine, f.Name) || slices.Contains(shown, f.Name) {
				help.Var(f.Value, f.Name, f.Usage)
			}
		})
		help.PrintDefaults()
	}
	if err := b.parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: %w", errUsage, err)
	}
	if b.fs.NArg() > 0 {
		return nil, fmt.Errorf("%w: unexpected argument %q", errUsage, b.fs.Arg(0))
	}
	if err := b.c.validateEtcd(); err != nil {
		return nil, err
	}
	return &commandEtcd{cfg: *b.c}, nil
}

// client connects as the daemon would with the same flags.
func (c *commandEtcd) client(ctx context.Context, stderr io.Writer) (*clientv3.Client, error) {
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
	return f(ctx, etcdc.InPrefix(cli, c.cfg.EtcdPrefix))
}

// secretCommand is `deployer secret`: it prints the webhook secret that a
// daemon started with the same command line and environment accepts: its
// -webhook_secret ($DEPLOYER_WEBHOOK_SECRET) when set, else the cluster's
// secret, which every deployer started without one accepts.
func secretCommand(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	ce, err := parseCommand("deployer secret", args, os.Getenv, stderr, nil, "webhook_secret")
	if err != nil {
		return err
	}
	secret := ce.cfg.WebhookSecret
	if secret == "" {
		err = ce.read(ctx, stderr, func(ctx context.Context, kv clientv3.KV) (err error) {
			secret, err = readClusterSecret(ctx, kv)
			return err
		})
		if err != nil {
			return fmt.Errorf("read the webhook secret %s from %s: %w", ce.cfg.EtcdPrefix+clusterSecretKey, strings.Join(ce.cfg.etcdEndpoints(), ","), err)
		}
	}
	_, err = fmt.Fprintln(stdout, secret)
	return err
}
