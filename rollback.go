package main

// rollback.go: a rollback puts an earlier version of an image tag back
// (README, Rollback): it finds the version in the deploy ledger, puts
// that version's manifest back under the tag in the registry, so that
// whatever pulls the tag (a supervisor's docker pull, the periodic
// re-pull, a node that restarts) gets the old version, then records the
// rollback in the ledger and writes a trigger with the old digest in the
// same transaction: every node rolls it out as a deploy.
//
// When the registry refuses the write (no push rights, a read-only
// registry), the rollback says so in one line and falls back to a
// fleet-wide pin of the old version (pin.go), recorded in the same
// transaction: every node keeps the tag on it for what it controls (the
// containers it re-creates, the local tag), and the answer names the
// containers whose supervisors may pull the tag and undo it.

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/distribution/reference"
	docker "github.com/fsouza/go-dockerclient"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// registryTimeout bounds each registry call of a rollback (a manifest
// read, a manifest write, their token exchanges and retries).
const registryTimeout = 30 * time.Second

// errRegistryRefused: the registry does not let us write the tag (no push
// rights, a read-only registry or mirror).
var errRegistryRefused = errors.New("not rolled back")

// errTagMoved: the registry's tag no longer names the halted version (a
// newer push came): the auto-rollback leaves it.
var errTagMoved = errors.New("not rolled back: a newer version was pushed")

// rollbackRequest is the body of POST /api/rollback, and what deployer
// rollback asks.
type rollbackRequest struct {
	Image string `json:"image"`        // repository:tag
	To    string `json:"to,omitempty"` // a digest, an image ID (12 hex digits or more) or a ledger version; "": the newest earlier version that rolled out
	// halted, for the auto-rollback: the image ID that must still be
	// the newest version, its digest still under the tag in the
	// registry (else errLedgerConflict, errTagMoved).
	halted string
}

// rollbackResult is what a recorded rollback answers.
type rollbackResult struct {
	Image       string `json:"image"`
	FromVersion int64  `json:"from_version"`
	FromImageID string `json:"from_image_id"`
	ToVersion   int64  `json:"to_version"` // the version whose image is back
	ImageID     string `json:"image_id"`
	Digest      string `json:"digest"`
	Version     int64  `json:"version"`  // the ledger version the rollback added
	Revision    int64  `json:"revision"` // the trigger's etcd revision
	// Refused: why the registry was not changed (its one line), when it
	// refused the write; the fleet is then Pinned to ToVersion instead.
	Refused string `json:"refused,omitempty"`
	Pinned  bool   `json:"pinned,omitempty"`
	// Unpinned: the version the tag was pinned to before, whose pin the
	// rollback lifted or replaced (0: none).
	Unpinned int64 `json:"unpinned,omitempty"`
	// Warnings name the containers of the tag under the stop strategy
	// (with Pinned): a supervisor that pulls the tag undoes the pin.
	Warnings []string `json:"warnings,omitempty"`
}

// rollbacker runs rollbacks.
type rollbacker struct {
	kv             clientv3.KV // confined to -etcd_prefix
	creds          *credentials
	registryDomain string // where bare names live (-registry)
	keep           int64  // -history
	timeout        time.Duration
	options        []remote.Option // tests: a transport
	now            func() time.Time
}

// newRollbacker returns a rollbacker that writes to the registry with the
// credentials of dockerCfg. It starts nothing.
func newRollbacker(kv clientv3.KV, dockerCfg, registryDomain string, keep int, log *slog.Logger) *rollbacker {
	return &rollbacker{
		kv: kv, creds: &credentials{path: dockerCfg, log: log}, registryDomain: registryDomain,
		keep: int64(max(keep, 1)), timeout: registryTimeout, now: time.Now,
	}
}

// parseRollbackImage reads repository:tag as the daemon reads a trigger's
// repository: bare names belong to -registry.
func parseRollbackImage(s, registryDomain string) (reference.NamedTagged, error) {
	full := s
	if !hasDomain(s) && registryDomain != dockerHub {
		full = registryDomain + "/" + s
	}
	named, err := reference.ParseNormalizedNamed(full)
	if err != nil {
		return nil, fmt.Errorf("%w: %q: %w", errUsage, s, err)
	}
	tagged, ok := named.(reference.NamedTagged)
	if _, digested := named.(reference.Digested); !ok || digested {
		return nil, fmt.Errorf("%w: %q: want repository:tag", errUsage, s)
	}
	return tagged, nil
}

