package main

// policy.go: the rollout policy of an image tag (README, Release
// policy): which nodes are canaries and how long a version bakes on them,
// whether promotion is automatic, how many of the tag's containers may be
// down at once, how long a replacement without a health check must stay
// up, and when deploys may happen (window.go).
//
// A policy record is kept in etcd per image tag (_policy/<image ref>),
// with a cluster-wide default (_policy/default). Every field of a record
// is optional: the effective policy of a tag takes each field from the
// tag's record, else from the default record, else from the daemon's
// flags (-max_unavailable, -up_after), which only seed the default.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// errPolicy marks a policy that does not validate.
var errPolicy = errors.New("bad policy")

const (
	promoteAuto   = "auto"
	promoteManual = "manual"
)

// policy is one stored record: a tag's or the default's. A nil or empty
// field is not set, and the effective policy takes it from below.
type policy struct {
	CanaryNodes    *[]string    `json:"canary_nodes,omitempty"`    // node names (-node_name)
	CanaryLabels   *[]string    `json:"canary_labels,omitempty"`   // nodes started with one of these -node_labels
	Bake           *jsonDur     `json:"bake,omitempty"`            // how long every canary replacement must stay up
	Promotion      string       `json:"promotion,omitempty"`       // "auto" or "manual"
	MaxUnavailable *unavailable `json:"max_unavailable,omitempty"` // a count (2) or a percentage ("25%")
	UpAfter        *jsonDur     `json:"up_after,omitempty"`        // how long a replacement without a health check runs before it counts as up
	Windows        *[]string    `json:"windows,omitempty"`         // deploy windows (window.go); empty: always

	Updated   time.Time `json:"updated,omitzero"`
	UpdatedBy string    `json:"updated_by,omitempty"`
}

// rolloutPolicy is the effective policy of a tag: every field resolved.
type rolloutPolicy struct {
	CanaryNodes    []string      `json:"canary_nodes,omitempty"`
	CanaryLabels   []string      `json:"canary_labels,omitempty"`
	Bake           time.Duration `json:"-"`
	Promotion      string        `json:"promotion"`
	MaxUnavailable unavailable   `json:"max_unavailable"`
	UpAfter        time.Duration `json:"-"`
	Windows        windows       `json:"-"`
}

// MarshalJSON writes durations and windows as they are written on the
// command line.
func (p rolloutPolicy) MarshalJSON() ([]byte, error) {
	type plain rolloutPolicy
	ws := make([]string, len(p.Windows))
	for i, w := range p.Windows {
		ws[i] = w.spec
	}
	return json.Marshal(struct {
		plain
		Bake    string   `json:"bake"`
		UpAfter string   `json:"up_after"`
		Windows []string `json:"windows,omitempty"`
	}{plain(p), p.Bake.String(), p.UpAfter.String(), ws})
}

// canary reports whether the node named node, started with labels, is a
// canary of the policy.
func (p rolloutPolicy) canary(node string, labels []string) bool {
	if slices.Contains(p.CanaryNodes, node) {
		return true
	}
	for _, l := range labels {
		if slices.Contains(p.CanaryLabels, l) {
			return true
		}
	}
	return false
}

// hasCanaries reports whether the policy names any canary.
func (p rolloutPolicy) hasCanaries() bool { return len(p.CanaryNodes)+len(p.CanaryLabels) > 0 }

// basePolicy is the bottom layer, from the daemon's flags.
func basePolicy(maxUnavailable unavailable, upAfter time.Duration) rolloutPolicy {
	return rolloutPolicy{Promotion: promoteAuto, MaxUnavailable: maxUnavailable, UpAfter: upAfter}
}

