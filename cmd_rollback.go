package main

// cmd_rollback.go: deployer rollback, an earlier version of an image tag
// back on every node (rollback.go).

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/die-net/deployer/internal/etcdc"
)

// rollbackCommand is `deployer rollback repository:tag [-to …]`. It takes
// the daemon's command line (its etcd flags, -dockercfg, -registry,
// -history), as `deployer status` does; the image may come before or
// after the flags.
func rollbackCommand(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var to string
	own := func(fs *flag.FlagSet) {
		fs.StringVar(&to, "to", "", "the version to go back to: a manifest digest, an image ID or a ledger version (default: the newest earlier version that rolled out)")
	}
	args, image := cutHistoryArg(args, own)
	if image == "" {
		return fmt.Errorf("%w: deployer rollback repository:tag [-to digest|image ID|ledger version]", errUsage)
	}
	ce, err := parseCommand("deployer rollback", args, os.Getenv, stderr, own, "dockercfg", "registry", "history", "slack_webhook_url", "slack_username")
	if err != nil {
		return err
	}
	domain, err := registryHost(ce.cfg.Registry)
	if err != nil {
		return fmt.Errorf("%w: -registry: %w", errUsage, err)
	}
	cli, err := ce.client(ctx, stderr)
	if err != nil {
		return err
	}
	defer cli.Close()
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	rb := newRollbacker(etcdc.InPrefix(cli, ce.cfg.EtcdPrefix), ce.cfg.DockerCfg, domain, ce.cfg.History, log)
	host, _ := os.Hostname()
	command := "deployer rollback " + image
	if to != "" {
		command += " -to " + to
	}
	asked := askedBy{Command: command, Host: host, Remote: host}
	res, err := rb.rollback(ctx, rollbackRequest{Image: image, To: to}, asked)
	if err != nil {
		return err
	}
	lines := res.lines(asked)
	announce(ctx, ce.cfg, ":rewind: "+strings.Join(lines, "\n"), stderr)
	lines = append(lines, "see deployer history "+familiar(res.Image))
	_, err = fmt.Fprintln(stdout, strings.Join(lines, "\n"))
	return err
}

// announce posts text once, for the fleet, on every notification
// service the command line names (-slack_webhook_url,
// $SLACK_WEBHOOK_URL, -notify): the command that acts posts, not every
// node. It waits at most a few seconds; a failure is only logged.
func announce(ctx context.Context, cfg config, text string, stderr io.Writer) {
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	senders, err := notifySenders(cfg, log)
	if err != nil || len(senders) == 0 {
		return
	}
	h := newNotifyHub(senders, false, log, newMetrics())
	h.timeout = 10 * time.Second
	_ = h.deliver(ctx, message{Title: "deployer", Text: text, Fields: map[string]string{"kind": "fleet"}}) // logged by deliver
}
