package main

// gate.go: the one decision "may this version replace containers on this
// node now", asked per image tag after the pull (pulling ahead is allowed:
// a release is then fast) and before anything is stopped or re-created.
// Each hold is a condition asked in turn, first a pin, then the
// quarantine. A held version stops and re-creates nothing on this node;
// it is not a failure and not a retry (the trigger is done); the ledger
// records the hold on the version, with its reason; the local tag goes
// back to the image it named before the pull, so that a unit that
// restarts from it without pulling does not start the held version. A
// release writes the tag's trigger again (pin.go), so every node deploys
// through the ordinary path.

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/distribution/reference"
	docker "github.com/fsouza/go-dockerclient"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// hold is the gate's answer for one version of one tag.
type hold struct {
	Reason string // "": the version may replace containers here
	// Pin is the tag's pin when a pin holds the version: the node keeps
	// the tag on the pinned image instead.
	Pin *pinRecord
}

// gateAPI is what the gate needs from Docker.
type gateAPI interface {
	// TagImage points a local tag at an image.
	TagImage(name string, opts docker.TagImageOptions) error
	// InspectImageWithContext tells whether an image is here.
	InspectImageWithContext(ctx context.Context, name string) (*docker.Image, error)
	// PullImage pulls the pinned image by its digest when it is not here.
	PullImage(opts docker.PullImageOptions, auth docker.AuthConfiguration) error
}

// gate decides, per tag, whether a version may replace containers here.
type gate struct {
	kv          clientv3.KV // confined to -etcd_prefix
	quarantine  *quarantine
	docker      gateAPI
	ledger      *ledger // records holds; nil records nothing
	creds       *credentials
	callTimeout time.Duration
	log         *slog.Logger
}

// newGate returns the gate of this node, reading the holds through kv and
// pulling a pinned image it lacks with the credentials of dockerCfg. It
// starts nothing.
func newGate(kv clientv3.KV, dc gateAPI, dockerCfg string, led *ledger, log *slog.Logger) *gate {
	return &gate{kv: kv, quarantine: &quarantine{kv: kv}, docker: dc, ledger: led, creds: &credentials{path: dockerCfg, log: log},
		callTimeout: callTimeout, log: log}
}

// check asks each condition in turn whether imageID may replace ref's
// containers here: a pin (the pinned image itself always may: pinning it
// is an operator's explicit deploy, quarantined or not), then the
// quarantine.
func (g *gate) check(ctx context.Context, ref reference.NamedTagged, imageID string) (hold, error) {
	gctx, cancel := context.WithTimeout(ctx, g.callTimeout)
	p, _, err := readPin(gctx, g.kv, ref.String())
	cancel()
	if err != nil {
		return hold{}, err
	}
	if p != nil {
		if p.ImageID == imageID {
			return hold{}, nil
		}
		return hold{Reason: fmt.Sprintf("held by pin to version %d (%s) by %s", p.Version, shortID(p.ImageID), p.AskedBy.who()), Pin: p}, nil
	}
	reason, err := g.quarantine.hold(ctx, ref, imageID)
	if err != nil {
		return hold{}, err
	}
	return hold{Reason: reason}, nil
}

// apply runs the gate over current (tag -> image ID the pull brought),
// in place: a held tag leaves current (none of its containers is
// replaced), and its local tag goes back to the image its containers run
// (stale finds them), else to the one it named before the pull; a pinned tag's entry becomes the pinned image (the
// containers this node re-creates go onto it) and its local tag points
// at it. It returns the pinned tags (tag -> pin); ok is false when a
// hold could not be read (etcd): r says so and the deploy is retried.
func (g *gate) apply(ctx context.Context, repo reference.Named, j job, current map[string]string, stale staleFunc, r *report) (pinned map[string]*pinRecord, ok bool) {
	if g == nil {
		return nil, true
	}
	for _, t := range slices.Sorted(maps.Keys(current)) {
		ref, err := reference.WithTag(repo, t)
		if err != nil {
			continue
		}
		id := current[t]
		h, err := g.check(ctx, ref, id)
		if err != nil {
			r.Failed = append(r.Failed, fmt.Errorf("the holds of %s: %w", reference.FamiliarString(ref), err))
			return nil, false
		}
		if h.Reason == "" {
			continue
		}
		g.ledger.held(j, ref, id, h.Reason)
		tr := tagReportOf(r, t)
		if h.Pin != nil && g.fetch(ctx, ref, h.Pin) {
			g.log.Info("version held; the tag stays on the pinned image", "image", reference.FamiliarString(ref), "image_id", shortID(id), "why", h.Reason)
			if g.point(ctx, ref, h.Pin.ImageID, id) && tr != nil {
				tr.NewID = h.Pin.ImageID
			}
			current[t] = h.Pin.ImageID
			if pinned == nil {
				pinned = map[string]*pinRecord{}
			}
			pinned[t] = h.Pin
			continue
		}
		if h.Pin != nil {
			g.log.Warn("the pinned image is not on this node and could not be pulled: nothing replaced", "image", reference.FamiliarString(ref), "pinned", shortID(h.Pin.ImageID))
		}
		g.log.Info("version held", "image", reference.FamiliarString(ref), "image_id", shortID(id), "why", h.Reason)
		delete(current, t)
		back := runningImage(ctx, stale, repo, t, id)
		if back == "" && tr != nil {
			back = tr.OldID
		}
		if back != "" && back != id && g.point(ctx, ref, back, id) && tr != nil {
			tr.NewID = back
		}
	}
	return pinned, true
}