// over returns base with every field rec sets taken from rec. rec must
// have validated.
func (rec policy) over(base rolloutPolicy) rolloutPolicy {
	p := base
	if rec.CanaryNodes != nil {
		p.CanaryNodes = slices.Clone(*rec.CanaryNodes)
	}
	if rec.CanaryLabels != nil {
		p.CanaryLabels = slices.Clone(*rec.CanaryLabels)
	}
	if rec.Bake != nil {
		p.Bake = time.Duration(*rec.Bake)
	}
	if rec.Promotion != "" {
		p.Promotion = rec.Promotion
	}
	if rec.MaxUnavailable != nil {
		p.MaxUnavailable = *rec.MaxUnavailable
	}
	if rec.UpAfter != nil {
		p.UpAfter = time.Duration(*rec.UpAfter)
	}
	if rec.Windows != nil {
		p.Windows = nil
		for _, s := range *rec.Windows {
			if w, err := parseWindow(s); err == nil {
				p.Windows = append(p.Windows, w)
			}
		}
	}
	return p
}

// validate checks every field that is set.
func (rec policy) validate() error {
	for _, names := range []*[]string{rec.CanaryNodes, rec.CanaryLabels} {
		if names == nil {
			continue
		}
		for _, n := range *names {
			if n == "" || strings.ContainsAny(n, "/, \t\n") {
				return fmt.Errorf("%w: canary %q: a node name or label is non-empty, without spaces, commas or /", errPolicy, n)
			}
		}
	}
	if rec.Bake != nil && *rec.Bake < 0 {
		return fmt.Errorf("%w: bake must not be negative, got %s", errPolicy, time.Duration(*rec.Bake))
	}
	if rec.UpAfter != nil && *rec.UpAfter <= 0 {
		return fmt.Errorf("%w: up_after must be positive, got %s", errPolicy, time.Duration(*rec.UpAfter))
	}
	switch rec.Promotion {
	case "", promoteAuto, promoteManual:
	default:
		return fmt.Errorf("%w: promotion %q must be auto or manual", errPolicy, rec.Promotion)
	}
	if rec.MaxUnavailable != nil {
		if err := rec.MaxUnavailable.validate(); err != nil {
			return err
		}
	}
	if rec.Windows != nil {
		for _, s := range *rec.Windows {
			if _, err := parseWindow(s); err != nil {
				return fmt.Errorf("%w: %w", errPolicy, err)
			}
		}
	}
	return nil
}

// empty reports whether the record sets nothing.
func (rec policy) empty() bool {
	return rec.CanaryNodes == nil && rec.CanaryLabels == nil && rec.Bake == nil && rec.Promotion == "" &&
		rec.MaxUnavailable == nil && rec.UpAfter == nil && rec.Windows == nil
}

// unavailable is max_unavailable: a count of containers, or a percentage
// of the containers that run the tag across the cluster. 0 (a count)
// replaces everything at once, uncoordinated.
type unavailable struct {
	N       int
	Percent bool
}

// parseUnavailable reads "2" or "25%".
func parseUnavailable(s string) (unavailable, error) {
	s = strings.TrimSpace(s)
	num, pct := strings.CutSuffix(s, "%")
	n, err := strconv.Atoi(num)
	u := unavailable{N: n, Percent: pct}
	if err != nil {
		return u, fmt.Errorf("%w: max_unavailable %q: want a count (2) or a percentage (25%%)", errPolicy, s)
	}
	return u, u.validate()
}

func (u unavailable) validate() error {
	switch {
	case u.N < 0:
		return fmt.Errorf("%w: max_unavailable must not be negative, got %s", errPolicy, u)
	case u.Percent && (u.N < 1 || u.N > 100):
		return fmt.Errorf("%w: max_unavailable %s: a percentage is from 1%% to 100%%", errPolicy, u)
	}
	return nil
}

func (u unavailable) String() string {
	if u.Percent {
		return strconv.Itoa(u.N) + "%"
	}
	return strconv.Itoa(u.N)
}

// coordinated reports whether replacements take rollout slots (anything
// but a count of 0).
func (u unavailable) coordinated() bool { return u.N > 0 }

// of returns how many containers may be down at once when total run the
// tag across the cluster: the count, or the percentage of total rounded
// up, at least 1 (50% of 3 is 2; 25% of 20 is 5).
func (u unavailable) of(total int) int {
	if !u.Percent {
		return u.N
	}
	return max(1, int(math.Ceil(float64(total)*float64(u.N)/100)))
}

