package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestUnavailable(t *testing.T) {
	for _, tc := range []struct {
		in     string
		want   unavailable
		total  int
		allows int
	}{
		{"1", unavailable{N: 1}, 20, 1},
		{"0", unavailable{N: 0}, 20, 0},
		{"25%", unavailable{N: 25, Percent: true}, 20, 5},
		{"50%", unavailable{N: 50, Percent: true}, 3, 2}, // rounded up
		{"10%", unavailable{N: 10, Percent: true}, 3, 1},
		{"1%", unavailable{N: 1, Percent: true}, 0, 1}, // at least 1
		{"100%", unavailable{N: 100, Percent: true}, 7, 7},
	} {
		u, err := parseUnavailable(tc.in)
		if err != nil || u != tc.want {
			t.Errorf("parseUnavailable(%q) = %v, %v; want %v", tc.in, u, err, tc.want)
			continue
		}
		if got := u.of(tc.total); got != tc.allows {
			t.Errorf("%s of %d = %d, want %d", u, tc.total, got, tc.allows)
		}
		if u.String() != tc.in {
			t.Errorf("String() = %q, want %q", u, tc.in)
		}
	}
	for _, bad := range []string{"-1", "0%", "101%", "x", "2.5", "%"} {
		if _, err := parseUnavailable(bad); !errors.Is(err, errPolicy) {
			t.Errorf("parseUnavailable(%q) = %v, want errPolicy", bad, err)
		}
	}
}

func TestPolicyJSON(t *testing.T) {
	const in = `{"canary_nodes":["n1"],"canary_labels":["canary"],"bake":"20s","promotion":"manual",` +
		`"max_unavailable":"25%","up_after":3,"windows":["Mon-Fri 09:00-17:00 Europe/Berlin"]}`
	var rec policy
	if err := json.Unmarshal([]byte(in), &rec); err != nil {
		t.Fatal(err)
	}
	if err := rec.validate(); err != nil {
		t.Fatal(err)
	}
	p := rec.over(basePolicy(unavailable{N: 1}, time.Second))
	if !p.canary("n1", nil) || !p.canary("n9", []string{"eu", "canary"}) || p.canary("n2", []string{"eu"}) {
		t.Errorf("canary wrong: %+v", p)
	}
	if p.Bake != 20*time.Second || p.UpAfter != 3*time.Second || p.Promotion != promoteManual ||
		p.MaxUnavailable != (unavailable{N: 25, Percent: true}) || len(p.Windows) != 1 {
		t.Errorf("effective = %+v", p)
	}
	out := string(must(json.Marshal(rec)))
	const want = `{"canary_nodes":["n1"],"canary_labels":["canary"],"bake":"20s","promotion":"manual",` +
		`"max_unavailable":"25%","up_after":"3s","windows":["Mon-Fri 09:00-17:00 Europe/Berlin"]}`
	if out != want {
		t.Errorf("marshal:\n got %s\nwant %s", out, want)
	}
	eff := string(must(json.Marshal(p)))
	const wantEff = `{"canary_nodes":["n1"],"canary_labels":["canary"],"promotion":"manual","max_unavailable":"25%",` +
		`"bake":"20s","up_after":"3s","windows":["Mon-Fri 09:00-17:00 Europe/Berlin"]}`
	if eff != wantEff {
		t.Errorf("effective marshal:\n got %s\nwant %s", eff, wantEff)
	}
}

func TestPolicyValidate(t *testing.T) {
	names := func(s ...string) *[]string { return &s }
	for _, tc := range []struct {
		name string
		rec  policy
	}{
		{"promotion", policy{Promotion: "later"}},
		{"bake", policy{Bake: durPtr(-time.Second)}},
		{"up_after", policy{UpAfter: durPtr(-time.Second)}},
		{"canary node", policy{CanaryNodes: names("a b")}},
		{"canary label", policy{CanaryLabels: names("")}},
		{"window", policy{Windows: names("Mon-Fri 9-5")}},
		{"max_unavailable", policy{MaxUnavailable: &unavailable{N: 0, Percent: true}}},
	} {
		if err := tc.rec.validate(); !errors.Is(err, errPolicy) {
			t.Errorf("%s: validate = %v, want errPolicy", tc.name, err)
		}
	}
	for _, bad := range []string{`{"max_unavailable":-1}`, `{"max_unavailable":"0%"}`, `{"bake":"soon"}`, `{"up_after":true}`} {
		var rec policy
		if err := json.Unmarshal([]byte(bad), &rec); err == nil {
			t.Errorf("unmarshal %s: want an error", bad)
		}
	}
}