// staleFunc lists the containers of repo started by one of the tags in
// current that run another image than current says (replacer.stale).
type staleFunc func(ctx context.Context, repo reference.Named, current map[string]string) ([]staleContainer, error)

// runningImage is the one image the containers of tag t run, when they
// run another than id and all the same one; "" otherwise. A held tag
// goes back to it: the pull that brought id may have been an earlier one
// (the deploy whose version then halted), so the tag's image before this
// pull is not enough.
func runningImage(ctx context.Context, stale staleFunc, repo reference.Named, t, id string) string {
	if stale == nil {
		return ""
	}
	cs, err := stale(ctx, repo, map[string]string{t: id})
	if err != nil || len(cs) == 0 {
		return ""
	}
	for _, c := range cs[1:] {
		if c.ImageID != cs[0].ImageID {
			return ""
		}
	}
	return cs[0].ImageID
}

// tagReportOf is r's report of tag t; nil when there is none.
func tagReportOf(r *report, t string) *tagReport {
	for i := range r.Tags {
		if r.Tags[i].Tag == t {
			return &r.Tags[i]
		}
	}
	return nil
}

// fetch makes sure the pinned image is on this node (a node that joined
// after the pin, or whose -cleanup removed it): it pulls it by its
// manifest digest when it is not. false when it is not here after.
func (g *gate) fetch(ctx context.Context, ref reference.NamedTagged, p *pinRecord) bool {
	if g.local(ctx, p.ImageID) {
		return true
	}
	if p.Digest == "" {
		return false
	}
	pctx, cancel := context.WithTimeout(ctx, pullTimeout)
	defer cancel()
	auth, err := g.creds.lookup(pctx, reference.Domain(ref))
	if err != nil {
		g.log.Warn("no registry credentials, pulling anonymously", "registry", reference.Domain(ref), "err", err)
	}
	// Docker takes a digest where a tag goes (fromImage=repo&tag=sha256:…).
	err = g.docker.PullImage(docker.PullImageOptions{Repository: ref.Name(), Tag: p.Digest, InactivityTimeout: time.Minute, Context: pctx}, auth)
	if err != nil {
		g.log.Warn("could not pull the pinned image", "image", reference.FamiliarName(ref)+"@"+p.Digest, "err", err)
		return false
	}
	g.log.Info("pulled the pinned image", "image", reference.FamiliarName(ref)+"@"+p.Digest, "image_id", shortID(p.ImageID))
	return g.local(ctx, p.ImageID)
}

// local reports whether image id is on this node.
func (g *gate) local(ctx context.Context, id string) bool {
	ctx, cancel := context.WithTimeout(ctx, g.callTimeout)
	defer cancel()
	_, err := g.docker.InspectImageWithContext(ctx, id)
	return err == nil
}

// point points the local tag ref at image id (it names from now); false
// when it could not (logged: a unit that starts the tag without pulling
// then starts from).
func (g *gate) point(ctx context.Context, ref reference.NamedTagged, id, from string) bool {
	if id == from {
		return true
	}
	ctx, cancel := context.WithTimeout(ctx, g.callTimeout)
	defer cancel()
	err := g.docker.TagImage(id, docker.TagImageOptions{Repo: ref.Name(), Tag: ref.Tag(), Force: true, Context: ctx})
	if err != nil {
		g.log.Warn("could not point the local tag away from the held version", "image", reference.FamiliarString(ref), "image_id", shortID(id), "held", shortID(from), "err", err)
		return false
	}
	g.log.Info("local tag moved off the held version", "image", reference.FamiliarString(ref), "image_id", shortID(id), "held", shortID(from))
	return true
}

// pinnedStops takes out of stale the containers of a pinned tag that are
// replaced with the stop strategy: their supervisor starts the tag, and
// one that pulls first would start the registry's version, which a stop
// would only repeat. Their names are warned about: the local tag points
// at the pinned image, so a unit that does not pull starts it at its
// next restart.
func (g *gate) pinnedStops(stale []staleContainer, pinned map[string]*pinRecord, strategyOf func(staleContainer) string) []staleContainer {
	if len(pinned) == 0 {
		return stale
	}
	var kept []staleContainer
	var names []string
	for _, c := range stale {
		if pinned[c.Ref.Tag()] != nil && strategyOf(c) == strategyStop {
			names = append(names, c.Name)
			continue
		}
		kept = append(kept, c)
	}
	if len(names) > 0 {
		g.log.Warn("pinned tag: containers under the stop strategy left alone; a supervisor that pulls the tag before it runs it would undo the pin",
			"containers", strings.Join(names, ","))
	}
	return kept
}

// unpinned is current without the pinned tags: a pinned tag's containers
// that the node left alone (stop strategy) may never run the pinned
// image, so the ledger does not wait for them to; those it re-created
// are recorded as any replacement.
func unpinned(current map[string]string, pinned map[string]*pinRecord) map[string]string {
	if len(pinned) == 0 {
		return current
	}
	out := maps.Clone(current)
	maps.DeleteFunc(out, func(t, _ string) bool { return pinned[t] != nil })
	return out
}
