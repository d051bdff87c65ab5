package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// slackTexts is the text of every post s received.
func slackTexts(s *slackRecorder) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, p := range s.payloads {
		out = append(out, p["text"].(string))
	}
	return out
}

// TestPinCommandsAndAPI: deployer pin and unpin, and POST /api/pin and
// /api/unpin, record the pin and announce it on Slack once, from where
// they run; deployer rollback announces the rollback once.
func TestPinCommandsAndAPI(t *testing.T) {
	f := newRollbackFixture(t, outcomeRolledOut, outcomeRolledOut, outcomeRolledOut)
	slack := newSlackRecorder(t)
	common := []string{"-etcd_nodes", sharedEtcdURL, "-etcd_prefix", testPrefix(t), "-slack_webhook_url", slack.URL}
	deployer := func(args ...string) string {
		t.Helper()
		var out, errOut bytes.Buffer
		if err := run(t.Context(), append(args, common...), &out, &errOut); err != nil {
			t.Fatalf("deployer %s: %v %s", strings.Join(args, " "), err, errOut.String())
		}
		return out.String()
	}
	out := deployer("pin", f.ref, "1")
	if !strings.Contains(out, "pinned to version 1 ("+shortID(f.imgs[0].id)+") by deployer pin "+f.ref+" 1 on ") || !strings.Contains(out, "from version 3") {
		t.Errorf("deployer pin printed: %s", out)
	}
	pin, _, err := readPin(t.Context(), f.kv, f.ref)
	if err != nil || pin == nil || pin.ImageID != f.imgs[0].id || pin.AskedBy.Host == "" {
		t.Fatalf("pin %+v, %v", pin, err)
	}
	if texts := slackTexts(slack); len(texts) != 1 || !strings.Contains(texts[0], "pinned to version 1") {
		t.Errorf("Slack got %q; want the pin once", texts)
	}
	out = deployer("unpin", f.ref)
	if !strings.Contains(out, "unpinned by deployer unpin "+f.ref) || !strings.Contains(out, "pinned to version 1") {
		t.Errorf("deployer unpin printed: %s", out)
	}
	if texts := slackTexts(slack); len(texts) != 2 || !strings.Contains(texts[1], "unpinned") {
		t.Errorf("Slack got %q; want the unpin once more", texts)
	}
	var errOut bytes.Buffer
	if err := run(t.Context(), append([]string{"unpin", f.ref, "2"}, common...), &bytes.Buffer{}, &errOut); err == nil {
		t.Error("deployer unpin took a version")
	}

	// POST /api/pin and /api/unpin, behind the webhook secret, announced
	// by the daemon that took them.
	h, _ := newTestWebhook(t, testEtcd(t), "s3cret")
	var said []string
	say := func(s string) { said = append(said, s) }
	p := newPinner(f.kv, dockerHub, 20)
	pinH, unpinH := pinHandler(h, p, "n1", false, say), pinHandler(h, p, "n1", true, say)
	bearer := map[string]string{"Authorization": "Bearer s3cret"}
	for _, tc := range []struct {
		name    string
		handler http.HandlerFunc
		req     hookRequest
		code    int
	}{
		{"pin without the secret", pinH, hookRequest{target: "/api/pin", body: `{"image":"` + f.ref + `"}`}, 401},
		{"GET", pinH, hookRequest{method: "GET", target: "/api/pin", headers: bearer}, 405},
		{"no image", pinH, hookRequest{target: "/api/pin", headers: bearer, body: `{}`}, 400},
		{"a version not in the ledger", pinH, hookRequest{target: "/api/pin", headers: bearer, body: `{"image":"` + f.ref + `","to":"9"}`}, 400},
		{"unpin of a tag not pinned", unpinH, hookRequest{target: "/api/unpin", headers: bearer, body: `{"image":"` + f.ref + `"}`}, 400},
		{"pin to version 2", pinH, hookRequest{target: "/api/pin", headers: bearer, body: `{"image":"` + f.ref + `","to":"2"}`}, 200},
		{"unpin", unpinH, hookRequest{target: "/api/unpin", headers: bearer, body: `{"image":"` + f.ref + `"}`}, 200},
	} {
		w := serveHook(t, tc.handler, tc.req)
		if w.Code != tc.code {
			t.Errorf("%s: %d %s; want %d", tc.name, w.Code, w.Body, tc.code)
		}
	}
	if len(said) != 2 || !strings.Contains(said[0], "pinned to version 2") || !strings.Contains(said[0], "POST /api/pin from ") || !strings.Contains(said[1], "unpinned") {
		t.Errorf("the daemon announced %q; want the pin and the unpin, once each", said)
	}
	vs := readVersions(t, f.kv.(*clientv3.Client), f.ref)
	if vs[0].AskedBy.Command != "POST /api/pin" || vs[0].AskedBy.Remote == "" {
		t.Errorf("the API pin's version asked by %+v", vs[0].AskedBy)
	}

	// deployer rollback announces itself once.
	deployer("rollback", f.ref, "-to", "1")
	if texts := slackTexts(slack); len(texts) != 3 || !strings.Contains(texts[2], "rolled back by deployer rollback") {
		t.Errorf("Slack got %q; want the rollback once", texts)
	}
}