// Set and the flag.Value interface: -max_unavailable takes either form.
func (u *unavailable) Set(s string) error {
	v, err := parseUnavailable(s)
	if err != nil {
		return err
	}
	*u = v
	return nil
}

func (u unavailable) MarshalJSON() ([]byte, error) {
	if u.Percent {
		return json.Marshal(u.String())
	}
	return json.Marshal(u.N)
}

func (u *unavailable) UnmarshalJSON(b []byte) error {
	var n int
	if err := json.Unmarshal(b, &n); err == nil {
		*u = unavailable{N: n}
		return u.validate()
	}
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("%w: max_unavailable: want a count or a percentage string", errPolicy)
	}
	return u.Set(s)
}

// jsonDur is a duration written as Go writes it ("90s", "1m30s"); a
// number is seconds.
type jsonDur time.Duration

func (d jsonDur) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

func (d *jsonDur) UnmarshalJSON(b []byte) error {
	var secs float64
	if err := json.Unmarshal(b, &secs); err == nil {
		*d = jsonDur(secs * float64(time.Second))
		return nil
	}
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("%w: want a duration such as \"90s\"", errPolicy)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%w: %w", errPolicy, err)
	}
	*d = jsonDur(v)
	return nil
}

func durPtr(d time.Duration) *jsonDur { v := jsonDur(d); return &v }

// decodePolicy reads a stored record; an unreadable one sets nothing (and
// is reported).
func decodePolicy(kvs []*mvccpb.KeyValue) (policy, error) {
	var rec policy
	if len(kvs) == 0 {
		return rec, nil
	}
	if err := json.Unmarshal(kvs[0].Value, &rec); err != nil {
		return policy{}, fmt.Errorf("%w: %s: %w", errPolicy, kvs[0].Key, err)
	}
	if err := rec.validate(); err != nil {
		return policy{}, fmt.Errorf("%s: %w", kvs[0].Key, err)
	}
	return rec, nil
}

// policies reads and writes the policy records.
type policies struct {
	kv   clientv3.KV // confined to -etcd_prefix
	base rolloutPolicy
}

func newPolicies(kv clientv3.KV, base rolloutPolicy) *policies {
	return &policies{kv: kv, base: base}
}

// effective returns the effective policy of ref (an image ref such as
// docker.io/myorg/foo:latest): the tag's record over the default record
// over the flags, read in one transaction. An unreadable record counts as
// unset, and its error is returned with the policy.
func (ps *policies) effective(ctx context.Context, ref string) (rolloutPolicy, error) {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	resp, err := ps.kv.Txn(ctx).Then(clientv3.OpGet(defaultPolicyKey), clientv3.OpGet(policyKey(ref))).Commit()
	if err != nil {
		return ps.base, fmt.Errorf("read the policy of %s: %w", ref, err)
	}
	def, derr := decodePolicy(resp.Responses[0].GetResponseRange().Kvs)
	tag, terr := decodePolicy(resp.Responses[1].GetResponseRange().Kvs)
	return tag.over(def.over(ps.base)), errors.Join(derr, terr)
}

// storedPolicy is a record as listed: its image ref ("" for the default).
type storedPolicy struct {
	Ref    string `json:"ref,omitempty"`
	Policy policy `json:"policy"`
}

