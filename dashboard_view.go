package main

// dashboard_view.go: what the dashboard shows (README, Dashboard), read
// from etcd at one revision: per image tag, the image ID each node runs
// and its state, the rollout's slots, halt and down containers, records
// of other features that name the tag (pins, freezes, policies, a bake:
// shown as they are, whatever they say), and the tag's history from the
// deploy ledger.

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/distribution/reference"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// The states of a node's containers of a tag (dashCell.State).
const (
	cellUpToDate = "up to date"         // runs the tag's newest version
	cellRolling  = "rolling out"        // holds a slot, or has yet to take the newest version
	cellWaiting  = "waiting for a slot" // queued behind -max_unavailable
	cellHalted   = "halted"             // the newest version's rollout is halted
	cellDown     = "down"               // a container of the tag is down here
	cellStale    = "stale"              // runs an older version, nothing rolling
)

// dashMarkDirs are the directories under -etcd_prefix whose records the
// dashboard shows as marks on the tags (and nodes) their keys name,
// whatever their values say. A record naming no tag is shown for the
// whole cluster.
var dashMarkDirs = []string{pinDir, freezeDir, policyDir, waitingDir, canaryDir}

// dashMarkWords names a mark by its directory (or a rollout's leaf);
// others go by their own name.
var dashMarkWords = map[string]string{"pin": "pinned", "freeze": "frozen", "waiting": "waiting", "canary": "canary", "bake": "baking", "baking": "baking"}

// dashHistoryLen bounds the versions of a tag the page gets.
const dashHistoryLen = 20

// dashView is one message of the dashboard's event stream.
type dashView struct {
	Rev     int64        `json:"rev"` // the etcd revision read
	Time    time.Time    `json:"time"`
	Node    string       `json:"node"` // the node serving the page
	Nodes   []nodeStatus `json:"nodes"`
	Tags    []dashTag    `json:"tags"`
	Records []dashMark   `json:"records"` // marks that name no tag
	Actions []string     `json:"actions"` // the actions this node offers (dashboard.go)
	Frozen  bool         `json:"frozen"`  // a freeze of every image is recorded: thaw applies to the fleet
}

type dashTag struct {
	Image   string          `json:"image"`
	Newest  string          `json:"newest,omitempty"` // the image ID the tag rolls out to
	Cells   []dashCell      `json:"cells"`            // one per node of dashView.Nodes, in order
	Slots   []dashSlot      `json:"slots,omitempty"`
	Halted  *halt           `json:"halted,omitempty"`
	Down    []string        `json:"down,omitempty"`
	Marks   []dashMark      `json:"marks,omitempty"`
	History []ledgerVersion `json:"history,omitempty"` // newest first
	// What the page's actions need: the tag's pin (unpin applies, else
	// pin), its canary rollout while open (promote and abort apply), the
	// scopes of the freezes of the tag or its repository (thaw applies,
	// else freeze).
	Pin     *pinRecord  `json:"pin,omitempty"`
	Canary  *dashCanary `json:"canary,omitempty"`
	Freezes []string    `json:"freezes,omitempty"`

	unrecorded bool // Newest is not in the ledger yet: its rollout has begun
}

// dashCanary is a tag's open canary rollout, as the page offers promote
// and abort on it.
type dashCanary struct {
	ImageID  string `json:"image_id"`
	Previous string `json:"previous,omitempty"`
	Phase    string `json:"phase"`
	State    string `json:"state"`
}

// dashCell is one node's containers of one tag; State "" when the node
// runs none.
type dashCell struct {
	Node       string   `json:"node"`
	ImageIDs   []string `json:"image_ids,omitempty"`
	Versions   []int64  `json:"versions,omitempty"` // the ledger's version of each image ID, 0 if none
	Containers int      `json:"containers"`
	State      string   `json:"state,omitempty"`
	Detail     string   `json:"detail,omitempty"`
	Marks      []string `json:"marks,omitempty"`
}

type dashSlot struct {
	Node      string `json:"node"`
	Container string `json:"container"`
	State     string `json:"state"` // cellRolling (holds it) or cellWaiting
}

// dashMark is a record of another feature, as the page shows it.
type dashMark struct {
	Word  string `json:"word"` // pinned, frozen, policy, baking, …
	Key   string `json:"key"`
	Value string `json:"value"`
	Node  string `json:"node,omitempty"` // the node the key names, if any
}

// prefetched serves the Gets of readStatus and readHistory from one
// transaction's reads: every range of the view in one round trip, at one
// revision.
type prefetched struct {
	clientv3.KV // not called
	ranges      map[string]*clientv3.GetResponse
}

func (p prefetched) Get(_ context.Context, key string, _ ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	if r, ok := p.ranges[key]; ok {
		return r, nil
	}
	return nil, fmt.Errorf("dashboard: %s was not read", key)
}

