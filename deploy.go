package main

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"time"

	"github.com/distribution/reference"
	docker "github.com/fsouza/go-dockerclient"
)

// notifier tells people what a deploy did. notify must not block.
type notifier interface {
	notify(report)
}

type nopNotifier struct{}

func (nopNotifier) notify(report) {}

// deployer runs one deploy of one repository on this node: pull the local
// tags, then stop the containers that still run the old images.
type deployer struct {
	puller    *puller
	restarter *restarter
	rollout   *rollout
	notifier  notifier
	registry  string // domain of bare names
	node      string
	dryRun    bool // report stale containers, stop nothing
	cleanup   bool // remove superseded images no container uses
	images    imageRemover
	log       *slog.Logger
	metrics   *metrics
}

func (d *deployer) deploy(ctx context.Context, j job) {
	start := time.Now()
	seen := start
	if !j.Seen.IsZero() {
		seen = j.Seen
	}
	r := d.run(ctx, j)
	result := "ok"
	switch {
	case r.failed():
		result = "error"
	case !r.worthTelling():
		result = "noop"
	}
	d.metrics.deploys.WithLabelValues(result).Inc()
	d.metrics.deployDuration.WithLabelValues(result).Observe(time.Since(seen).Seconds())
	level := slog.LevelInfo
	if r.failed() {
		level = slog.LevelWarn
	}
	d.log.Log(ctx, level, "deploy finished", "repo", j.Repo, "result", result, "duration", time.Since(start).Round(time.Millisecond),
		"tags", len(r.Tags), "stopped", len(r.Stopped), "failures", r.Failed)
	if ctx.Err() != nil {
		return // cancelled at shutdown: the next start replays the trigger
	}
	if r.worthTelling() {
		d.notifier.notify(r)
	}
}

func (d *deployer) run(ctx context.Context, j job) report {
	r := report{Node: d.node, Repo: j.Repo}
	repo, err := resolveRepo(j.Repo, d.registry)
	if err != nil {
		r.Failed = append(r.Failed, err.Error())
		return r
	}
	r.Repo = reference.FamiliarName(repo)
	before, err := d.puller.localTags(ctx, repo)
	if err != nil {
		r.Failed = append(r.Failed, err.Error())
		return r
	}
	var tags []string
	for _, t := range slices.Sorted(maps.Keys(before)) {
		if _, named := j.Tags[t]; j.All || named {
			tags = append(tags, t)
		}
	}
	if len(tags) == 0 {
		d.log.Debug("no local tags to deploy", "repo", r.Repo, "all", j.All, "tags", slices.Collect(maps.Keys(j.Tags)))
		return r
	}

	pulled := map[string]bool{}
	for _, t := range tags {
		ref, err := reference.WithTag(repo, t)
		if err != nil {
			r.Tags = append(r.Tags, tagReport{Tag: t, OldID: before[t], PullErr: err})
			continue
		}
		if err := d.puller.pull(ctx, ref); err != nil {
			r.Tags = append(r.Tags, tagReport{Tag: t, OldID: before[t], NewID: before[t], PullErr: err})
			continue
		}
		pulled[t] = true
	}
	if len(pulled) == 0 {
		return r
	}
	after, err := d.puller.localTags(ctx, repo)
	if err != nil {
		r.Failed = append(r.Failed, err.Error())
		return r
	}
	// Only tags that pulled are checked: a failed pull leaves the tag
	// where it was, and pull before stop is the rule.
	current := map[string]string{}
	for _, t := range tags {
		if pulled[t] {
			r.Tags = append(r.Tags, tagReport{Tag: t, OldID: before[t], NewID: after[t]})
			if id, ok := after[t]; ok {
				current[t] = id
			}
		}
	}
	slices.SortFunc(r.Tags, func(a, b tagReport) int { return cmp.Compare(a.Tag, b.Tag) })

	stale, err := d.restarter.stale(ctx, repo, current)
	if err != nil {
		r.Failed = append(r.Failed, err.Error())
	}
	if d.dryRun {
		r.DryRun, r.Stale = true, stale
		d.metrics.wouldRestart.Add(float64(len(stale)))
		return r
	}
	if len(stale) == 0 {
		d.removeSuperseded(ctx, &r)
		return r
	}
	rolledOut := map[string]string{} // tag -> image ID now running
	for _, o := range d.rollout.replace(ctx, repo.Name(), stale) {
		switch {
		case o.skipped != "":
			r.Held = append(r.Held, fmt.Sprintf("%s (%s)", o.c.Name, o.skipped))
		case o.err != nil:
			r.Failed = append(r.Failed, o.err.Error())
		default:
			r.Stopped = append(r.Stopped, o.c)
			rolledOut[o.c.Tag] = o.c.NewID
		}
	}
	for tag, id := range rolledOut {
		d.rollout.clearHalt(ctx, repo.Name()+":"+tag, id)
	}
	stopped := r.Stopped
	// A tag that had moved before this pull (pulled by hand, or built
	// here) still replaced an image: report what the containers ran.
	for i, t := range r.Tags {
		for _, c := range stopped {
			if t.OldID == t.NewID && c.Tag == t.Tag {
				r.Tags[i].OldID = c.ImageID
			}
		}
	}
	d.removeSuperseded(ctx, &r)
	return r
}

