package main

// replace.go: replacing the stale containers of one deploy. For each
// container it chooses the strategy (one place, whatever the coordination
// mode), takes a rollout slot when rollouts are coordinated, runs the
// strategy's mechanics, and decides what the result means: only a
// replacement that ran and failed halts the version.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/distribution/reference"
	"golang.org/x/sync/errgroup"
)

// maxParallelReplace bounds the replacements run at once when rollouts are
// not coordinated (-max_unavailable=0).
const maxParallelReplace = 8

// replacer replaces stale containers.
type replacer struct {
	rollout   *rollout   // cluster coordination; off when maxUnavailable is 0
	restarter *restarter // the stop strategy
	recreator *recreator // the recreate strategy
	strategy  string     // -restart_strategy
	leftAlone *leftAlone // containers passed over until they change (leftalone.go)
	log       *slog.Logger

	// gate, when set, is asked just before each container is stopped or
	// re-created whether its new version may replace it now (hold.go);
	// an error wrapping errHeld leaves it alone.
	gate func(ctx context.Context, c staleContainer) error
}

// newReplacer returns the replacement of stale containers with strategy
// (-restart_strategy; a container's label may override it), coordinated
// by ro. It starts nothing.
func newReplacer(ro *rollout, rs *restarter, rc *recreator, strategy string, log *slog.Logger) *replacer {
	return &replacer{rollout: ro, restarter: rs, recreator: rc, strategy: strategy, leftAlone: newLeftAlone(), log: log}
}

// replaceAPI is the part of the Docker client the replacement uses.
type replaceAPI interface {
	containerAPI
	recreateAPI
	upAPI
}

// replacementOptions are the settings of the replacement machinery.
type replacementOptions struct {
	node           string
	strategy       string        // -restart_strategy
	maxUnavailable int           // -max_unavailable; 0: uncoordinated
	restartTimeout time.Duration // -restart_timeout: how long a replacement may take to come up
	killTimeout    time.Duration // a stop's grace
	slotTimeout    time.Duration // -slot_timeout
	callTimeout    time.Duration
	selfID         string // the deployer's own container, never stopped
}

// replacement is the machinery that replaces stale containers: the
// replacer, which holds the up-waiter, the two strategies and the
// rollout, and the parker they share, whose run settles what a crash left
// parked.
type replacement struct {
	*replacer
	parker *parker
}

// newReplacement builds the replacement machinery on dc (its events from
// events), coordinated through etcd under leases: the one wiring, for the
// daemon and the tests. It starts nothing.
func newReplacement(dc replaceAPI, events eventAPI, etcd rolloutEtcd, leases sessions, o replacementOptions, log *slog.Logger, m *metrics) replacement {
	rolloutLog := log.With("component", "rollout")
	wait := newUpWaiter(dc, events, o.restartTimeout, o.callTimeout, rolloutLog, m)
	rs := newRestarter(dc, wait, o.killTimeout, o.selfID, log.With("component", "restarter"), m)
	rc := newRecreator(dc, rs, wait, log.With("component", "recreate"), m)
	ro := newRollout(etcd, leases, o.node, o.maxUnavailable, o.slotTimeout, o.callTimeout, rolloutLog, m)
	rep := newReplacer(ro, rs, rc, o.strategy, rolloutLog)
	rs.leftAlone = rep.leftAlone
	return replacement{replacer: rep, parker: rs.parked}
}

// outcome is what happened to one stale container.
type outcome struct {
	c       staleContainer
	err     error  // the replacement did not happen; errReplacement: the version halted
	skipped string // left alone on purpose, and why
	quiet   bool   // skipped as an earlier deploy decided and reported (leftalone.go): not reported again
}

// strategyOf is the one place that chooses how a container is replaced:
// its deployer.strategy label, else -restart_strategy.
func (p *replacer) strategyOf(c staleContainer) string {
	return containerStrategy(c.Labels, p.strategy)
}

// stale returns the running containers of repo started by one of the
// tags in current (tag -> image ID it points at now) that run another
// image (restarter.stale).
func (p *replacer) stale(ctx context.Context, repo reference.Named, current map[string]string) ([]staleContainer, error) {
	return p.restarter.stale(ctx, repo, current)
}

// replace replaces the stale containers on this node, tag after tag.
// Coordinated (the tag's max_unavailable, policy.go, above 0), up to
// max_unavailable of a tag's containers at once, each under a
// cluster-wide slot of its tag; a tag whose new version failed here is
// not tried again in this deploy. Uncoordinated, everything is replaced
// at once, as the original did. Then a coordinated tag whose new version
// now runs here has its halt (of another version) cleared.
func (p *replacer) replace(ctx context.Context, stale []staleContainer) []outcome {
	out := p.replaceAll(ctx, stale)
	rolledOut := map[string]string{} // repo:tag -> image ID now running
	for _, o := range out {
		if o.skipped == "" && o.err == nil && p.limit(o.c) > 0 {
			rolledOut[o.c.Ref.String()] = o.c.NewID
		}
	}
	for ref, id := range rolledOut {
		p.rollout.clearHalt(ctx, ref, id)
	}
	return out
}