// rollback puts req's target back under its tag and records it; it
// returns once the rollback is recorded (the nodes roll it out after).
func (rb *rollbacker) rollback(ctx context.Context, req rollbackRequest, asked askedBy) (rollbackResult, error) {
	ref, err := parseRollbackImage(req.Image, rb.registryDomain)
	if err != nil {
		return rollbackResult{}, err
	}
	rctx, cancel := context.WithTimeout(ctx, callTimeout)
	h, err := readHistory(rctx, rb.kv, historyFilter{name: ref.Name(), tag: ref.Tag(), bare: true}, rb.now())
	cancel()
	if err != nil {
		return rollbackResult{}, fmt.Errorf("read the deploy ledger of %s: %w", ref, err)
	}
	var versions []ledgerVersion // newest first
	if len(h.Tags) > 0 {
		versions = h.Tags[0].Versions
	}
	from, to, err := rollbackTarget(ref.String(), versions, req.To)
	if err != nil {
		return rollbackResult{}, err
	}
	if req.halted != "" {
		if from.ImageID != req.halted {
			return rollbackResult{}, fmt.Errorf("%w: %s version %d is not the halted %s", errLedgerConflict, ref, from.Version, shortID(req.halted))
		}
		if err := rb.stillTagged(ctx, ref, from.Digest, to.Digest); err != nil {
			return rollbackResult{}, err
		}
	}
	var refused string
	if err := rb.retag(ctx, ref, to.Digest); err != nil {
		if !errors.Is(err, errRegistryRefused) || req.halted != "" {
			return rollbackResult{}, err // an auto-rollback gives up (autorollback.go): the halt stays
		}
		refused = err.Error() // the fleet is pinned instead
	}
	now := rb.now().UTC()
	asked.Source = cmp.Or(asked.Source, "rollback")
	t := trigger{Time: now, Tag: ref.Tag(), Digest: to.Digest, Source: asked.Source, Remote: asked.Remote, Node: asked.Node}
	if refused != "" {
		t.Digest = "" // the registry still serves the bad one: every node pulls it, and its gate keeps the pinned one
	}
	val, err := json.Marshal(t)
	if err != nil {
		return rollbackResult{}, err
	}
	key := triggerKey(rb.triggerName(ctx, ref, from.Revision))
	extra := []clientv3.Op{clientv3.OpPut(key, string(val))}
	// A pin would hold the version the rollback puts back: the rollback
	// lifts it (or, refused, replaces it).
	pctx, cancel := context.WithTimeout(ctx, callTimeout)
	lifted, _, err := readPin(pctx, rb.kv, ref.String())
	cancel()
	if err != nil {
		return rollbackResult{}, err
	}
	if refused == "" && lifted != nil {
		extra = append(extra, clientv3.OpDelete(pinKey(ref.String())))
	}
	hctx, cancel := context.WithTimeout(ctx, callTimeout)
	lift, err := liftHalt(hctx, rb.kv, ref.String(), to.ImageID)
	cancel()
	if err != nil {
		return rollbackResult{}, err
	}
	extra = append(extra, lift...)
	if refused != "" {
		pin, err := json.Marshal(pinRecord{Image: ref.String(), Version: to.Version, ImageID: to.ImageID, Digest: to.Digest,
			AskedBy: asked, Time: now, Reason: refused})
		if err != nil {
			return rollbackResult{}, err
		}
		extra = append(extra, clientv3.OpPut(pinKey(ref.String()), string(pin)))
	}
	wctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	v, rev, err := recordRollback(wctx, rb.kv, rollbackRecord{Ref: ref.String(), From: from.Version, To: to, Asked: asked, Time: now, Keep: rb.keep},
		extra...)
	if err != nil {
		if refused != "" {
			return rollbackResult{}, fmt.Errorf("%s; the pin of version %d that stands in for it was not recorded either: %w", refused, to.Version, err)
		}
		return rollbackResult{}, fmt.Errorf("the registry's %s is %s again, but the rollback was not recorded (run it again): %w",
			reference.FamiliarString(ref), shortDigest(to.Digest), err)
	}
	res := rollbackResult{
		Image: ref.String(), FromVersion: from.Version, FromImageID: from.ImageID, ToVersion: to.Version,
		ImageID: to.ImageID, Digest: to.Digest, Version: v.Version, Revision: rev, Refused: refused, Pinned: refused != "",
	}
	if lifted != nil {
		res.Unpinned = lifted.Version
	}
	if res.Pinned {
		res.Warnings, _ = stopStrategyContainers(wctx, rb.kv, ref.String())
	}
	return res, nil
}

