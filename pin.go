package main

// pin.go: pins (README, Pins). A pin keeps an image tag on one version
// fleet-wide: its record in etcd (_pin/<image ref>) names the version, and
// every node's gate (gate.go) holds any other version of the tag, puts the
// node's recreate-strategy containers on the pinned image and points the
// local tag at it, so that units that do not pull start it too. Pinning
// and unpinning each write the tag's trigger in the transaction that
// changes the pin, so that every node acts at once: on the pinned image
// after a pin, on the tag's newest version after an unpin.

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/distribution/reference"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// pinRequest is the body of POST /api/pin and /api/unpin, and what
// deployer pin and unpin ask.
type pinRequest struct {
	Image string `json:"image"` // repository:tag
	// To: a manifest digest, an image ID or a ledger version; "": the
	// newest version that rolled out. Unpin ignores it.
	To string `json:"to,omitempty"`
}

// pinResult is what a pin or an unpin answers.
type pinResult struct {
	Image    string `json:"image"`
	Pinned   bool   `json:"pinned"` // false: unpinned
	Version  int64  `json:"version,omitempty"`
	ImageID  string `json:"image_id,omitempty"`
	Digest   string `json:"digest,omitempty"`
	Revision int64  `json:"revision"` // the trigger's etcd revision
	// Warnings name the containers of the tag under the stop strategy:
	// their supervisors start the tag and may pull it first, which undoes
	// the pin for them.
	Warnings []string `json:"warnings,omitempty"`
}

// pinner pins and unpins tags.
type pinner struct {
	kv             clientv3.KV // confined to -etcd_prefix
	registryDomain string      // where bare names live (-registry)
	keep           int64       // -history
	now            func() time.Time
}

func newPinner(kv clientv3.KV, registryDomain string, keep int) *pinner {
	return &pinner{kv: kv, registryDomain: registryDomain, keep: int64(max(keep, 1)), now: time.Now}
}

// pin pins req.Image to the version req.To names. A pin to another image
// than the tag's newest version adds that version to the ledger again,
// asked by asked (an operator's explicit deploy: it ends a quarantine).
func (p *pinner) pin(ctx context.Context, req pinRequest, asked askedBy) (pinResult, *ledgerVersion, error) {
	ref, err := parseRollbackImage(req.Image, p.registryDomain)
	if err != nil {
		return pinResult{}, nil, err
	}
	rctx, cancel := context.WithTimeout(ctx, callTimeout)
	h, err := readHistory(rctx, p.kv, historyFilter{name: ref.Name(), tag: ref.Tag(), bare: true}, p.now())
	cancel()
	if err != nil {
		return pinResult{}, nil, fmt.Errorf("read the deploy ledger of %s: %w", ref, err)
	}
	var versions []ledgerVersion // newest first
	if len(h.Tags) > 0 {
		versions = h.Tags[0].Versions
	}
	target, err := pinTarget(ref.String(), versions, req.To)
	if err != nil {
		return pinResult{}, nil, err
	}
	asked.Source = "pin"
	rec := pinRecord{Image: ref.String(), Version: target.Version, ImageID: target.ImageID, Digest: target.Digest, AskedBy: asked, Time: p.now().UTC()}
	var addVersion *ledgerVersion
	if versions[0].ImageID != target.ImageID {
		addVersion = &target
	}
	res, err := p.record(ctx, ref, rec, addVersion)
	return res, &versions[0], err
}

// pinTarget picks, in versions (newest first), the version to names,
// else the newest that rolled out.
func pinTarget(ref string, versions []ledgerVersion, to string) (ledgerVersion, error) {
	if len(versions) == 0 {
		return ledgerVersion{}, fmt.Errorf("%w: %s has no version in the deploy ledger", errLedgerTarget, ref)
	}
	if to == "" {
		for _, v := range versions {
			if v.Outcome == outcomeRolledOut {
				return v, nil
			}
		}
		return ledgerVersion{}, fmt.Errorf("%w: %s has no version that rolled out (see deployer history; name one)", errLedgerTarget, ref)
	}
	v, found, err := findVersion(versions, to)
	if err != nil {
		return ledgerVersion{}, err
	}
	if !found {
		return ledgerVersion{}, fmt.Errorf("%w: no version of %s in the deploy ledger is %q (see deployer history)", errLedgerTarget, ref, to)
	}
	return v, nil
}

