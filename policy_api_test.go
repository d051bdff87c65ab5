package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func newTestPolicyAPI(t *testing.T) (*policyAPI, *webhook) {
	cli := testNS(t)
	h, _ := newTestWebhook(t, cli, "s3cret")
	ps := newPolicies(cli, basePolicy(unavailable{N: 1}, time.Second))
	a := &policyAPI{h: h, policies: ps, ops: newHoldOps(cli, ps.base, dockerHub, testLogger(t)), registryDomain: dockerHub, node: "n1"}
	h.deployNow = a.deployNow
	return a, h
}

func call(t *testing.T, hf http.HandlerFunc, method, body string, auth bool) (int, string) {
	req := httptest.NewRequest(method, "/x", strings.NewReader(body))
	if auth {
		req.Header.Set("Authorization", "Bearer s3cret")
	}
	req.Header.Set("Content-Type", "application/json")
	rec := httptest.NewRecorder()
	hf(rec, req)
	return rec.Code, rec.Body.String()
}

// TestPolicyAPI: PUT /api/policy sets a tag's fields with the secret and
// answers with every policy; a bad field is a 400; no secret, a 401.
func TestPolicyAPI(t *testing.T) {
	a, _ := newTestPolicyAPI(t)
	code, body := call(t, a.put, "PUT", `{"image":"myorg/api:prod","policy":{"max_unavailable":"25%","up_after":"5s","windows":["Mon-Fri 09:00-17:00 Europe/Berlin"]}}`, true)
	if code != 200 {
		t.Fatalf("PUT = %d %s", code, body)
	}
	var v policyView
	if err := json.Unmarshal([]byte(body), &v); err != nil || len(v.Tags) != 1 || v.Tags[0].Image != "docker.io/myorg/api:prod" ||
		v.Tags[0].Effective.MaxUnavailable != (unavailable{N: 25, Percent: true}) || !strings.Contains(body, `"effective":{"promotion":"auto","max_unavailable":"25%","bake":"0s","up_after":"5s"`) {
		t.Fatalf("view = %s", body)
	}
	if code, body := call(t, a.put, "PUT", `{"default":true,"policy":{"promotion":"sometimes"}}`, true); code != 400 {
		t.Errorf("bad promotion = %d %s; want 400", code, body)
	}
	if code, _ := call(t, a.put, "PUT", `{"default":true,"policy":{"bake":"1m"}}`, false); code != 401 {
		t.Errorf("no secret = %d; want 401", code)
	}
	if code, _ := call(t, a.put, "POST", `{"default":true}`, true); code != 405 {
		t.Errorf("POST = %d; want 405", code)
	}
	if code, body := call(t, a.put, "PUT", `{"default":true,"policy":{"bake":"1m"}}`, true); code != 200 || !strings.Contains(body, `"bake":"1m0s"`) {
		t.Errorf("default = %d %s", code, body)
	}
}

// TestFreezeThawAPI: a freeze, a thaw, and a thaw of what is not frozen.
func TestFreezeThawAPI(t *testing.T) {
	a, h := newTestPolicyAPI(t)
	code, body := call(t, a.freeze, "POST", `{"scope":"myorg/api","until":"2h","reason":"release train"}`, true)
	if code != 200 || !strings.Contains(body, `"scope":"docker.io/myorg/api"`) || !strings.Contains(body, `"reason":"release train"`) {
		t.Fatalf("freeze = %d %s", code, body)
	}
	if code, body := call(t, a.freeze, "POST", `{"until":"yesterday"}`, true); code != 400 {
		t.Errorf("bad until = %d %s; want 400", code, body)
	}
	if code, body := call(t, a.thaw, "POST", `{"scope":"myorg/api"}`, true); code != 200 || !strings.Contains(body, `"released":[]`) {
		t.Errorf("thaw = %d %s", code, body)
	}
	if code, _ := call(t, a.thaw, "POST", `{"scope":"myorg/api"}`, true); code != 404 {
		t.Errorf("thaw again = %d; want 404", code)
	}
	// POST /api/deploy with now: the trigger's source says so.
	code, body = call(t, h.apiDeploy, "POST", `{"image":"myorg/api:prod","now":true}`, true)
	if code != 200 || !strings.Contains(body, `"revision"`) {
		t.Fatalf("deploy now = %d %s", code, body)
	}
	resp := must(a.ops.kv.Get(t.Context(), triggerKey("docker.io/myorg/api")))
	if len(resp.Kvs) != 1 || !bytes.Contains(resp.Kvs[0].Value, []byte(`"source":"now"`)) {
		t.Fatalf("trigger = %v", resp.Kvs)
	}
}

