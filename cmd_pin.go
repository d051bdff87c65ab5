package main

// cmd_pin.go: deployer pin and deployer unpin (pin.go).

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/die-net/deployer/internal/etcdc"
)

// pinCommand is `deployer pin repository:tag [digest | image ID | ledger
// version]` (default: the newest version that rolled out), and with
// unpin `deployer unpin repository:tag`. Each takes the daemon's command
// line (its etcd flags, -registry, -history, Slack), as `deployer
// rollback` does; the arguments may come before or after the flags.
func pinCommand(ctx context.Context, args []string, unpin bool, stdout, stderr io.Writer) error {
	name := "deployer pin"
	usage := "deployer pin repository:tag [digest|image ID|ledger version]"
	if unpin {
		name, usage = "deployer unpin", "deployer unpin repository:tag"
	}
	own := func(*flag.FlagSet) {}
	args, image := cutHistoryArg(args, own)
	args, to := cutHistoryArg(args, own)
	if image == "" || (unpin && to != "") {
		return fmt.Errorf("%w: %s", errUsage, usage)
	}
	ce, err := parseCommand(name, args, os.Getenv, stderr, nil, "registry", "history", "slack_webhook_url", "slack_username")
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
	p := newPinner(etcdc.InPrefix(cli, ce.cfg.EtcdPrefix), domain, ce.cfg.History)
	host, _ := os.Hostname()
	asked := askedBy{Command: strings.TrimSpace(name + " " + image + " " + to), Host: host, Remote: host}
	var lines []string
	if unpin {
		res, old, err := p.unpin(ctx, pinRequest{Image: image}, asked)
		if err != nil {
			return err
		}
		lines = []string{unpinAnnouncement(res, old, asked)}
	} else {
		res, from, err := p.pin(ctx, pinRequest{Image: image, To: to}, asked)
		if err != nil {
			return err
		}
		lines = strings.Split(pinAnnouncement(res, from, asked), "\n")
	}
	announce(ctx, ce.cfg, strings.Join(lines, "\n"), stderr)
	_, err = fmt.Fprintln(stdout, strings.TrimPrefix(strings.Join(lines, "\n"), ":pushpin: "))
	return err
}
