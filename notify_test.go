package main

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// slackRecorder is an httptest Slack incoming webhook that records the
// payloads; it answers 429 to the first `limited` posts.
type slackRecorder struct {
	*httptest.Server
	mu       sync.Mutex
	payloads []map[string]any
	at       []time.Time // arrival of each payload
	got      chan map[string]any
	limited  atomic.Int32
}

func newSlackRecorder(t testing.TB) *slackRecorder {
	s := &slackRecorder{got: make(chan map[string]any, 1000)}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.limited.Add(-1) >= 0 {
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusTooManyRequests)
			return
		}
		var p map[string]any
		if err := json.NewDecoder(r.Body).Decode(&p); err != nil {
			http.Error(w, "bad json", 400)
			return
		}
		s.mu.Lock()
		s.payloads = append(s.payloads, p)
		s.at = append(s.at, time.Now())
		s.mu.Unlock()
		select {
		case s.got <- p:
		default: // nobody reads next(); the payloads slice has it
		}
		w.Write([]byte("ok"))
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *slackRecorder) next(t testing.TB) map[string]any {
	t.Helper()
	select {
	case p := <-s.got:
		return p
	case <-time.After(10 * time.Second):
		t.Fatal("no Slack message within 10s")
		return nil
	}
}

// newSlackHub is a notification hub with one sender, a Slack webhook at
// url, that tells every node's report (-notify_per_node).
func newSlackHub(url string, log *slog.Logger, m *metrics) (*notifyHub, *slackWebhook) {
	s := newSlackWebhook(url, "Deployer", log)
	return newNotifyHub([]sender{s}, true, log, m), s
}

func TestSlackNotifier(t *testing.T) {
	rec := newSlackRecorder(t)
	n, s := newSlackHub(rec.URL, testLogger(t), newMetrics())
	s.maxWait = 10 * time.Millisecond // Retry-After is 1s; keep the test quick
	rec.limited.Store(1)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error)
	go func() { done <- n.run(ctx) }()

	n.notify(report{Node: "n1", Repo: "myorg/foo", Tags: []tagReport{{Tag: "qa", OldID: "sha256:aaaaaaaaaaaaffff", NewID: "sha256:bbbbbbbbbbbbffff"}},
		Stopped: []staleContainer{{Name: "foo.service", ImageID: "sha256:aaaaaaaaaaaaffff", NewID: "sha256:bbbbbbbbbbbbffff"}}})
	p := rec.next(t)
	if p["username"] != "Deployer" {
		t.Errorf("username = %v; want Deployer", p["username"])
	}
	text, _ := p["text"].(string)
	for _, want := range []string{"n1", "myorg/foo:qa", "aaaaaaaaaaaa → bbbbbbbbbbbb", "foo.service"} {
		if !strings.Contains(text, want) {
			t.Errorf("text %q lacks %q", text, want)
		}
	}
	if rec.limited.Load() >= 0 {
		t.Error("the 429 was not answered")
	}

	n.notify(report{Node: "n1", Repo: "myorg/foo", Tags: []tagReport{{Tag: "qa", PullErr: errors.New("manifest unknown")}}})
	p = rec.next(t)
	if text, _ := p["text"].(string); !strings.Contains(text, "FAILED") || !strings.Contains(text, "manifest unknown") {
		t.Errorf("failure text %q; want it marked FAILED with the error", text)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestSlackNotifierNeverBlocks(t *testing.T) {
	// Slack that never answers: notify must still return at once, and
	// drop what does not fit in the queue.
	block := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-block }))
	defer srv.Close()
	defer close(block)
	m := newMetrics()
	n, _ := newSlackHub(srv.URL, testLogger(t), m)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	go n.run(ctx)
	for range cap(n.queue) + 10 {
		n.notify(report{Node: "n1", Repo: "r", Failed: []error{errors.New("x")}})
	}
	// One message may be in flight; the rest fill the queue or are dropped.
	if got := testutil.ToFloat64(m.slackPosts.WithLabelValues("dropped")); got < 9 {
		t.Errorf("%v messages dropped; want at least 9 of %d over a queue of %d", got, cap(n.queue)+10, cap(n.queue))
	}
}

func TestReportWorthTelling(t *testing.T) {
	tests := []struct {
		name string
		r    report
		want bool
	}{
		{"up to date", report{Tags: []tagReport{{Tag: "qa", OldID: "a", NewID: "a"}}}, false},
		{"nothing local", report{}, false},
		{"new image", report{Tags: []tagReport{{Tag: "qa", OldID: "a", NewID: "b"}}}, true},
		{"pull failed", report{Tags: []tagReport{{Tag: "qa", PullErr: errors.New("x")}}}, true},
		{"stale container from before", report{Tags: []tagReport{{Tag: "qa", OldID: "b", NewID: "b"}}, Stopped: []staleContainer{{Name: "c"}}}, true},
	}
	for _, tt := range tests {
		if got := tt.r.worthTelling(); got != tt.want {
			t.Errorf("%s: worthTelling = %v; want %v", tt.name, got, tt.want)
		}
	}
}
