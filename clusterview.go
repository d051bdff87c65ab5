package main

// clusterview.go: the cluster's state in one view per tag, read from the
// nodes' status records and the rollouts (GET /api/status, deployer
// status), and the version skew /metrics exports from it.

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// clusterStatus is the view GET /api/status returns.
type clusterStatus struct {
	Time  time.Time    `json:"time"`
	Nodes []nodeStatus `json:"nodes"`
	Tags  []tagStatus  `json:"tags"`
	// Freezes and the stored rollout policies (README, Release policy).
	Freezes  []freezeRecord `json:"freezes,omitempty"`
	Policies []storedPolicy `json:"policies,omitempty"`
}

type tagStatus struct {
	Image    string        `json:"image"`
	Versions []versionInfo `json:"versions"` // newest first
	Rolling  []string      `json:"rolling,omitempty"`
	Halted   *halt         `json:"halted,omitempty"`
	// Canary is the tag's canary rollout (canary.go), with its state in
	// words ("waiting for promote", "baking on … until …").
	Canary *canaryStatus `json:"canary,omitempty"`
	// Down lists the containers of the tag that are down, as
	// "<node> <container> (<reason>)": they count against
	// -max_unavailable.
	Down []string `json:"down,omitempty"`
	// SkewSeconds is how long two image IDs of this tag have been
	// running at once: since the newest one's first container started.
	SkewSeconds float64 `json:"skew_seconds"`
	// The tag's deploy state from the ledger and its pin (tagstate.go).
	tagState
	// Waiting is the newest version a freeze or a window holds; Ahead
	// lists the containers that run it all the same, as "<node>
	// <container>" (hold.go).
	Waiting *waitingRecord `json:"waiting,omitempty"`
	Ahead   []string       `json:"ahead,omitempty"`
}

type canaryStatus struct {
	canaryRecord
	State string `json:"state"`
}

type versionInfo struct {
	ImageID    string    `json:"image_id"`
	Nodes      []string  `json:"nodes"`
	Containers int       `json:"containers"`
	Since      time.Time `json:"since"` // first container on it
}

// readStatus gathers the node records, the rollout state and each tag's
// deploy state (the ledger's newest version, the pin).
func readStatus(ctx context.Context, kv clientv3.KV, now time.Time) (clusterStatus, error) {
	return readView(ctx, kv, now, true)
}

