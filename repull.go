package main

// repull.go: the periodic re-pull (-repull): every period, with jitter,
// queue a deploy of every repository in use that this cluster deploys.

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"slices"
	"time"

	docker "github.com/fsouza/go-dockerclient"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/backoff"
)

// managedLabel marks a container that the periodic re-pull keeps up to
// date even when no trigger names its repository.
const managedLabel = "deployer.managed"

// keyLister is what the re-pull needs from etcd.
type keyLister interface {
	// Get lists the trigger keys (keys only).
	Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error)
}

// repuller is the safety net for lost triggers: every period (with
// jitter) it queues a deploy of the tags that running containers were
// started with, for the repositories this cluster deploys (those with a
// trigger key under the prefix) and for containers labelled
// deployer.managed=true. Every other container (a postgres:latest
// started by hand) is never touched. It makes no registry request of its
// own: dockerd's pull asks the registry with a HEAD first and fetches
// nothing when the tag has not moved. Nothing runs at start.
type repuller struct {
	docker      containerAPI
	kv          keyLister
	registry    string // domain of bare names in trigger keys (-registry)
	period      time.Duration
	callTimeout time.Duration
	submit      func(repo string, ev deployEvent)
	log         *slog.Logger
}

// newRepuller returns a repuller of the repositories with a trigger, every
// period (0: never), handing each deploy to submit. It starts nothing.
func newRepuller(dc containerAPI, kv keyLister, registry string, period time.Duration, submit func(repo string, ev deployEvent), log *slog.Logger) *repuller {
	return &repuller{docker: dc, kv: kv, registry: registry, period: period, callTimeout: callTimeout, submit: submit, log: log}
}

func (p *repuller) run(ctx context.Context) error {
	if p.period <= 0 {
		return nil
	}
	for {
		// Spread nodes out: each waits 90% to 110% of the period.
		wait := p.period - p.period/10 + rand.N(p.period/5+1) //nolint:gosec // jitter, not a secret
		if !backoff.Sleep(ctx, wait) {
			return nil
		}
		if err := p.once(ctx); err != nil {
			p.log.Warn("periodic re-pull failed", "err", err)
		}
	}
}

// once queues one deploy per repository in use that this cluster
// deploys, naming its tags in use.
func (p *repuller) once(ctx context.Context) error {
	p.log.Info("periodic re-pull started")
	deployed, err := p.deployedRepos(ctx)
	if err != nil {
		// Without the list, re-pulling everything would touch what
		// nobody asked us to manage: skip this round.
		return err
	}
	lctx, cancel := context.WithTimeout(ctx, p.callTimeout)
	defer cancel()
	list, err := p.docker.ListContainers(docker.ListContainersOptions{Context: lctx})
	if err != nil {
		return fmt.Errorf("list containers: %w", err)
	}
	inUse := map[string]map[string]struct{}{}
	skipped := 0
	for t, err := range runningFromTags(ctx, p.docker, p.callTimeout, list, nil) {
		if err != nil || t.ref == nil {
			continue
		}
		ctr, ref := t.ctr, t.ref
		name := ref.Name()
		if !deployed[name] && ctr.Config.Labels[managedLabel] != "true" {
			skipped++
			continue
		}
		if inUse[name] == nil {
			inUse[name] = map[string]struct{}{}
		}
		inUse[name][ref.Tag()] = struct{}{}
	}
	for _, name := range slices.Sorted(maps.Keys(inUse)) {
		p.submit(name, deployEvent{Tags: slices.Sorted(maps.Keys(inUse[name]))})
	}
	p.log.Info("periodic re-pull queued", "repositories", len(inUse), "containers_not_managed", skipped)
	return nil
}

// deployedRepos returns the repositories that have a trigger key under
// the prefix, resolved as a deploy resolves them (bare names belong to
// -registry), by their full name.
func (p *repuller) deployedRepos(ctx context.Context) (map[string]bool, error) {
	gctx, cancel := context.WithTimeout(ctx, p.callTimeout)
	defer cancel()
	resp, err := p.kv.Get(gctx, triggersPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, fmt.Errorf("list trigger keys: %w", err)
	}
	out := map[string]bool{}
	for _, kv := range resp.Kvs {
		name, ok := repoFromKey(string(kv.Key))
		if !ok {
			continue
		}
		repo, err := resolveRepo(name, p.registry)
		if err != nil {
			continue
		}
		out[repo.Name()] = true
	}
	return out, nil
}