// list returns every stored record, the default first (Ref ""), then by
// ref.
func (ps *policies) list(ctx context.Context) ([]storedPolicy, error) {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	resp, err := ps.kv.Get(ctx, policiesPrefix, clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
	if err != nil {
		return nil, fmt.Errorf("read the policies: %w", err)
	}
	var out []storedPolicy
	for _, kv := range resp.Kvs {
		ref, ok := refFromPolicyKey(string(kv.Key))
		if !ok {
			continue
		}
		var rec policy
		if json.Unmarshal(kv.Value, &rec) != nil {
			continue
		}
		out = append(out, storedPolicy{Ref: ref, Policy: rec})
	}
	slices.SortStableFunc(out, func(a, b storedPolicy) int { return strings.Compare(a.Ref, b.Ref) })
	return out, nil
}

// set changes the record of ref ("" for the default): the fields change
// sets replace the stored ones, the fields named in unset are cleared, and
// a record left setting nothing is deleted. It is a transaction on the
// record's ModRevision, retried when another writer got there first.
func (ps *policies) set(ctx context.Context, ref string, change policy, unset []string, by string, now time.Time) (policy, error) {
	if err := change.validate(); err != nil {
		return policy{}, err
	}
	key := defaultPolicyKey
	if ref != "" {
		key = policyKey(ref)
	}
	for attempt := 0; attempt < 10; attempt++ {
		gctx, cancel := context.WithTimeout(ctx, callTimeout)
		resp, err := ps.kv.Get(gctx, key)
		cancel()
		if err != nil {
			return policy{}, fmt.Errorf("read the policy: %w", err)
		}
		var rec policy
		var rev int64
		if len(resp.Kvs) > 0 {
			rev = resp.Kvs[0].ModRevision
			_ = json.Unmarshal(resp.Kvs[0].Value, &rec) // an unreadable record is replaced
		}
		rec, err = rec.merge(change, unset)
		if err != nil {
			return policy{}, err
		}
		rec.Updated, rec.UpdatedBy = now.UTC(), by
		op := clientv3.OpDelete(key)
		if !rec.empty() {
			b, _ := json.Marshal(rec)
			op = clientv3.OpPut(key, string(b))
		}
		wctx, cancel := context.WithTimeout(ctx, callTimeout)
		tr, err := ps.kv.Txn(wctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).Then(op).Commit()
		cancel()
		if err != nil {
			return policy{}, fmt.Errorf("write the policy: %w", err)
		}
		if tr.Succeeded {
			return rec, nil
		}
	}
	return policy{}, errors.New("write the policy: it keeps changing under us; try again")
}

// policyFields are the names of the fields, as -unset takes them.
var policyFields = []string{"canary_nodes", "canary_labels", "bake", "promotion", "max_unavailable", "up_after", "windows"}

// merge returns rec with change's set fields and without the unset ones.
func (rec policy) merge(change policy, unset []string) (policy, error) {
	for _, f := range unset {
		switch f {
		case "all":
			rec = policy{}
		case "canary_nodes":
			rec.CanaryNodes = nil
		case "canary_labels":
			rec.CanaryLabels = nil
		case "bake":
			rec.Bake = nil
		case "promotion":
			rec.Promotion = ""
		case "max_unavailable":
			rec.MaxUnavailable = nil
		case "up_after":
			rec.UpAfter = nil
		case "windows":
			rec.Windows = nil
		default:
			return rec, fmt.Errorf("%w: no field %q to unset (%s, or all)", errPolicy, f, strings.Join(policyFields, ", "))
		}
	}
	if change.CanaryNodes != nil {
		rec.CanaryNodes = change.CanaryNodes
	}
	if change.CanaryLabels != nil {
		rec.CanaryLabels = change.CanaryLabels
	}
	if change.Bake != nil {
		rec.Bake = change.Bake
	}
	if change.Promotion != "" {
		rec.Promotion = change.Promotion
	}
	if change.MaxUnavailable != nil {
		rec.MaxUnavailable = change.MaxUnavailable
	}
	if change.UpAfter != nil {
		rec.UpAfter = change.UpAfter
	}
	if change.Windows != nil {
		rec.Windows = change.Windows
	}
	return rec, nil
}

// tagPolicy is what a tag's effective policy says to the replacement of
// its containers on this node (replace.go, upwait.go).
type tagPolicy struct {
	maxUnavailable int           // resolved to a count; 0: uncoordinated, everything at once
	upAfter        time.Duration // 0: minUp
}

// up is the up duration; 0 (minUp) for a nil policy.
func (t *tagPolicy) up() time.Duration {
	if t == nil {
		return 0
	}
	return t.upAfter
}
