package main

// deploy.go: one deploy of one repository on this node, from a job to a
// report: pull the local tags, replace the containers still running the
// old images, tell Slack, and remove superseded images with -cleanup.

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
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
	puller   *puller
	replacer *replacer
	notifier notifier
	node     string
	opts     deployOptions
	ledger   *ledger   // the deploy ledger; nil records nothing
	gate     *gate     // the holds (gate.go); nil holds nothing
	canaries *canaries // the canary hold (canary.go); nil holds nothing
	images   imageRemover
	log      *slog.Logger
	metrics  *metrics

	policies *policies // the tags' rollout policies; nil: the flags'
	holds    *holds    // freezes and windows; nil: none
}

// deployOptions are the flags that change what a deploy does.
type deployOptions struct {
	dryRun  bool // -dry_run: report stale containers, stop nothing
	cleanup bool // -cleanup: remove superseded images no container uses
	// keepImages (-keep_images): with cleanup, the images of the last N
	// versions of each tag stay; 0 is taken as 1 (the version deployed).
	keepImages int
}

// newDeployer returns a deployer of this node's containers through the
// replacer, telling note. It starts nothing.
func newDeployer(p *puller, rep *replacer, images imageRemover, note notifier, node string, opts deployOptions, led *ledger, log *slog.Logger, m *metrics) *deployer {
	return &deployer{
		puller: p, replacer: rep, images: images, notifier: note, node: node, opts: opts, ledger: led, log: log, metrics: m,
	}
}

// deploy runs one deploy of a job and reports it. It returns what failed,
// joined, or nil: the queue retries the job when the error is retryable
// (retry.go). Slack hears of the first failure of a job and of its
// recovery, not of every retry; a final failure is always told. A pushed
// digest not served yet is retried quietly: only giving up is told.
func (d *deployer) deploy(ctx context.Context, j job) error {
	start := time.Now()
	seen := start
	if !j.Seen.IsZero() {
		seen = j.Seen
	}
	r := d.run(ctx, j)
	err := r.err()
	retry := err != nil && retryable(err)
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
	attrs := []any{"repo", j.Repo.Name(), "result", result, "duration", time.Since(start).Round(time.Millisecond),
		"tags", len(r.Tags), "stopped", len(r.Stopped), "failures", len(r.Failed), "attempt", j.Attempts + 1}
	if err != nil {
		attrs = append(attrs, "err", err, "retry", retry)
	}
	d.log.Log(ctx, level, "deploy finished", attrs...)
	if cancelledAtShutdown(ctx) {
		return errors.Join(err, ctx.Err()) // told nobody: the next start replays the trigger
	}
	switch {
	case retry && (j.Told || quietRetry(err)):
		return err // told at the first failure, or a digest not served yet
	case retry:
		r.Retrying = true
	case j.Told && err == nil:
		r.Recovered, r.Since = j.Attempts, j.FirstFail
	}
	if r.worthTelling() {
		d.notifier.notify(r)
	}
	return err
}

// run runs the phases of one deploy: pull the tags, replace the stale
// containers, clean up.
func (d *deployer) run(ctx context.Context, j job) report {
	repo := j.Repo // resolved once, by daemon.submit
	r := report{Node: d.node, Repo: reference.FamiliarName(repo)}
	current, ok := d.pullTags(ctx, repo, j, &r)
	if !ok {
		return r
	}
	stale, pinned, ok := d.replaceable(ctx, repo, j, current, &r)
	if !ok {
		return r
	}
	if d.opts.dryRun {
		r.DryRun, r.Stale = true, stale
		d.metrics.wouldRestart.Add(float64(len(stale)))
		return r
	}
	var outs []outcome
	if len(stale) > 0 {
		outs = d.replaceStale(ctx, stale, &r)
	}
	d.ledger.deployed(j, repo, unpinned(current, pinned), outs) // never blocks
	d.removeSuperseded(ctx, &r)
	return r
}

// applyPolicies gives each stale container its tag's replacement
// settings (tagpolicy.go), read once per tag; a policy that cannot be
// read leaves the flags' settings, and says so.
func (d *deployer) applyPolicies(ctx context.Context, stale []staleContainer) {
	if d.policies == nil {
		return
	}
	byRef := map[string]*tagPolicy{}
	for i, c := range stale {
		ref := c.Ref.String()
		tp, ok := byRef[ref]
		if !ok {
			var err error
			if tp, _, err = d.policies.forTag(ctx, ref); err != nil {
				d.log.Warn("rollout policy not read; using the flags'", "ref", ref, "err", err)
			}
			byRef[ref] = tp
		}
		stale[i].policy = tp
	}
}