// TestPolicyEffectiveLayers: each field comes from the tag's record,
// else the default record, else the flags; -unset clears a field back to
// the layer below, and a record left empty is deleted.
func TestPolicyEffectiveLayers(t *testing.T) {
	ctx := context.Background()
	cli := testNS(t)
	ps := newPolicies(cli, basePolicy(unavailable{N: 1}, time.Second))
	const ref = "docker.io/myorg/foo:latest"
	now := time.Date(2026, 12, 3, 19, 0, 0, 0, time.UTC)

	p, err := ps.effective(ctx, ref)
	if err != nil || p.MaxUnavailable != (unavailable{N: 1}) || p.UpAfter != time.Second || p.Promotion != promoteAuto || p.hasCanaries() {
		t.Fatalf("no records: %+v, %v; want the flags", p, err)
	}
	if _, err := ps.set(ctx, "", policy{MaxUnavailable: &unavailable{N: 25, Percent: true}, Bake: durPtr(time.Minute)}, nil, "test", now); err != nil {
		t.Fatal(err)
	}
	if _, err := ps.set(ctx, ref, policy{Bake: durPtr(20 * time.Second), Promotion: promoteManual}, nil, "test", now); err != nil {
		t.Fatal(err)
	}
	p, err = ps.effective(ctx, ref)
	if err != nil || p.MaxUnavailable != (unavailable{N: 25, Percent: true}) || p.Bake != 20*time.Second || p.Promotion != promoteManual {
		t.Fatalf("tag over default: %+v, %v", p, err)
	}
	other, _ := ps.effective(ctx, "docker.io/myorg/bar:latest")
	if other.Bake != time.Minute || other.Promotion != promoteAuto {
		t.Fatalf("another tag takes the default: %+v", other)
	}
	// A later set changes only what it names.
	rec, err := ps.set(ctx, ref, policy{UpAfter: durPtr(5 * time.Second)}, []string{"bake"}, "test", now)
	if err != nil || rec.Bake != nil || rec.Promotion != promoteManual || rec.UpAfter == nil {
		t.Fatalf("set with unset: %+v, %v", rec, err)
	}
	p, _ = ps.effective(ctx, ref)
	if p.Bake != time.Minute || p.UpAfter != 5*time.Second {
		t.Fatalf("after unset bake: %+v", p)
	}
	list, err := ps.list(ctx)
	if err != nil || len(list) != 2 || list[0].Ref != "" || list[1].Ref != ref || list[1].Policy.UpdatedBy != "test" {
		t.Fatalf("list = %+v, %v", list, err)
	}
	if _, err := ps.set(ctx, ref, policy{}, []string{"all"}, "test", now); err != nil {
		t.Fatal(err)
	}
	if resp := must(cli.Get(ctx, policyKey(ref))); len(resp.Kvs) != 0 {
		t.Fatalf("an emptied record stays: %s", resp.Kvs[0].Value)
	}
	if _, err := ps.set(ctx, ref, policy{}, []string{"nonsense"}, "test", now); !errors.Is(err, errPolicy) {
		t.Fatalf("unset of an unknown field = %v", err)
	}
	// An unreadable record counts as unset, and says so.
	must(cli.Put(ctx, policyKey(ref), "{not json"))
	p, err = ps.effective(ctx, ref)
	if !errors.Is(err, errPolicy) || p.Bake != time.Minute {
		t.Fatalf("unreadable record: %+v, %v", p, err)
	}
}

// TestPolicySetConcurrent: writers changing different fields of one record
// at once all land (the transaction on ModRevision retries).
func TestPolicySetConcurrent(t *testing.T) {
	ctx := context.Background()
	cli := testNS(t)
	ps := newPolicies(cli, basePolicy(unavailable{N: 1}, time.Second))
	const ref = "docker.io/myorg/foo:latest"
	changes := []policy{
		{Bake: durPtr(time.Minute)}, {Promotion: promoteManual}, {UpAfter: durPtr(2 * time.Second)},
		{MaxUnavailable: &unavailable{N: 3}},
	}
	var wg sync.WaitGroup
	for _, c := range changes {
		wg.Go(func() {
			if _, err := ps.set(ctx, ref, c, nil, "t", time.Now()); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	p := must(ps.effective(ctx, ref))
	if p.Bake != time.Minute || p.Promotion != promoteManual || p.UpAfter != 2*time.Second || p.MaxUnavailable.N != 3 {
		t.Fatalf("a concurrent change was lost: %+v", p)
	}
}

func TestPolicyKeys(t *testing.T) {
	for _, ref := range []string{"", "docker.io/myorg/foo:latest", "localhost:5000/a/b:v1"} {
		key := defaultPolicyKey
		if ref != "" {
			key = policyKey(ref)
		}
		if got, ok := refFromPolicyKey(key); !ok || got != ref {
			t.Errorf("refFromPolicyKey(%q) = %q, %v; want %q", key, got, ok, ref)
		}
	}
}

// TestPolicyFlags: -max_unavailable takes a percentage, -node_labels a
// list, -up_after a duration; bad values name their flag.
func TestPolicyFlags(t *testing.T) {
	getenv := func(string) string { return "" }
	c, err := parseFlags("deployer", []string{"-max_unavailable=25%", "-node_labels", "canary, eu", "-up_after=3s"}, getenv, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.MaxUnavailable != (unavailable{N: 25, Percent: true}) || !slices.Equal(c.NodeLabels, []string{"canary", "eu"}) || c.UpAfter != 3*time.Second {
		t.Fatalf("parsed %+v %v %v", c.MaxUnavailable, c.NodeLabels, c.UpAfter)
	}
	for _, args := range [][]string{{"-max_unavailable=-1"}, {"-max_unavailable=150%"}, {"-up_after=-1s"}, {"-node_labels=a/b"}} {
		if _, err := parseFlags("deployer", args, getenv, io.Discard); err == nil || !strings.Contains(err.Error(), strings.TrimLeft(strings.Split(args[0], "=")[0], "-")) {
			t.Errorf("%v: err = %v, want one naming the flag", args, err)
		}
	}
}
