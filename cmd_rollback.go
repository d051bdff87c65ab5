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
	ce, err := parseCommand("deployer rollback", args, os.Getenv, stderr, own, "dockercfg", "registry", "history")
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
	res, err := rb.rollback(ctx, rollbackRequest{Image: image, To: to}, askedBy{Command: command, Host: host, Remote: host})
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(stdout, "%s: version %d (%s) rolled back to version %d's image %s (%s), recorded as version %d at revision %d; every node rolls it out now (see deployer history %s)\n",
		res.Image, res.FromVersion, shortID(res.FromImageID), res.ToVersion, shortID(res.ImageID), shortDigest(res.Digest),
		res.Version, res.Revision, strings.TrimPrefix(res.Image, "docker.io/"))
	return err
}