// record writes rec and the tag's trigger in one transaction, the
// trigger first (a watcher handles the first event of a revision); with
// add, also add's image as a new version of the ledger (asked by the pin),
// trimmed to -history.
func (p *pinner) record(ctx context.Context, ref reference.NamedTagged, rec pinRecord, add *ledgerVersion) (pinResult, error) {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	val, err := json.Marshal(rec)
	if err != nil {
		return pinResult{}, err
	}
	trig, err := p.triggerOp(ctx, ref, "pin", rec.AskedBy)
	if err != nil {
		return pinResult{}, err
	}
	lift, err := liftHalt(ctx, p.kv, rec.Image, rec.ImageID)
	if err != nil {
		return pinResult{}, err
	}
	for range 5 {
		ops := append([]clientv3.Op{trig, clientv3.OpPut(pinKey(ref.String()), string(val))}, lift...)
		var cmps []clientv3.Cmp
		if add != nil {
			resp, err := p.kv.Get(ctx, historyPrefix(rec.Image), clientv3.WithLastKey()...)
			if err != nil {
				return pinResult{}, fmt.Errorf("read the history of %s: %w", rec.Image, err)
			}
			var newest ledgerVersion
			if len(resp.Kvs) == 0 || json.Unmarshal(resp.Kvs[0].Value, &newest) != nil {
				return pinResult{}, fmt.Errorf("%w: %s has no version in the ledger", errLedgerTarget, rec.Image)
			}
			next := newest.Version + 1
			v := ledgerVersion{
				Version: next, Image: rec.Image, ImageID: add.ImageID, Digest: add.Digest, Pushed: rec.Time,
				AskedBy: rec.AskedBy, Nodes: map[string]nodeResult{}, Outcome: outcomeRollingOut,
			}
			vb, _ := json.Marshal(v)
			key := historyKey(rec.Image, next)
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(string(resp.Kvs[0].Key)), "=", resp.Kvs[0].ModRevision),
				clientv3.Compare(clientv3.CreateRevision(key), "=", 0))
			ops = append(ops, clientv3.OpPut(key, string(vb)))
			if oldest := next - p.keep + 1; oldest > 1 {
				ops = append(ops, trimOps(rec.Image, oldest)...)
			}
		}
		tr, err := p.kv.Txn(ctx).If(cmps...).Then(ops...).Commit()
		if err != nil {
			return pinResult{}, fmt.Errorf("record the pin of %s: %w", rec.Image, err)
		}
		if !tr.Succeeded {
			continue // a node recorded a version meanwhile
		}
		res := pinResult{Image: rec.Image, Pinned: true, Version: rec.Version, ImageID: rec.ImageID, Digest: rec.Digest, Revision: tr.Header.Revision}
		res.Warnings, _ = stopStrategyContainers(ctx, p.kv, rec.Image)
		return res, nil
	}
	return pinResult{}, errLedgerConflict
}

// errNotPinned: unpin of a tag that is not pinned.
var errNotPinned = errors.New("not pinned")

// unpin deletes req.Image's pin and writes the tag's trigger in the same
// transaction: every node deploys the tag's newest version.
func (p *pinner) unpin(ctx context.Context, req pinRequest, asked askedBy) (pinResult, *pinRecord, error) {
	ref, err := parseRollbackImage(req.Image, p.registryDomain)
	if err != nil {
		return pinResult{}, nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	old, rev, err := readPin(ctx, p.kv, ref.String())
	if err != nil {
		return pinResult{}, nil, err
	}
	if old == nil {
		return pinResult{}, nil, fmt.Errorf("%w: %s is not pinned", errNotPinned, reference.FamiliarString(ref))
	}
	asked.Source = "unpin"
	trig, err := p.triggerOp(ctx, ref, "unpin", asked)
	if err != nil {
		return pinResult{}, nil, err
	}
	tr, err := p.kv.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(pinKey(ref.String())), "=", rev)).
		Then(trig, clientv3.OpDelete(pinKey(ref.String()))).Commit()
	if err != nil {
		return pinResult{}, nil, fmt.Errorf("unpin %s: %w", ref, err)
	}
	if !tr.Succeeded {
		return pinResult{}, nil, fmt.Errorf("unpin %s: %w: the pin changed meanwhile; run it again", ref, errLedgerConflict)
	}
	return pinResult{Image: ref.String(), Revision: tr.Header.Revision}, old, nil
}