// readDashView reads the view, every range in one transaction.
func readDashView(ctx context.Context, kv clientv3.KV, node string, maxUnavailable int, actions []string, now time.Time) (dashView, error) {
	prefixes := []string{statusPrefix, haltsPrefix, rolloutsPrefix, historiesPrefix, historyNodesPrefix}
	for _, dir := range dashMarkDirs {
		prefixes = append(prefixes, "/"+dir+"/")
	}
	ops := make([]clientv3.Op, len(prefixes))
	for i, p := range prefixes {
		ops[i] = clientv3.OpGet(p, clientv3.WithPrefix())
	}
	resp, err := kv.Txn(ctx).Then(ops...).Commit()
	if err != nil {
		return dashView{}, err
	}
	got := prefetched{ranges: map[string]*clientv3.GetResponse{}}
	for i, r := range resp.Responses {
		got.ranges[prefixes[i]] = (*clientv3.GetResponse)(r.GetResponseRange())
	}
	st, err := readStatus(ctx, got, now)
	if err != nil {
		return dashView{}, err
	}
	h, err := readHistory(ctx, got, historyFilter{}, now)
	if err != nil {
		return dashView{}, err
	}
	var marks []*mvccpb.KeyValue
	for _, dir := range dashMarkDirs {
		marks = append(marks, got.ranges["/"+dir+"/"].Kvs...)
	}
	v := buildDashView(st, h, got.ranges[rolloutsPrefix].Kvs, marks, maxUnavailable)
	v.Rev, v.Node, v.Actions = resp.Header.Revision, node, actions
	return v, nil
}

// buildDashView puts the view together from the cluster status, the
// ledger, the rollout keys and the marks' records.
func buildDashView(st clusterStatus, h historyView, rolls, marks []*mvccpb.KeyValue, maxUnavailable int) dashView {
	v := dashView{Time: st.Time, Nodes: st.Nodes, Tags: []dashTag{}, Records: []dashMark{}, Actions: []string{}}
	tags := map[string]*dashTag{}
	tag := func(ref string) *dashTag {
		if tags[ref] == nil {
			tags[ref] = &dashTag{Image: ref}
		}
		return tags[ref]
	}
	since := map[string]time.Time{} // when the tag's newest image by the status records first ran
	for _, t := range st.Tags {
		dt := tag(t.Image)
		dt.Halted, dt.Down = t.Halted, t.Down
		if len(t.Versions) > 0 {
			dt.Newest, since[t.Image] = t.Versions[0].ImageID, t.Versions[0].Since
		}
	}
	// The newest version is the ledger's, unless a node already runs an
	// image the ledger has not recorded yet, started after the ledger's
	// newest was pushed (the ledger records a version once the first node
	// has converged on it).
	for _, th := range h.Tags {
		dt := tag(th.Image)
		dt.History = th.Versions[:min(len(th.Versions), dashHistoryLen)]
		if len(th.Versions) == 0 {
			continue
		}
		known := slices.ContainsFunc(th.Versions, func(v ledgerVersion) bool { return v.ImageID == dt.Newest })
		if dt.Newest == "" || known || !since[th.Image].After(th.Versions[0].Pushed) {
			dt.Newest = th.Versions[0].ImageID
		} else {
			dt.unrecorded = true
		}
	}
	// Slots, in the order the rollout grants them (create revision): the
	// first -max_unavailable are held, the rest wait (a container already
	// down lets a node in ahead; the page shows the queue as etcd has it).
	slices.SortFunc(rolls, func(a, b *mvccpb.KeyValue) int { return cmp.Compare(a.CreateRevision, b.CreateRevision) })
	held := map[string]int{}
	for _, kv := range rolls {
		ref, leaf, ok := rolloutLeaf(string(kv.Key))
		if !ok {
			continue
		}
		switch {
		case strings.HasPrefix(leaf, slotsLeaf):
			n, c, _ := strings.Cut(string(kv.Value), " ")
			state := cellWaiting
			if held[ref] < max(maxUnavailable, 1) {
				state = cellRolling
				held[ref]++
			}
			tag(ref).Slots = append(tag(ref).Slots, dashSlot{Node: n, Container: c, State: state})
		case strings.HasPrefix(leaf, downLeaf), leaf == haltLeaf: // haltLeaf: a legacy halt record, moved at start (haltmove.go)
		default: // another feature's record of the rollout (a bake, …)
			word, _, _ := strings.Cut(leaf, "/")
			tag(ref).Marks = append(tag(ref).Marks, dashMark{Word: markWord(word), Key: string(kv.Key), Value: markValue(kv.Value)})
		}
	}
	nodes := make([]string, len(st.Nodes))
	for i, n := range st.Nodes {
		nodes[i] = n.Node
	}
	for _, kv := range marks {
		key := string(kv.Key)
		dir, rest, _ := strings.Cut(strings.TrimPrefix(key, "/"), "/")
		m := dashMark{Word: markWord(strings.TrimPrefix(dir, reservedMark)), Key: key, Value: markValue(kv.Value)}
		var refs []string
		for seg := range strings.SplitSeq(rest, "/") {
			seg, err := url.PathUnescape(seg)
			if err != nil || seg == "" {
				continue
			}
			if slices.Contains(nodes, seg) {
				m.Node = seg
			}
			refs = append(refs, seg)
		}
		named := false
		for ref, dt := range tags {
			if slices.ContainsFunc(refs, func(s string) bool { return namesTag(s, ref) }) {
				dt.Marks, named = append(dt.Marks, m), true
				dt.actionable(dir, refs, kv.Value)
			}
		}
		if dir == freezeDir && slices.Equal(refs, []string{freezeAll}) {
			v.Frozen = true
		}
		if !named {
			v.Records = append(v.Records, m)
		}
	}
	for _, ref := range slices.Sorted(maps.Keys(tags)) {
		dt := tags[ref]
		dt.Cells = make([]dashCell, len(st.Nodes))
		for i, n := range st.Nodes {
			dt.Cells[i] = dt.cell(n)
		}
		v.Tags = append(v.Tags, *dt)
	}
	return v
}