// lines is what a rollback says to people: what it did, and with a
// pin, the line why the registry was not changed, the pin, and the
// warning naming the containers whose supervisors would undo it.
func (res rollbackResult) lines(asked askedBy) []string {
	img := familiar(res.Image)
	var lifted string
	if res.Unpinned != 0 {
		lifted = fmt.Sprintf("; the pin to version %d is lifted", res.Unpinned)
	}
	if !res.Pinned {
		return []string{fmt.Sprintf("%s rolled back by %s: from version %d (%s) to version %d's image %s (%s), recorded as version %d at revision %d; every node rolls it out now",
			img, asked.who(), res.FromVersion, shortID(res.FromImageID), res.ToVersion, shortID(res.ImageID), shortDigest(res.Digest), res.Version, res.Revision) + lifted}
	}
	out := []string{
		res.Refused,
		fmt.Sprintf("%s is pinned fleet-wide to version %d (%s) instead, by %s: version %d (%s) recorded as rolled back and quarantined; every node re-creates its recreate-strategy containers on version %d and points its local tag at it; deployer unpin %s ends the pin",
			img, res.ToVersion, shortID(res.ImageID), asked.who(), res.FromVersion, shortID(res.FromImageID), res.ToVersion, img) + strings.Replace(lifted, "is lifted", "is replaced", 1),
	}
	if w := pinWarning(res.Image, res.Warnings); w != "" {
		out = append(out, w)
	}
	return out
}

// rollbackTarget picks, in versions (newest first), the version rolled
// back (the newest) and the one to go back to: the one to names, else the
// newest earlier version that rolled out.
func rollbackTarget(ref string, versions []ledgerVersion, to string) (from, target ledgerVersion, err error) {
	if len(versions) == 0 {
		return from, target, fmt.Errorf("%w: %s has no version in the deploy ledger", errLedgerTarget, ref)
	}
	from = versions[0]
	var found bool
	if to == "" {
		for _, v := range versions[1:] {
			if v.Outcome == outcomeRolledOut && v.ImageID != from.ImageID {
				target, found = v, true
				break
			}
		}
		if !found {
			return from, target, fmt.Errorf("%w: %s has no earlier version that rolled out (see deployer history; -to names one)", errLedgerTarget, ref)
		}
	} else {
		if target, found, err = findVersion(versions, to); err != nil {
			return from, target, err
		}
		if !found {
			return from, target, fmt.Errorf("%w: no version of %s in the deploy ledger is %q (see deployer history)", errLedgerTarget, ref, to)
		}
	}
	if target.ImageID == from.ImageID {
		return from, target, fmt.Errorf("%w: %s version %d is image %s already", errLedgerTarget, ref, from.Version, shortID(from.ImageID))
	}
	if target.Digest == "" {
		return from, target, fmt.Errorf("%w: %s version %d has no manifest digest recorded; it cannot be put back", errLedgerTarget, ref, target.Version)
	}
	return from, target, nil
}