// triggerOp is the put of ref's trigger that a pin or an unpin writes
// (no digest: every node pulls the tag and its gate decides), at the
// trigger key the tag's repository already has when there is one.
func (p *pinner) triggerOp(ctx context.Context, ref reference.NamedTagged, source string, asked askedBy) (clientv3.Op, error) {
	t := trigger{Time: p.now().UTC(), Tag: ref.Tag(), Source: source, Remote: cmp.Or(asked.Remote, asked.Host), Node: asked.Node}
	val, err := json.Marshal(t)
	if err != nil {
		return clientv3.Op{}, err
	}
	return clientv3.OpPut(triggerKey(repoTriggerName(ctx, p.kv, ref, p.registryDomain)), string(val)), nil
}

// repoTriggerName is the trigger key's repository for ref: the existing
// trigger key that resolves to ref's repository (bare names belong to
// -registry), else ref's repository with its registry host.
func repoTriggerName(ctx context.Context, kv clientv3.KV, ref reference.Named, registryDomain string) string {
	resp, err := kv.Get(ctx, triggersPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err == nil {
		for _, kv := range resp.Kvs {
			if repo, ok := repoFromKey(string(kv.Key)); ok {
				if named, err := resolveRepo(repo, registryDomain); err == nil && named.Name() == ref.Name() {
					return repo
				}
			}
		}
	}
	return ref.Name()
}

// pinAnnouncement is the Slack message of a pin: who, what, from which
// version to which.
func pinAnnouncement(res pinResult, from *ledgerVersion, asked askedBy) string {
	var b strings.Builder
	fmt.Fprintf(&b, ":pushpin: %s pinned to version %d (%s) by %s", familiar(res.Image), res.Version, shortID(res.ImageID), asked.who())
	if from != nil && from.ImageID != res.ImageID {
		fmt.Fprintf(&b, ", from version %d (%s)", from.Version, shortID(from.ImageID))
	}
	if w := pinWarning(res.Image, res.Warnings); w != "" {
		b.WriteString("\n" + w)
	}
	return b.String()
}

// unpinAnnouncement is the Slack message of an unpin.
func unpinAnnouncement(res pinResult, old *pinRecord, asked askedBy) string {
	return fmt.Sprintf(":pushpin: %s unpinned by %s (it was pinned to version %d, %s, by %s): every node deploys its newest version",
		familiar(res.Image), asked.who(), old.Version, shortID(old.ImageID), old.AskedBy.who())
}

// POST /api/pin {"image":"repository:tag","to":"…"} and POST /api/unpin
// {"image":"repository:tag"}
//
// deployer pin and unpin over HTTP, with the webhooks' secret; answered
// when the pin is recorded; announced on Slack by this daemon (say may be
// nil).
func pinHandler(h *webhook, p *pinner, node string, unpin bool, say func(string)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		source := "pin"
		if unpin {
			source = "unpin"
		}
		body, ok := h.accept(w, r, source)
		if !ok {
			return
		}
		var req pinRequest
		if err := json.Unmarshal(body, &req); err != nil || req.Image == "" {
			h.fail(w, r, source, http.StatusBadRequest, fmt.Errorf(`want {"image":"repository:tag","to":"…"}: %w`, cmpErr(err, errors.New("no image"))))
			return
		}
		asked := askedBy{Command: "POST /api/" + source, Host: node, Node: node, Remote: r.RemoteAddr}
		h.log.Info("pin request", "action", source, "image", req.Image, "to", req.To, "remote", r.RemoteAddr)
		var (
			res  pinResult
			err  error
			text string
		)
		if unpin {
			var old *pinRecord
			if res, old, err = p.unpin(r.Context(), req, asked); err == nil {
				text = unpinAnnouncement(res, old, asked)
			}
		} else {
			var from *ledgerVersion
			if res, from, err = p.pin(r.Context(), req, asked); err == nil {
				text = pinAnnouncement(res, from, asked)
			}
		}
		if err != nil {
			code := http.StatusServiceUnavailable
			if errors.Is(err, errUsage) || errors.Is(err, errLedgerTarget) || errors.Is(err, errNotPinned) {
				code = http.StatusBadRequest
			}
			h.fail(w, r, source, code, err)
			return
		}
		if say != nil {
			say(text)
		}
		h.log.Info("pin changed", "action", source, "text", text)
		h.metrics.webhooks.WithLabelValues(source, "ok").Inc()
		writeJSON(w, http.StatusOK, res)
	}
}

func cmpErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}