// TestStatusShowsTagState: deployer status and GET /api/status show per
// tag whether it is rolling out, halted, rolled back (to which version)
// or pinned (to which version, by whom).
func TestStatusShowsTagState(t *testing.T) {
	cli := testNS(t)
	const other = "127.0.0.1:5000/other:latest"
	ledgerAt(t, cli, ledgerVersion{ImageID: imgA, Outcome: outcomeRolledOut}, ledgerVersion{ImageID: imgX, Outcome: outcomeRolledBack},
		ledgerVersion{ImageID: imgA, Outcome: outcomeRollingOut, AskedBy: askedBy{Source: "rollback"}})
	putVersions(t, cli, ledgerVersion{Version: 1, Image: other, ImageID: imgY, Outcome: outcomeHalted})
	b, _ := json.Marshal(nodeStatus{Node: "n1", Containers: []containerStatus{{Name: "web", Image: gateRef, ImageID: imgA}, {Name: "o", Image: other, ImageID: imgY}}})
	if _, err := cli.Put(t.Context(), statusKey("n1"), string(b)); err != nil {
		t.Fatal(err)
	}
	pb, _ := json.Marshal(pinRecord{Image: gateRef, Version: 1, ImageID: imgA, AskedBy: askedBy{Command: "deployer pin app 1", Host: "ops"}, Time: time.Now()})
	if _, err := cli.Put(t.Context(), pinKey(gateRef), string(pb)); err != nil {
		t.Fatal(err)
	}
	st, err := readStatus(t.Context(), cli, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	printStatus(&buf, st)
	for _, want := range []string{
		"PINNED to version 1 (" + shortID(imgA) + ") by deployer pin app 1 on ops",
		"rolled back from version 2 to version 1's image (" + shortID(imgA) + "), rolling out",
		"halted: version 1 (" + shortID(imgY) + ")",
	} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("deployer status does not say %q:\n%s", want, buf.String())
		}
	}
	js, _ := json.Marshal(st)
	if !strings.Contains(string(js), `"pinned":{`) || !strings.Contains(string(js), `"state":"rolled back from version 2`) {
		t.Errorf("GET /api/status: %s", js)
	}
}

// TestPinTakesTheDaemonsCommandLine: deployer pin and unpin take the
// daemon's whole command line, the image before or after it.
func TestPinTakesTheDaemonsCommandLine(t *testing.T) {
	testEtcd(t)
	line := daemonCommandLine(t, sharedEtcdURL)
	for _, args := range [][]string{
		append([]string{"pin", "myorg/none:qa"}, line...),
		append(append([]string{"pin"}, line...), "myorg/none:qa", "3"),
		append(append([]string{"unpin"}, line...), "myorg/none:qa"),
	} {
		err := run(t.Context(), args, &bytes.Buffer{}, &bytes.Buffer{})
		if errors.Is(err, errUsage) || !errors.Is(err, errLedgerTarget) && !errors.Is(err, errNotPinned) {
			t.Errorf("deployer %s … = %v; want the command line taken, and nothing to pin or unpin", args[0], err)
		}
	}
}