// findVersion finds the newest version that to names: a ledger version
// number, a manifest digest or an image ID, whole or a prefix of at least
// 12 hex digits. A prefix that names different images is an error.
func findVersion(versions []ledgerVersion, to string) (ledgerVersion, bool, error) {
	if n, err := strconv.ParseInt(to, 10, 64); err == nil && len(to) < 12 {
		for _, v := range versions {
			if v.Version == n {
				return v, true, nil
			}
		}
		return ledgerVersion{}, false, nil
	}
	hex := strings.TrimPrefix(strings.ToLower(to), "sha256:")
	if !hexID.MatchString(hex) {
		return ledgerVersion{}, false, fmt.Errorf("%w: -to %q is not a ledger version, a digest or an image ID", errUsage, to)
	}
	var match ledgerVersion
	var found bool
	for _, v := range versions {
		if !strings.HasPrefix(strings.TrimPrefix(v.ImageID, "sha256:"), hex) && !strings.HasPrefix(strings.TrimPrefix(v.Digest, "sha256:"), hex) {
			continue
		}
		if found && match.ImageID != v.ImageID {
			return ledgerVersion{}, false, fmt.Errorf("%w: %q names versions %d and %d, different images; give more digits", errUsage, to, match.Version, v.Version)
		}
		if !found {
			match, found = v, true
		}
	}
	return match, found, nil
}

// remoteOptions are the options of a registry call to domain: the tests'
// transport, the credentials of -dockercfg.
func (rb *rollbacker) remoteOptions(ctx context.Context, domain string) ([]remote.Option, error) {
	opts := append([]remote.Option{}, rb.options...)
	cred, err := rb.creds.lookup(ctx, domain)
	if err != nil {
		return nil, fmt.Errorf("registry credentials for %s: %w", domain, err)
	}
	if cred != (docker.AuthConfiguration{}) {
		opts = append(opts, remote.WithAuth(authn.FromConfig(authn.AuthConfig{
			Username: cred.Username, Password: cred.Password, IdentityToken: cred.IdentityToken, RegistryToken: cred.RegistryToken,
		})))
	}
	return opts, nil
}

// stillTagged checks that the registry's ref still names from (the
// halted version) or to (a rollback done already): errTagMoved when a
// newer push came. An unknown from is not checked.
func (rb *rollbacker) stillTagged(ctx context.Context, ref reference.NamedTagged, from, to string) error {
	if from == "" {
		return nil
	}
	domain := reference.Domain(ref)
	opts, err := rb.remoteOptions(ctx, domain)
	if err != nil {
		return err
	}
	tag, err := name.NewTag(ref.String())
	if err != nil {
		return fmt.Errorf("%w: %s: %w", errBadReference, ref, err)
	}
	hctx, cancel := context.WithTimeout(ctx, rb.timeout)
	defer cancel()
	desc, err := remote.Head(tag, append(opts, remote.WithContext(hctx))...)
	if err != nil {
		return fmt.Errorf("registry %s: read %s: %w", domain, reference.FamiliarString(ref), err)
	}
	if d := desc.Digest.String(); d != from && d != to {
		return fmt.Errorf("%w: registry %s has %s under %s, not the halted %s", errTagMoved, domain, shortDigest(d),
			reference.FamiliarString(ref), shortDigest(from))
	}
	return nil
}

// retag puts the manifest ref's repository has at digest back under ref's
// tag.
func (rb *rollbacker) retag(ctx context.Context, ref reference.NamedTagged, digest string) error {
	domain := reference.Domain(ref)
	opts, err := rb.remoteOptions(ctx, domain)
	if err != nil {
		return err
	}
	src, err := name.NewDigest(ref.Name() + "@" + digest)
	if err != nil {
		return fmt.Errorf("%w: %s@%s: %w", errBadReference, ref.Name(), digest, err)
	}
	dst, err := name.NewTag(ref.String())
	if err != nil {
		return fmt.Errorf("%w: %s: %w", errBadReference, ref, err)
	}
	gctx, cancel := context.WithTimeout(ctx, rb.timeout)
	desc, err := remote.Get(src, append(opts, remote.WithContext(gctx))...)
	cancel()
	if err != nil {
		return fmt.Errorf("registry %s: read %s@%s: %w", domain, reference.FamiliarName(ref), shortDigest(digest), err)
	}
	pctx, cancel := context.WithTimeout(ctx, rb.timeout)
	defer cancel()
	if err := remote.Tag(dst, desc, append(opts, remote.WithContext(pctx))...); err != nil {
		if reason, ok := refusal(err); ok {
			return fmt.Errorf("%w: registry %s refused to put %s back under %s: %s",
				errRegistryRefused, domain, shortDigest(digest), reference.FamiliarString(ref), reason)
		}
		return fmt.Errorf("registry %s: put %s back under %s: %w", domain, shortDigest(digest), reference.FamiliarString(ref), err)
	}
	return nil
}