func TestDeployNowAsked(t *testing.T) {
	for _, tc := range []struct {
		ct, body string
		want     bool
	}{
		{"application/json", `{"image":"a:b","now":true}`, true},
		{"application/json", `{"image":"a:b"}`, false},
		{"application/x-www-form-urlencoded", `image=a:b&now=true`, true},
		{"application/x-www-form-urlencoded", `image=a:b`, false},
	} {
		if got := deployNowAsked(tc.ct, []byte(tc.body)); got != tc.want {
			t.Errorf("%s %s: %v, want %v", tc.ct, tc.body, got, tc.want)
		}
	}
}

// TestSplitPolicyArgs: the daemon's flags before the target, the policy's
// after it.
func TestSplitPolicyArgs(t *testing.T) {
	for _, tc := range []struct {
		args           []string
		daemon, fields []string
		target         string
		def, set       bool
	}{
		{[]string{"-etcd_prefix", "/x"}, []string{"-etcd_prefix", "/x"}, nil, "", false, false},
		{[]string{"-etcd_prefix", "/x", "myorg/a:b", "-max_unavailable", "25%"}, []string{"-etcd_prefix", "/x"}, []string{"-max_unavailable", "25%"}, "myorg/a:b", false, true},
		{[]string{"-max_unavailable=3", "-default", "-bake", "1m"}, []string{"-max_unavailable=3"}, []string{"-bake", "1m"}, "", true, true},
	} {
		d, target, def, set, fields := splitPolicyArgs(tc.args)
		if strings.Join(d, " ") != strings.Join(tc.daemon, " ") || target != tc.target || def != tc.def || set != tc.set || strings.Join(fields, " ") != strings.Join(tc.fields, " ") {
			t.Errorf("%v: %v %q %v %v %v", tc.args, d, target, def, set, fields)
		}
	}
	pf := newPolicyFlags(nil)
	must(0, pf.fs.Parse([]string{"-max_unavailable", "25%", "-windows", "Mon-Fri 09:00-17:00; cron * 22 * * *", "-canary_nodes", "", "-unset", "bake"}))
	rec, unset, err := pf.change()
	if err != nil || rec.MaxUnavailable.String() != "25%" || len(*rec.Windows) != 2 || rec.CanaryNodes == nil || len(*rec.CanaryNodes) != 0 || unset[0] != "bake" {
		t.Fatalf("change = %+v %v %v", rec, unset, err)
	}
}

// TestAheadInStatus: a container that runs the waiting version of its tag
// is marked in the node's status record, and logged once.
func TestAheadInStatus(t *testing.T) {
	h := newHolds(nil, nil, nil, nil, "n1", testLogger(t))
	pokes := 0
	h.changed = func() { pokes++ }
	h.remember([]waitingRecord{{Ref: holdRef, ImageID: holdNew, Reason: "frozen since x", rev: 5}})
	h.remember([]waitingRecord{{Ref: holdRef, ImageID: holdNew, Reason: "frozen since x", rev: 6}})
	if pokes != 1 {
		t.Fatalf("the status was poked %d times; want once, when the waiting versions changed", pokes)
	}
	if got := h.ahead(holdRef, holdNew); !strings.Contains(got, "which waits: frozen since x") {
		t.Fatalf("ahead = %q", got)
	}
	if h.ahead(holdRef, holdOld) != "" || h.ahead("reg:5000/other:qa", holdNew) != "" {
		t.Fatal("ahead for a container on the allowed version")
	}
	f := newFakeDocker()
	f.local[holdRef] = holdNew
	f.addContainer("app1", holdRef)
	s := newStatusReporter(f, nil, nil, nil, "n1", "dev", nil, nil, testLogger(t))
	s.ahead = h.ahead
	cs, err := s.containers(t.Context())
	if err != nil || len(cs) != 1 || cs[0].Ahead == "" {
		t.Fatalf("containers = %+v, %v; want app1 marked ahead", cs, err)
	}
}