// replaceable decides, after the pull, which containers this deploy may
// replace now: every hold in one place, in this order. A pin or the
// quarantine (gate.go) holds a tag and puts it back (ok is false when the
// holds could not be read: the deploy fails and is retried); a freeze or
// a closed window (hold.go) holds a tag; the stale containers of what is
// left are found, those a pin holds are left to their supervisors, each
// gets its tag's rollout policy, and a canary rollout (canary.go) holds
// the tags it has not promoted on this node. pinned are the tags a pin
// keeps on its version (the ledger records their image, not the pull's).
func (d *deployer) replaceable(ctx context.Context, repo reference.Named, j job, current map[string]string, r *report) (stale []staleContainer, pinned map[string]*pinRecord, ok bool) {
	pinned, ok = d.gate.apply(ctx, repo, j, current, d.replacer.stale, r)
	if !ok {
		return nil, nil, false
	}
	d.holds.holdTags(ctx, repo, j, current, r)
	stale, err := d.replacer.stale(ctx, repo, current)
	if err != nil {
		r.Failed = append(r.Failed, err)
	}
	stale = d.gate.pinnedStops(stale, pinned, d.replacer.strategyOf)
	d.applyPolicies(ctx, stale)
	return d.canaries.filter(ctx, stale, current, j, r), pinned, true
}

// pullTags pulls the local tags of repo the job names, and reports each
// in r. current is what each tag that pulled points at now (tag -> image
// ID); ok is false when nothing is to be replaced (no local tag, no pull
// succeeded, or the images could not be told).
func (d *deployer) pullTags(ctx context.Context, repo reference.Named, j job, r *report) (current map[string]string, ok bool) {
	// One listing before the pulls; after each pull, what its progress
	// stream said: up to date, the tag names what the listing said;
	// otherwise one inspect of the tag.
	before, digests, err := d.puller.localImages(ctx, repo)
	if err != nil {
		r.Failed = append(r.Failed, err)
		return nil, false
	}
	var tags []string
	for _, t := range slices.Sorted(maps.Keys(before)) {
		if _, named := j.Tags[t]; j.All || named {
			tags = append(tags, t)
		}
	}
	if len(tags) == 0 {
		d.log.Debug("no local tags to deploy", "repo", r.Repo, "all", j.All, "tags", slices.Collect(maps.Keys(j.Tags)))
		return nil, false
	}

	// Only tags that pulled are checked: a failed pull leaves the tag
	// where it was, and pull before stop is the rule. A tag whose trigger
	// named a manifest digest that the pull did not bring (the registry
	// or its CDN still served the previous one) counts as a failed pull.
	var (
		pulledTags int
		checked    []tagReport
		inspectErr error
	)
	current = map[string]string{}
	for _, t := range tags {
		ref, err := reference.WithTag(repo, t)
		if err != nil {
			r.Tags = append(r.Tags, tagReport{Tag: t, OldID: before[t], PullErr: fmt.Errorf("%w: %w", errBadReference, err)})
			continue
		}
		p, err := d.puller.pull(ctx, ref)
		if err != nil {
			r.Tags = append(r.Tags, tagReport{Tag: t, OldID: before[t], NewID: before[t], PullErr: err})
			continue
		}
		pulledTags++
		id, known := before[t], digests[before[t]]
		if !p.upToDate {
			if id, known, err = d.puller.image(ctx, ref); err != nil {
				inspectErr = cmp.Or(inspectErr, err)
				continue
			}
		}
		if want := j.Digests[t]; want != "" && want != p.digest && !slices.Contains(known, want) {
			err := fmt.Errorf("%w: %s:%s is %s, pushed %s", errDigestMismatch, r.Repo, t, shortID(id), want)
			if !j.DigestSince.IsZero() && time.Since(j.DigestSince) >= digestWait {
				err = fmt.Errorf("%w within %v: %s:%s is %s, pushed %s", errDigestGaveUp, digestWait, r.Repo, t, shortID(id), want)
			}
			checked = append(checked, tagReport{Tag: t, OldID: before[t], NewID: id, PullErr: err})
			continue
		}
		checked = append(checked, tagReport{Tag: t, OldID: before[t], NewID: id})
		if id != "" {
			current[t] = id
		}
	}
	if pulledTags == 0 {
		return nil, false
	}
	if inspectErr != nil { // as a failed listing: nothing is stopped
		r.Failed = append(r.Failed, inspectErr)
		return nil, false
	}
	r.Tags = append(r.Tags, checked...)
	slices.SortFunc(r.Tags, func(a, b tagReport) int { return cmp.Compare(a.Tag, b.Tag) })
	return current, true
}