// TestRollbackLiftsAPin: a pin would hold the version a rollback puts
// back; the rollback lifts it in its transaction, and says so.
func TestRollbackLiftsAPin(t *testing.T) {
	f := newRollbackFixture(t, outcomeRolledOut, outcomeRolledOut, outcomeRolledOut)
	p := newPinner(f.kv, dockerHub, 20)
	if _, _, err := p.pin(t.Context(), pinRequest{Image: f.ref, To: "3"}, askedBy{Command: "deployer pin", Host: "ops"}); err != nil {
		t.Fatal(err)
	}
	asked := askedBy{Command: "deployer rollback", Host: "ops"}
	res, err := f.rb.rollback(t.Context(), rollbackRequest{Image: f.ref, To: "1"}, asked)
	if err != nil {
		t.Fatal(err)
	}
	if pin, _, _ := readPin(t.Context(), f.kv, f.ref); pin != nil {
		t.Errorf("the pin to version %d outlived the rollback to version 1: every node would hold version 1", pin.Version)
	}
	if line := res.lines(asked)[0]; res.Unpinned != 3 || !strings.Contains(line, "the pin to version 3 is lifted") {
		t.Errorf("unpinned %d, the rollback says %q; want the pin to version 3 lifted", res.Unpinned, line)
	}
}

// TestHistoryShowsHolds: deployer history says why a version was held.
func TestHistoryShowsHolds(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	h := historyView{Time: now, Tags: []tagHistory{{Image: gateRef, Versions: []ledgerVersion{
		{Version: 3, ImageID: imgY, Pushed: now, Outcome: outcomeHeld, Held: "held by pin to version 1 (aaaaaaaaaaaa) by deployer pin on ops"},
		{Version: 2, ImageID: imgX, Pushed: now, Outcome: outcomeHalted, Held: "quarantined: version 2 (bbbbbbbbbbbb) halted"},
	}}}}
	var buf bytes.Buffer
	printHistory(&buf, h)
	for _, want := range []string{" held by pin to version 1 (aaaaaaaaaaaa) by deployer pin on ops\n", " halted; quarantined: version 2 (bbbbbbbbbbbb) halted\n"} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("deployer history lacks %q:\n%s", want, buf.String())
		}
	}
}

// TestExplicitDeployLiftsTheHalt: a pin or a rollback to a halted version
// deletes its halt record in the same transaction (the rollout would hold
// it otherwise); a rollback away from a halted version keeps its halt.
func TestExplicitDeployLiftsTheHalt(t *testing.T) {
	for _, tc := range []struct {
		name     string
		explicit func(f *rollbackFixture) error
		lifted   bool
	}{
		{"pin to it", func(f *rollbackFixture) error {
			_, _, err := newPinner(f.kv, dockerHub, 20).pin(t.Context(), pinRequest{Image: f.ref, To: "2"}, askedBy{Command: "deployer pin"})
			return err
		}, true},
		{"rollback to it", func(f *rollbackFixture) error {
			_, err := f.rb.rollback(t.Context(), rollbackRequest{Image: f.ref, To: "2"}, askedBy{Command: "deployer rollback"})
			return err
		}, true},
		{"rollback away from it", func(f *rollbackFixture) error {
			_, err := f.rb.rollback(t.Context(), rollbackRequest{Image: f.ref, To: "1"}, askedBy{Command: "deployer rollback"})
			return err
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newRollbackFixture(t, outcomeRolledOut, outcomeHalted, outcomeRolledOut)
			if tc.name == "rollback away from it" {
				f = newRollbackFixture(t, outcomeRolledOut, outcomeHalted)
			}
			b, _ := json.Marshal(halt{ImageID: f.imgs[1].id, Node: "n1", Reason: "exited"})
			if _, err := f.kv.Put(t.Context(), haltKey(f.ref), string(b)); err != nil {
				t.Fatal(err)
			}
			if err := tc.explicit(f); err != nil {
				t.Fatal(err)
			}
			resp, err := f.kv.Get(t.Context(), haltKey(f.ref))
			if err != nil {
				t.Fatal(err)
			}
			if gone := len(resp.Kvs) == 0; gone != tc.lifted {
				t.Errorf("halt record gone: %t; want %t", gone, tc.lifted)
			}
		})
	}
}