// actionable reads a record of the tag (its key's directory dir, its
// segments refs) for what the page's actions need.
func (t *dashTag) actionable(dir string, refs []string, value []byte) {
	if len(refs) != 1 {
		return
	}
	switch dir {
	case pinDir:
		var p pinRecord
		if refs[0] == t.Image && json.Unmarshal(value, &p) == nil {
			t.Pin = &p
		}
	case canaryDir:
		var rec canaryRecord
		if refs[0] == t.Image && json.Unmarshal(value, &rec) == nil && rec.open() {
			t.Canary = &dashCanary{ImageID: rec.ImageID, Previous: rec.Previous, Phase: rec.Phase, State: rec.state()}
		}
	case freezeDir:
		t.Freezes = append(t.Freezes, refs[0])
	}
}

// cell is node n's state for the tag.
func (t *dashTag) cell(n nodeStatus) dashCell {
	c := dashCell{Node: n.Node}
	for _, ctr := range n.Containers {
		if ctr.Image != t.Image {
			continue
		}
		c.Containers++
		if !slices.Contains(c.ImageIDs, ctr.ImageID) {
			c.ImageIDs = append(c.ImageIDs, ctr.ImageID)
		}
	}
	for _, m := range t.Marks {
		if m.Node == n.Node {
			c.Marks = append(c.Marks, m.Word)
		}
	}
	var slot *dashSlot
	for i := range t.Slots {
		if t.Slots[i].Node == n.Node && (slot == nil || t.Slots[i].State == cellRolling) {
			slot = &t.Slots[i]
		}
	}
	var down []string
	for _, d := range t.Down {
		if name, rest, _ := strings.Cut(d, " "); name == n.Node {
			down = append(down, rest)
		}
	}
	if c.Containers == 0 && slot == nil && len(down) == 0 {
		return c // the node runs nothing of the tag
	}
	for _, id := range c.ImageIDs {
		var version int64
		for _, lv := range t.History {
			if lv.ImageID == id {
				version = lv.Version
				break
			}
		}
		c.Versions = append(c.Versions, version)
	}
	newest := len(c.ImageIDs) == 1 && c.ImageIDs[0] == t.Newest
	switch {
	case slot != nil:
		c.State, c.Detail = slot.State, slot.Container
	case t.Halted != nil && !slices.Contains(c.ImageIDs, t.Halted.ImageID):
		c.State, c.Detail = cellHalted, "halted by "+t.Halted.Node+": "+t.Halted.Reason
	case len(down) > 0:
		c.State, c.Detail = cellDown, strings.Join(down, ", ")
	case newest:
		c.State = cellUpToDate
	case t.unrecorded, len(t.History) > 0 && t.History[0].ImageID == t.Newest && t.History[0].Outcome == outcomeRollingOut:
		c.State, c.Detail = cellRolling, "to "+shortID(t.Newest)
	default:
		c.State = cellStale
	}
	return c
}

// rolloutLeaf splits a key under rolloutsPrefix into its tag and leaf.
func rolloutLeaf(key string) (ref, leaf string, ok bool) {
	rest, ok := strings.CutPrefix(key, rolloutsPrefix)
	if !ok {
		return "", "", false
	}
	esc, leaf, ok := strings.Cut(rest, "/")
	ref, err := url.PathUnescape(esc)
	return ref, leaf, ok && err == nil
}

// namesTag reports whether s, a segment of a mark's key, names the tag
// ref: the tag itself, or its repository, in full or as Docker spells it.
func namesTag(s, ref string) bool {
	if s == ref {
		return true
	}
	tagged, err1 := reference.ParseNormalizedNamed(ref)
	named, err2 := reference.ParseNormalizedNamed(s)
	if err1 != nil || err2 != nil {
		return false
	}
	if t, ok := named.(reference.Tagged); ok {
		return named.Name() == tagged.Name() && t.Tag() == strings.TrimPrefix(strings.TrimPrefix(ref, tagged.Name()), ":")
	}
	return named.Name() == tagged.Name()
}

func markWord(s string) string { return cmp.Or(dashMarkWords[s], s) }

// markValue is a record's value for the page: compact JSON, or the text,
// cut at 300 bytes.
func markValue(b []byte) string {
	var buf bytes.Buffer
	if json.Compact(&buf, b) == nil {
		b = buf.Bytes()
	}
	return truncate(string(b), 300)
}