// limit is max_unavailable of c's tag as a count: its policy's, else
// -max_unavailable's.
func (p *replacer) limit(c staleContainer) int {
	if c.policy != nil {
		return c.policy.maxUnavailable
	}
	return p.rollout.maxUnavailable
}

func (p *replacer) replaceAll(ctx context.Context, stale []staleContainer) []outcome {
	out := make([]outcome, len(stale))
	var tags []string           // in the order of stale
	byTag := map[string][]int{} // tag -> indexes into stale
	for i, c := range stale {
		t := c.Ref.Tag()
		if _, ok := byTag[t]; !ok {
			tags = append(tags, t)
		}
		byTag[t] = append(byTag[t], i)
	}
	for _, t := range tags {
		idx := byTag[t]
		limit := p.limit(stale[idx[0]])
		var g errgroup.Group
		if limit <= 0 {
			g.SetLimit(maxParallelReplace)
			for _, i := range idx {
				g.Go(func() error {
					out[i] = p.replaceOne(ctx, stale[i], nil, 0)
					return nil
				})
			}
			_ = g.Wait()
			continue
		}
		// Up to limit at once; each waits for a slot of its own, so the
		// cluster's count, not this node's, decides.
		g.SetLimit(limit)
		var halted atomic.Bool // the tag's rollout halted here
		for _, i := range idx {
			g.Go(func() error {
				if halted.Load() {
					out[i] = outcome{c: stale[i], skipped: "rollout halted"}
					return nil
				}
				out[i] = p.replaceOne(ctx, stale[i], p.rollout, limit)
				if errors.Is(out[i].err, errReplacement) {
					halted.Store(true)
				}
				return nil
			})
		}
		_ = g.Wait()
	}
	return out
}

// replaceOne replaces one container under one of limit slots of its tag;
// coord is nil when uncoordinated.
func (p *replacer) replaceOne(ctx context.Context, c staleContainer, coord *rollout, limit int) outcome {
	strategy := p.strategyOf(c)
	if strategy == strategySkip {
		return outcome{c: c, skipped: "label " + strategyKey + "=skip"}
	}
	if why := p.leftAlone.check(c.ID, c.Labels, c.NewID); why != "" {
		return outcome{c: c, skipped: why, quiet: true}
	}
	ref := c.Ref.String() // the rollout's name of the tag (its etcd keys)
	var err error
	var guard func(context.Context) error
	var lost <-chan struct{}
	if coord != nil {
		sl, err := coord.acquireN(ctx, ref, c, limit)
		var h *haltedError
		switch {
		case errors.As(err, &h):
			return outcome{c: c, skipped: h.Error()}
		case err != nil:
			return outcome{c: c, err: err}
		}
		defer sl.release(ctx)
		guard = func(ctx context.Context) error { return sl.verify(ctx, c.NewID) }
		lost = sl.lost()
	}
	if p.gate != nil {
		slotCheck := guard
		guard = func(ctx context.Context) error {
			if err := callGuard(ctx, slotCheck); err != nil {
				return err
			}
			return p.gate(ctx, c)
		}
	}
	if strategy == strategyRecr {
		err = p.recreator.recreate(ctx, c, guard, lost)
	} else {
		err = p.restarter.stopAndWait(ctx, c, guard, lost)
	}
	switch {
	case errors.Is(err, errUnsupervised):
		// Stopping it again would only take it down again.
		p.leftAlone.add(c.ID, c.Name, c.Labels, "", "unsupervised: nothing restarted it when stopped; left alone until its labels change or the deployer restarts")
	case errors.Is(err, errCreateRefused):
		p.leftAlone.add(c.ID, c.Name, c.Labels, c.NewID, "the re-create of "+shortID(c.NewID)+" was refused twice alike: "+err.Error())
	}
	var h *haltedError
	switch {
	case errors.As(err, &h):
		return outcome{c: c, skipped: h.Error()}
	case errors.Is(err, errRefused), errors.Is(err, errHeld):
		return outcome{c: c, skipped: err.Error()}
	case errors.Is(err, errSlotLost):
		return outcome{c: c, err: fmt.Errorf("%s not replaced: %w", c.Name, err)}
	case err != nil && ctx.Err() == nil && coord != nil && errors.Is(err, errReplacement):
		coord.recordHalt(ctx, ref, c, err)
	}
	return outcome{c: c, err: err}
}
