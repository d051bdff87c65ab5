package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// slackAPIRecorder speaks the two paths of Slack's Web API the threads
// use, chat.postMessage and chat.update, and records each call's form.
type slackAPIRecorder struct {
	*httptest.Server
	mu    sync.Mutex
	calls []slackCall
	n     int
}

type slackCall struct {
	method string // postMessage, update
	form   map[string]string
}

func newSlackAPIRecorder(t testing.TB) *slackAPIRecorder {
	s := &slackAPIRecorder{}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := r.ParseForm(); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		method, _ := strings.CutPrefix(r.URL.Path, "/chat.")
		form := map[string]string{}
		for k := range r.PostForm {
			form[k] = r.PostForm.Get(k)
		}
		if r.Header.Get("Authorization") != "Bearer xoxb-test-token" && form["token"] != "xoxb-test-token" {
			json.NewEncoder(w).Encode(map[string]any{"ok": false, "error": "invalid_auth"})
			return
		}
		s.mu.Lock()
		s.n++
		ts := fmt.Sprintf("1700000000.%06d", s.n)
		if method == "update" {
			ts = form["ts"]
		}
		s.calls = append(s.calls, slackCall{method, form})
		s.mu.Unlock()
		json.NewEncoder(w).Encode(map[string]any{"ok": true, "channel": "C123", "ts": ts, "text": form["text"]})
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *slackAPIRecorder) got() []slackCall {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]slackCall(nil), s.calls...)
}

// TestSlackThreadPerRollout: three nodes finish one version; with a bot
// token the rollout is one thread: one parent message, one reply per
// node, the final report as a reply shown in the channel and as the
// parent's last text.
func TestSlackThreadPerRollout(t *testing.T) {
	cli := testNS(t)
	api := newSlackAPIRecorder(t)
	v := rolledOut()
	v.Outcome, v.Completed, v.LastSeconds = outcomeRollingOut, time.Time{}, 0
	v.Nodes = map[string]nodeResult{"n1": {Converged: at(1.9)}}
	key := putVersion(t, cli, v)
	told := rolledOut() // an earlier version, reported before the token was set: no thread
	told.Version, told.Reported = 2, &reportMark{Node: "n1", Outcome: outcomeRolledOut}
	putVersion(t, cli, told)
	running := []string{"n1", "n2", "n3"}
	for _, n := range running { // what the nodes run, as their status records say
		b, _ := json.Marshal(nodeStatus{Node: n, Containers: []containerStatus{{Image: v.Image}}})
		if _, err := cli.Put(t.Context(), statusKey(n), string(b)); err != nil {
			t.Fatal(err)
		}
	}
	var log sentLog
	now := at(4.2).Add(time.Minute)
	var reporters []*rolloutReporter
	for _, n := range running {
		r := newTestReporter(t, cli, n, log.sink(n), now)
		r.threads = newSlackThreads("xoxb-test-token", "C123", "Deployer", api.URL+"/")
		reporters = append(reporters, r)
	}
	pass := func() {
		var wg sync.WaitGroup
		for _, r := range reporters {
			wg.Go(func() {
				if _, err := r.loopOnce(t.Context()); err != nil {
					t.Error(err)
				}
			})
		}
		wg.Wait()
	}
	// n1 converged: the thread and n1's reply.
	for range 3 {
		pass()
	}
	// n2 and n3 converge: the version rolls out.
	for _, n := range []string{"n2", "n3"} {
		if _, err := (&rolloutReporter{etcd: cli, timeout: 5 * time.Second}).modify(t.Context(), key, "", func(v *ledgerVersion) bool {
			v.Nodes[n] = nodeResult{Converged: at(4.2)}
			if n == "n3" {
				v.Outcome, v.Completed, v.LastSeconds = outcomeRolledOut, at(4.2), 4.2
			}
			return true
		}); err != nil {
			t.Fatal(err)
		}
		for range 3 {
			pass()
		}
	}
	eventually(t, 10*time.Second, "the report marked sent", func() bool {
		pass()
		return readVersion(t, cli, key).Reported != nil
	})
	pass()

	var parents, replies, broadcasts int
	var lastUpdate string
	for _, c := range api.got() {
		switch {
		case c.method == "postMessage" && c.form["thread_ts"] == "":
			parents++
		case c.method == "postMessage":
			replies++
			if c.form["reply_broadcast"] == "true" {
				broadcasts++
			}
		case c.method == "update":
			lastUpdate = c.form["text"]
		}
		if c.form["channel"] != "C123" {
			t.Errorf("%s to channel %q; want C123", c.method, c.form["channel"])
		}
	}
	if parents != 1 || replies != 4 || broadcasts != 1 {
		t.Errorf("%d parent messages, %d replies (%d in the channel too); want 1, 4 (3 nodes and the report), 1", parents, replies, broadcasts)
	}
	if !strings.HasPrefix(lastUpdate, "Rolled out 127.0.0.1:5000/myorg/app:qa (version 3") {
		t.Errorf("the parent's last text %q; want the final report", lastUpdate)
	}
	if got := log.texts(); len(got) != 1 {
		t.Errorf("%d reports to the other services; want 1", len(got))
	}
	if v := readVersion(t, cli, key); v.SlackThread == nil || len(v.SlackThread.Replied) != 3 {
		t.Errorf("thread = %+v; want three replies recorded", v.SlackThread)
	}
	if resp, _ := cli.Get(context.Background(), reportsPrefix, clientv3.WithPrefix()); len(resp.Kvs) != 0 {
		t.Errorf("%d claims left; want none", len(resp.Kvs))
	}
}