// replaceStale replaces the stale containers and reports each in r.
func (d *deployer) replaceStale(ctx context.Context, stale []staleContainer, r *report) []outcome {
	outs := d.replacer.replace(ctx, stale)
	for _, o := range outs {
		switch {
		case o.quiet:
			d.log.Debug("left alone, as reported before", "container", o.c.Name, "why", o.skipped)
		case o.skipped != "":
			r.Held = append(r.Held, fmt.Sprintf("%s (%s)", o.c.Name, o.skipped))
		case o.err != nil:
			r.Failed = append(r.Failed, o.err)
		default:
			r.Stopped = append(r.Stopped, o.c)
		}
	}
	// A tag that had moved before this pull (pulled by hand, or built
	// here) still replaced an image: report what the containers ran.
	for i, t := range r.Tags {
		for _, c := range r.Stopped {
			if t.OldID == t.NewID && c.Ref.Tag() == t.Tag {
				r.Tags[i].OldID = c.ImageID
			}
		}
	}
	return outs
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
	if !d.opts.cleanup || r.failed() || len(r.Held) > 0 {
		return
	}
	for _, t := range r.Tags {
		if t.OldID == "" || t.OldID == t.NewID {
			continue
		}
		for _, id := range d.removable(ctx, r.Repo, t) {
			d.removeImage(ctx, id, r.Repo+":"+t.Tag)
		}
	}
}

// removable lists the images of tag t that -keep_images lets go, among
// those on this node: the tag's versions, newest first, are the one now
// deployed, the one it replaced (a rollback's target), then those of the
// deploy ledger; the first keepImages of them stay. Without the ledger,
// only the one replaced is considered.
func (d *deployer) removable(ctx context.Context, repo string, t tagReport) []string {
	keep := max(d.opts.keepImages, 1)
	order := []string{t.NewID, t.OldID}
	if d.ledger != nil {
		if named, err := reference.ParseNormalizedNamed(repo); err == nil {
			if ref, err := reference.WithTag(named, t.Tag); err == nil {
				ids, err := d.ledger.recentImages(ctx, ref.String())
				if err != nil {
					d.log.Info("cleanup: the deploy ledger cannot be read; only the image replaced is considered", "image", ref.String(), "err", err)
				}
				order = append(order, ids...)
			}
		}
	}
	var distinct []string
	for _, id := range order {
		if id != "" && !slices.Contains(distinct, id) {
			distinct = append(distinct, id)
		}
	}
	if len(distinct) <= keep {
		return nil
	}
	candidates := distinct[keep:]
	if len(candidates) == 1 && candidates[0] == t.OldID {
		return candidates
	}
	// Older versions' images: only those still on this node.
	lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	images, err := d.images.ListImages(docker.ListImagesOptions{Context: lctx})
	if err != nil {
		d.log.Info("cleanup: cannot list images", "err", err)
		return nil
	}
	var out []string
	for _, id := range candidates {
		if slices.ContainsFunc(images, func(img docker.APIImages) bool { return img.ID == id }) {
			out = append(out, id)
		}
	}
	return out
}

// removeImage removes image id, superseded under tag, unless something
// still needs it.
func (d *deployer) removeImage(ctx context.Context, id, tag string) {
	// Check first: removing by ID would also drop the image's last
	// other tag, and a stopped container's image is still needed.
	if reason := d.imageStillNeeded(ctx, id); reason != "" {
		d.log.Info("superseded image kept", "image", shortID(id), "needed_by", reason)
		return
	}
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err := d.images.RemoveImageExtended(id, docker.RemoveImageOptions{Context: rctx})
	cancel()
	if err != nil {
		d.log.Info("superseded image kept", "image", shortID(id), "err", err)
		return
	}
	d.metrics.imagesRemoved.Inc()
	d.log.Info("removed superseded image", "image", shortID(id), "tag", tag)
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