// readView gathers the node records and the rollout state, and with
// states each tag's deploy state (which reads the whole ledger: not for
// every scrape of /metrics).
func readView(ctx context.Context, kv clientv3.KV, now time.Time, states bool) (clusterStatus, error) {
	out := clusterStatus{Time: now.UTC(), Nodes: []nodeStatus{}, Tags: []tagStatus{}}
	nodes, err := kv.Get(ctx, statusPrefix, clientv3.WithPrefix())
	if err != nil {
		return out, err
	}
	tags := map[string]*tagStatus{}
	tag := func(ref string) *tagStatus {
		if tags[ref] == nil {
			tags[ref] = &tagStatus{Image: ref}
		}
		return tags[ref]
	}
	versions := map[string]map[string]*versionInfo{}
	for _, kv := range nodes.Kvs {
		var n nodeStatus
		if json.Unmarshal(kv.Value, &n) != nil {
			continue
		}
		out.Nodes = append(out.Nodes, n)
		for _, c := range n.Containers {
			tag(c.Image)
			if versions[c.Image] == nil {
				versions[c.Image] = map[string]*versionInfo{}
			}
			v := versions[c.Image][c.ImageID]
			if v == nil {
				v = &versionInfo{ImageID: c.ImageID, Since: c.Since}
				versions[c.Image][c.ImageID] = v
			}
			if !slices.Contains(v.Nodes, n.Node) {
				v.Nodes = append(v.Nodes, n.Node)
			}
			v.Containers++
			if c.Since.Before(v.Since) {
				v.Since = c.Since
			}
			if c.Ahead != "" {
				tags[c.Image].Ahead = append(tags[c.Image].Ahead, n.Node+" "+c.Name)
			}
		}
	}
	halts, err := kv.Get(ctx, haltsPrefix, clientv3.WithPrefix())
	if err != nil {
		return out, err
	}
	for _, kv := range halts.Kvs {
		var h halt
		if ref, ok := refFromHaltKey(string(kv.Key)); ok && json.Unmarshal(kv.Value, &h) == nil {
			tag(ref).Halted = &h
		}
	}
	rolls, err := kv.Get(ctx, rolloutsPrefix, clientv3.WithPrefix())
	if err != nil {
		return out, err
	}
	for _, kv := range rolls.Kvs {
		rest := strings.TrimPrefix(string(kv.Key), rolloutsPrefix)
		esc, what, ok := strings.Cut(rest, "/")
		ref, err := url.PathUnescape(esc)
		if !ok || err != nil {
			continue
		}
		switch {
		case strings.HasPrefix(what, slotsLeaf):
			t := tag(ref)
			t.Rolling = append(t.Rolling, string(kv.Value))
		case strings.HasPrefix(what, downLeaf):
			var d downRecord
			if json.Unmarshal(kv.Value, &d) == nil {
				t := tag(ref)
				for _, c := range d.Containers {
					t.Down = append(t.Down, fmt.Sprintf("%s %s (%s)", d.Node, c.Name, c.Reason))
				}
			}
		}
	}
	if states {
		states, err := readTagStates(ctx, kv)
		if err != nil {
			return out, err
		}
		for ref, st := range states {
			if st.Pinned != nil || tags[ref] != nil {
				tag(ref).tagState = st
			}
		}
	}
	if err := readHolds(ctx, kv, &out, tag); err != nil {
		return out, err
	}
	cans, err := kv.Get(ctx, canariesPrefix, clientv3.WithPrefix())
	if err != nil {
		return out, err
	}
	for _, kv := range cans.Kvs {
		var rec canaryRecord
		if ref, ok := refFromCanaryKey(string(kv.Key)); ok && json.Unmarshal(kv.Value, &rec) == nil {
			tag(ref).Canary = &canaryStatus{canaryRecord: rec, State: rec.state()}
		}
	}
	for ref, t := range tags {
		for _, v := range versions[ref] {
			slices.Sort(v.Nodes)
			t.Versions = append(t.Versions, *v)
		}
		slices.SortFunc(t.Versions, func(a, b versionInfo) int { return b.Since.Compare(a.Since) })
		if len(t.Versions) > 1 {
			t.SkewSeconds = now.Sub(t.Versions[0].Since).Seconds()
		}
		out.Tags = append(out.Tags, *t)
	}
	slices.SortFunc(out.Tags, func(a, b tagStatus) int { return cmp.Compare(a.Image, b.Image) })
	slices.SortFunc(out.Nodes, func(a, b nodeStatus) int { return cmp.Compare(a.Node, b.Node) })
	return out, nil
}

// readHolds adds the freezes, the waiting versions and the stored
// policies to the view.
func readHolds(ctx context.Context, kv clientv3.KV, out *clusterStatus, tag func(string) *tagStatus) error {
	// Gets, not one transaction: the dashboard serves them from its one
	// read of the whole view (dashboard_view.go, prefetched).
	freezes, err := kv.Get(ctx, freezesPrefix, clientv3.WithPrefix())
	if err != nil {
		return err
	}
	waiting, err := kv.Get(ctx, waitingsPrefix, clientv3.WithPrefix())
	if err != nil {
		return err
	}
	out.Freezes = decodeFreezes(freezes.Kvs)
	for _, w := range decodeWaiting(waiting.Kvs) {
		tag(w.Ref).Waiting = &w
	}
	out.Policies, err = newPolicies(kv, rolloutPolicy{}).list(ctx)
	return err
}

// skewCollector exports deployer_version_skew_seconds{image}, read from
// the cluster view when /metrics is scraped: the view is cluster-wide, so
// no node keeps reading it between scrapes.
type skewCollector struct {
	kv   clientv3.KV
	desc *prometheus.Desc
}

func newSkewCollector(kv clientv3.KV) *skewCollector {
	return &skewCollector{kv: kv, desc: prometheus.NewDesc("deployer_version_skew_seconds",
		"How long two image IDs of one tag have run at once across the cluster (0: one version).", []string{"image"}, nil)}
}

func (c *skewCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *skewCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	st, err := readView(ctx, c.kv, time.Now(), false)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.desc, err)
		return
	}
	for _, t := range st.Tags {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, t.SkewSeconds, t.Image)
	}
}

// GET /api/status
//
// The cluster's state per image tag: which image IDs run on which nodes,
// rollouts in progress or halted, and the version skew. Same secret as the
// webhooks.
func statusHandler(kv clientv3.KV) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		st, err := readStatus(ctx, kv, time.Now())
		if err != nil {
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, st)
	}
}