// imageRemover removes images (-cleanup).
type imageRemover interface {
	// RemoveImageExtended removes an image; without Force, Docker refuses
	// while any container uses it, but removes an image by ID that has
	// one tag left, tag and all.
	RemoveImageExtended(name string, opts docker.RemoveImageOptions) error
	// ListImages lists images with their tags.
	ListImages(docker.ListImagesOptions) ([]docker.APIImages, error)
	// ListContainers lists containers; All includes stopped ones.
	ListContainers(docker.ListContainersOptions) ([]docker.APIContainers, error)
}

// removeSuperseded removes, after a deploy without failures, the images
// the deployed tags pointed at before, when no container uses them any
// more (Docker refuses otherwise, and that refusal is fine).
func (d *deployer) removeSuperseded(ctx context.Context, r *report) {
	if !d.cleanup || r.failed() || len(r.Held) > 0 {
		return
	}
	for _, t := range r.Tags {
		if t.OldID == "" || t.OldID == t.NewID {
			continue
		}
		// Check first: removing by ID would also drop the image's last
		// other tag, and a stopped container's image is still needed.
		if reason := d.imageStillNeeded(ctx, t.OldID); reason != "" {
			d.log.Info("superseded image kept", "image", shortID(t.OldID), "reason", reason)
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err := d.images.RemoveImageExtended(t.OldID, docker.RemoveImageOptions{Context: rctx})
		cancel()
		if err != nil {
			d.log.Info("superseded image kept", "image", shortID(t.OldID), "reason", err)
			continue
		}
		d.metrics.imagesRemoved.Inc()
		d.log.Info("removed superseded image", "image", shortID(t.OldID), "tag", r.Repo+":"+t.Tag)
	}
}

// imageStillNeeded says why image id must stay: another tag still names
// it, or a container (running or not) uses it; "" when it may go. When
// Docker cannot tell, the image stays.
func (d *deployer) imageStillNeeded(ctx context.Context, id string) string {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	images, err := d.images.ListImages(docker.ListImagesOptions{Context: ctx})
	if err != nil {
		return "cannot list images: " + err.Error()
	}
	for _, img := range images {
		if img.ID != id {
			continue
		}
		for _, tag := range img.RepoTags {
			if tag != "<none>:<none>" {
				return "still tagged " + tag
			}
		}
	}
	containers, err := d.images.ListContainers(docker.ListContainersOptions{
		All: true, Filters: map[string][]string{"ancestor": {id}}, Context: ctx,
	})
	if err != nil {
		return "cannot list containers: " + err.Error()
	}
	if len(containers) > 0 {
		c := containers[0]
		return fmt.Sprintf("used by container %s (%s)", strings.TrimPrefix(strings.Join(c.Names, ","), "/"), c.State)
	}
	return ""
}

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
