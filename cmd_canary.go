package main

// cmd_canary.go: deployer promote and deployer abort, and their HTTP
// endpoints: the decisions on a tag's canary rollout (canary.go).

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"

	"github.com/die-net/deployer/internal/etcdc"
)

// canaryCommand is `deployer promote repository:tag` or `deployer abort
// repository:tag` (action "promote" or "abort"). It takes the daemon's
// command line (its etcd flags, -registry), as deployer rollback does;
// the image may come before or after the flags.
func canaryCommand(ctx context.Context, action string, args []string, stdout, stderr io.Writer) error {
	args, image := cutHistoryArg(args, func(*flag.FlagSet) {})
	if image == "" {
		return fmt.Errorf("%w: deployer %s repository:tag", errUsage, action)
	}
	ce, err := parseCommand("deployer "+action, args, os.Getenv, stderr, nil, "registry")
	if err != nil {
		return err
	}
	domain, err := registryHost(ce.cfg.Registry)
	if err != nil {
		return fmt.Errorf("%w: -registry: %w", errUsage, err)
	}
	ref, err := parseRollbackImage(image, domain)
	if err != nil {
		return err
	}
	cli, err := ce.client(ctx, stderr)
	if err != nil {
		return err
	}
	defer cli.Close()
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	host, _ := os.Hostname()
	c := newCanaries(etcdc.InPrefix(cli, ce.cfg.EtcdPrefix), nil, nil, host, nil, nil, nil, domain, log)
	by := "deployer " + action + " on " + host
	var ans canaryAnswer
	if action == "promote" {
		ans, err = c.promote(ctx, ref, by)
	} else {
		ans, err = c.abort(ctx, ref, by)
	}
	if err != nil {
		return err
	}
	if !ans.Changed {
		_, err = fmt.Fprintf(stdout, "%s %s: nothing to do, %s\n", ans.Image, shortID(ans.ImageID), ans.State)
		return err
	}
	_, err = fmt.Fprintf(stdout, "%s %s: %s\n", ans.Image, shortID(ans.ImageID), ans.State)
	return err
}

// canaryRequest is the body of POST /api/promote and /api/abort.
type canaryRequest struct {
	Image string `json:"image"` // repository:tag
}

// POST /api/promote {"image":"repository:tag"}, POST /api/abort {…}
//
// deployer promote and deployer abort over HTTP, with the webhooks'
// secret; answered once the decision is recorded.
func canaryHandler(h *webhook, c *canaries, action string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		body, ok := h.accept(w, r, action)
		if !ok {
			return
		}
		var req canaryRequest
		if err := json.Unmarshal(body, &req); err != nil || req.Image == "" {
			h.fail(w, r, action, http.StatusBadRequest, errors.New(`want {"image":"repository:tag"}`))
			return
		}
		ref, err := parseRollbackImage(req.Image, c.domain)
		if err != nil {
			h.fail(w, r, action, http.StatusBadRequest, err)
			return
		}
		h.log.Info("canary request", "action", action, "image", ref.String(), "remote", r.RemoteAddr)
		by := "POST /api/" + action + " from " + r.RemoteAddr
		var ans canaryAnswer
		if action == "promote" {
			ans, err = c.promote(r.Context(), ref, by)
		} else {
			ans, err = c.abort(r.Context(), ref, by)
		}
		if err != nil {
			code := http.StatusServiceUnavailable
			switch {
			case errors.Is(err, errNoCanary):
				code = http.StatusNotFound
			case errors.Is(err, errCanaryOver):
				code = http.StatusConflict
			}
			h.fail(w, r, action, code, err)
			return
		}
		h.metrics.webhooks.WithLabelValues(action, "ok").Inc()
		writeJSON(w, http.StatusOK, ans)
	}
}
