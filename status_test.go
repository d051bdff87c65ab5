package main

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func TestClusterStatus(t *testing.T) {
	cli := testNS(t)
	const v1, v2 = "sha256:1111111111111111111111111111111111111111111111111111111111111111", "sha256:2222222222222222222222222222222222222222222222222222222222222222"
	for _, n := range []struct{ node, id string }{{"n1", v1}, {"n2", v1}, {"n3", v2}} {
		f := newFakeDocker()
		f.local["reg:5000/app:qa"] = n.id
		f.addContainer("app", "reg:5000/app:qa")
		f.addContainer("pinned", "reg:5000/app@sha256:4444444444444444444444444444444444444444444444444444444444444444")
		r := newTestReplacer(t, cli, f, n.node, 2).rollout // 2: n2's app is down, n3 still gets a slot
		s := newStatusReporter(f, nil, cli, r.leases, n.node, version, nil, nil, testLogger(t))
		cs, err := s.containers(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		if len(cs) != 1 || cs[0].Image != "reg:5000/app:qa" || cs[0].ImageID != n.id {
			t.Fatalf("%s containers = %+v; want only app from its tag", n.node, cs)
		}
		if _, err := s.write(t.Context(), cs, nil, nil, nil, 0); err != nil {
			t.Fatal(err)
		}
		if n.node == "n2" {
			// n2's app is unhealthy.
			f.containerByName("app").Health = "unhealthy"
			if _, err := s.containers(t.Context()); err != nil {
				t.Fatal(err)
			}
			if err := s.writeDown(t.Context()); err != nil {
				t.Fatal(err)
			}
		}
		if n.node == "n3" {
			// n3 holds a rollout slot.
			if _, err := r.acquire(t.Context(), "reg:5000/app:qa", staleContainer{ID: "x", Name: "app"}); err != nil {
				t.Fatal(err)
			}
		}
	}
	st, err := readStatus(t.Context(), cli, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Nodes) != 3 || len(st.Tags) != 1 {
		t.Fatalf("status = %+v; want 3 nodes and 1 tag", st)
	}
	tag := st.Tags[0]
	if len(tag.Versions) != 2 || len(tag.Rolling) != 1 || !strings.Contains(tag.Rolling[0], "n3") {
		t.Errorf("tag = %+v; want 2 versions and n3 rolling", tag)
	}
	if len(tag.Down) != 1 || tag.Down[0] != "n2 app (unhealthy)" {
		t.Errorf("tag down = %q; want n2's app, unhealthy", tag.Down)
	}
	nodes := map[string]string{}
	for _, v := range tag.Versions {
		nodes[v.ImageID] = strings.Join(v.Nodes, ",")
	}
	if nodes[v1] != "n1,n2" || nodes[v2] != "n3" {
		t.Errorf("versions on nodes = %v; want v1 on n1,n2 and v2 on n3", nodes)
	}
	if tag.SkewSeconds <= 0 {
		t.Errorf("skew = %v; want positive with two versions", tag.SkewSeconds)
	}
	// The same view as a metric, read at scrape time.
	reg := prometheus.NewRegistry()
	reg.MustRegister(newSkewCollector(cli))
	mfs, err := reg.Gather()
	if err != nil || len(mfs) != 1 || len(mfs[0].Metric) != 1 || mfs[0].Metric[0].GetGauge().GetValue() <= 0 ||
		mfs[0].Metric[0].Label[0].GetValue() != "reg:5000/app:qa" {
		t.Errorf("deployer_version_skew_seconds = %v, %v; want one positive gauge for reg:5000/app:qa", mfs, err)
	}

	var out bytes.Buffer
	printStatus(&out, st)
	for _, want := range []string{"reg:5000/app:qa", shortID(v1), "n1,n2", shortID(v2), "rolling: n3 app", "NODE", "n3"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, out.String())
		}
	}
}

func TestAPIStatusNeedsSecret(t *testing.T) {
	f := newFakeDocker()
	td := startTestDaemon(t, testEtcd(t), f, func(c *config) { c.WebhookSecret = "s" })
	for _, tt := range []struct {
		auth string
		code int
	}{{"", 401}, {"Bearer s", 200}} {
		req, _ := http.NewRequestWithContext(t.Context(), "GET", td.base+"/api/status", nil)
		if tt.auth != "" {
			req.Header.Set("Authorization", tt.auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var st clusterStatus
		json.NewDecoder(resp.Body).Decode(&st)
		resp.Body.Close()
		if resp.StatusCode != tt.code {
			t.Errorf("/api/status with %q: %d; want %d", tt.auth, resp.StatusCode, tt.code)
		}
	}
}