// refusal says why the registry refused a write, when it did: no push
// rights (401, 403) or a read-only registry (405, UNSUPPORTED).
func refusal(err error) (string, bool) {
	var te *transport.Error
	if !errors.As(err, &te) {
		return "", false
	}
	code := ""
	if len(te.Errors) > 0 {
		code = string(te.Errors[0].Code)
	}
	switch {
	case te.StatusCode == http.StatusUnauthorized || code == string(transport.UnauthorizedErrorCode):
		return fmt.Sprintf("no push rights with the credentials of -dockercfg (%d %s)", te.StatusCode, http.StatusText(te.StatusCode)), true
	case te.StatusCode == http.StatusForbidden || code == string(transport.DeniedErrorCode):
		return fmt.Sprintf("push denied (%d %s)", te.StatusCode, http.StatusText(te.StatusCode)), true
	case te.StatusCode == http.StatusMethodNotAllowed || code == string(transport.UnsupportedErrorCode):
		return fmt.Sprintf("the registry is read-only (%d %s)", te.StatusCode, http.StatusText(te.StatusCode)), true
	}
	return "", false
}

// triggerName is the repository of the trigger key the bad version came
// by (rev), so that the rollback's trigger replaces it (a node that
// replays triggers after a restart sees the rollback's); else ref's
// repository, with its registry host.
func (rb *rollbacker) triggerName(ctx context.Context, ref reference.Named, rev int64) string {
	if rev > 0 {
		ctx, cancel := context.WithTimeout(ctx, callTimeout)
		defer cancel()
		resp, err := rb.kv.Get(ctx, triggersPrefix, clientv3.WithPrefix(), clientv3.WithRev(rev),
			clientv3.WithMinModRev(rev), clientv3.WithMaxModRev(rev), clientv3.WithKeysOnly())
		if err == nil {
			for _, kv := range resp.Kvs {
				if repo, ok := repoFromKey(string(kv.Key)); ok {
					if named, err := resolveRepo(repo, rb.registryDomain); err == nil && named.Name() == ref.Name() {
						return repo
					}
				}
			}
		}
	}
	return ref.Name()
}

// POST /api/rollback {"image":"repository:tag","to":"…"}
//
// deployer rollback over HTTP, with the webhooks' secret; answered when
// the rollback is recorded.
func rollbackHandler(h *webhook, rb *rollbacker, node string, say func(string)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		const source = "rollback"
		body, ok := h.accept(w, r, source)
		if !ok {
			return
		}
		var req rollbackRequest
		if err := json.Unmarshal(body, &req); err != nil {
			h.fail(w, r, source, http.StatusBadRequest, fmt.Errorf("want {\"image\":\"repository:tag\",\"to\":\"…\"}: %w", err))
			return
		}
		if req.Image == "" {
			h.fail(w, r, source, http.StatusBadRequest, errors.New(`want {"image":"repository:tag","to":"…"}: no image`))
			return
		}
		h.log.Info("rollback request", "image", req.Image, "to", req.To, "remote", r.RemoteAddr)
		asked := askedBy{Command: "POST /api/rollback", Host: node, Node: node, Remote: r.RemoteAddr}
		res, err := rb.rollback(r.Context(), req, asked)
		if err != nil {
			code := http.StatusServiceUnavailable
			switch {
			case errors.Is(err, errUsage), errors.Is(err, errLedgerTarget):
				code = http.StatusBadRequest
			case errors.Is(err, errRegistryRefused):
				code = http.StatusBadGateway
			}
			h.fail(w, r, source, code, err)
			return
		}
		h.log.Info("rolled back", "image", res.Image, "from_version", res.FromVersion, "to_version", res.ToVersion,
			"digest", res.Digest, "version", res.Version, "revision", res.Revision, "pinned", res.Pinned, "refused", res.Refused)
		if say != nil {
			say(":rewind: " + strings.Join(res.lines(asked), "\n"))
		}
		h.metrics.webhooks.WithLabelValues(source, "ok").Inc()
		writeJSON(w, http.StatusOK, res)
	}
}