// TestPolicyCommandsTakeTheDaemonsCommandLine: deployer policy, freeze,
// thaw and deploy reach the daemon's etcd with its whole command line; the
// daemon's -max_unavailable (0 in it) is not taken for the policy's.
func TestPolicyCommandsTakeTheDaemonsCommandLine(t *testing.T) {
	testEtcd(t) // starts the shared etcd, whose URL the command line names
	line := daemonCommandLine(t, sharedEtcdURL)
	runCmd := func(args ...string) string {
		t.Helper()
		var out, stderr bytes.Buffer
		if err := run(t.Context(), args, &out, &stderr); err != nil {
			t.Fatalf("deployer %v: %v (%s)", args, err, stderr.String())
		}
		return out.String()
	}
	with := func(cmd string, rest ...string) []string { return append(append([]string{cmd}, line...), rest...) }
	out := runCmd(with("policy", "myorg/a:b", "-max_unavailable", "25%", "-bake", "1m")...)
	if !strings.Contains(out, "127.0.0.1:5000/myorg/a:b") || !strings.Contains(out, "25%") || !strings.Contains(out, "(default)") {
		t.Fatalf("policy:\n%s", out)
	}
	out = runCmd(with("policy", "-default", "-windows", "Mon-Fri 09:00-17:00 Europe/Berlin")...)
	if !strings.Contains(out, "Mon-Fri 09:00-17:00 Europe/Berlin") {
		t.Fatalf("policy -default:\n%s", out)
	}
	out = runCmd(with("freeze", "myorg/a", "-reason", "release train", "-until", "1h")...)
	if !strings.Contains(out, "release train") {
		t.Fatalf("freeze: %s", out)
	}
	if out = runCmd(with("status")...); !strings.Contains(out, "FROZEN") || !strings.Contains(out, "POLICY") {
		t.Fatalf("status:\n%s", out)
	}
	if out = runCmd(with("thaw", "myorg/a")...); !strings.Contains(out, "thawed") {
		t.Fatalf("thaw: %s", out)
	}
	if out = runCmd(with("deploy", "myorg/a:b", "-now")...); !strings.Contains(out, "revision") {
		t.Fatalf("deploy -now: %s", out)
	}
	var stderr bytes.Buffer
	if err := run(t.Context(), with("policy", "myorg/a:b", "-promotion", "later"), io.Discard, &stderr); !errors.Is(err, errUsage) {
		t.Fatalf("a bad field: %v; want a usage error", err)
	}
}

// TestStatusShowsHolds: the cluster view carries the freezes, the stored
// policies, each tag's waiting version and the containers ahead of it;
// deployer status prints them.
func TestStatusShowsHolds(t *testing.T) {
	cli := testNS(t)
	now := time.Now()
	ops := newHoldOps(cli, basePolicy(unavailable{N: 1}, time.Second), dockerHub, testLogger(t))
	must(ops.freeze(t.Context(), freezeRequest{Scope: "reg:5000/app", Reason: "release train"}, "test"))
	must(newPolicies(cli, rolloutPolicy{}).set(t.Context(), holdRef, policy{MaxUnavailable: &unavailable{N: 50, Percent: true}}, nil, "test", now))
	w := waitingRecord{Ref: holdRef, Repo: "reg:5000/app", ImageID: holdNew, Reason: "frozen since x: release train", Since: now}
	must(cli.Put(t.Context(), waitingKey(holdRef), string(must(json.Marshal(w)))))
	st := nodeStatus{Node: "n1", Containers: []containerStatus{{Name: "app1", Image: holdRef, ImageID: holdNew, Since: now, Ahead: "runs 2222, which waits"}}}
	must(cli.Put(t.Context(), statusKey("n1"), string(must(json.Marshal(st)))))
	view, err := readStatus(t.Context(), cli, now)
	if err != nil || len(view.Freezes) != 1 || len(view.Policies) != 1 || len(view.Tags) != 1 || view.Tags[0].Waiting == nil ||
		len(view.Tags[0].Ahead) != 1 {
		t.Fatalf("view = %+v, %v", view, err)
	}
	var b bytes.Buffer
	printStatus(&b, view)
	for _, want := range []string{"AHEAD: n1 app1", "FROZEN", "reg:5000/app", "release train", "POLICY", `"max_unavailable":"50%"`} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("deployer status lacks %q:\n%s", want, b.String())
		}
	}
	view.Tags[0].Ahead = nil
	b.Reset()
	printStatus(&b, view)
	if !strings.Contains(b.String(), "waiting: 222222222222 since") {
		t.Errorf("deployer status lacks the waiting version:\n%s", b.String())
	}
}
