package main

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"slices"
	"time"

	docker "github.com/fsouza/go-dockerclient"
)

// repuller is the safety net for lost triggers: every period (with
// jitter) it queues a deploy of every tag that a running container was
// started with. Nothing runs at start.
type repuller struct {
	docker      containerAPI
	period      time.Duration
	callTimeout time.Duration
	submit      func(deployEvent)
	log         *slog.Logger
}

func (p *repuller) run(ctx context.Context) error {
	if p.period <= 0 {
		return nil
	}
	for {
		// Spread nodes out: each waits 90% to 110% of the period.
		wait := p.period - p.period/10 + rand.N(p.period/5+1)
		if !sleepCtx(ctx, wait) {
			return nil
		}
		if err := p.once(ctx); err != nil {
			p.log.Warn("periodic re-pull failed", "err", err)
		}
	}
}

// once queues one deploy per repository in use, naming its tags in use.
func (p *repuller) once(ctx context.Context) error {
	p.log.Info("periodic re-pull started")
	lctx, cancel := context.WithTimeout(ctx, p.callTimeout)
	defer cancel()
	list, err := p.docker.ListContainers(docker.ListContainersOptions{Context: lctx})
	if err != nil {
		return fmt.Errorf("list containers: %w", err)
	}
	inUse := map[string]map[string]struct{}{}
	for _, c := range list {
		ictx, cancel := context.WithTimeout(ctx, p.callTimeout)
		ctr, err := p.docker.InspectContainerWithContext(c.ID, ictx)
		cancel()
		if err != nil || ctr.Config == nil {
			continue
		}
		ref, ok := containerRef(ctr.Config.Image, ctr.Image)
		if !ok {
			continue
		}
		name := ref.Name()
		if inUse[name] == nil {
			inUse[name] = map[string]struct{}{}
		}
		inUse[name][ref.Tag()] = struct{}{}
	}
	for _, name := range slices.Sorted(maps.Keys(inUse)) {
		p.submit(deployEvent{Repo: name, Tags: slices.Sorted(maps.Keys(inUse[name]))})
	}
	p.log.Info("periodic re-pull queued", "repositories", len(inUse))
	return nil
}
