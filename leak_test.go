package main

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// settledGoroutines waits up to 5 s for the process's goroutines to be
// within tol of base and fails naming both counts when they are not.
func settledGoroutines(t *testing.T, what string, base, tol int) int {
	t.Helper()
	var n int
	if _, ok := pollUntil(5*time.Second, pollEvery, func() bool { n = runtime.NumGoroutine(); return n <= base+tol }); !ok {
		t.Errorf("%s: %d goroutines, %d before; want at most %d more", what, n, base, tol)
	}
	return n
}

// connCounter counts a test server's open connections.
type connCounter struct {
	mu   sync.Mutex
	open map[net.Conn]bool
}

func countConns(s *httptest.Server) *connCounter {
	c := &connCounter{open: map[net.Conn]bool{}}
	s.Config.ConnState = func(conn net.Conn, st http.ConnState) {
		c.mu.Lock()
		defer c.mu.Unlock()
		switch st {
		case http.StateNew:
			c.open[conn] = true
		case http.StateClosed, http.StateHijacked:
			delete(c.open, conn)
		}
	}
	return c
}

func (c *connCounter) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.open)
}

// A Slack that fails (500) or never answers costs nothing that stays: after
// many failed posts, goroutines are back at their level and at most one
// connection (kept alive for the next post) is open.
func TestSlackFailuresLeakNothing(t *testing.T) {
	tests := []struct {
		name    string
		handler http.HandlerFunc
	}{
		{"500", func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "internal error", http.StatusInternalServerError)
		}},
		{"never answers", func(w http.ResponseWriter, r *http.Request) {
			// The server sees the client go only once the body is read.
			_, _ = io.Copy(io.Discard, r.Body)
			<-r.Context().Done() // until the client gives up
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := httptest.NewUnstartedServer(tt.handler)
			conns := countConns(srv)
			srv.Start()
			defer srv.Close()
			defer srv.CloseClientConnections() // Close waits for every request
			m := newMetrics()
			n, s := newSlackHub(srv.URL, testLogger(t), m)
			s.client.Timeout = 50 * time.Millisecond
			ctx, cancel := context.WithCancel(t.Context())
			done := make(chan error)
			go func() { done <- n.run(ctx) }()

			post := func(k int) {
				for range k {
					n.notify(report{Node: "n1", Repo: "r", Failed: []error{errors.New("x")}})
				}
				eventually(t, 10*time.Second, "the posts to fail", func() bool {
					return testutil.ToFloat64(m.slackPosts.WithLabelValues("error")) >= float64(k)
				})
			}
			post(1) // warm-up: the client's first connection
			base := runtime.NumGoroutine()
			m.slackPosts.Reset()
			post(30)
			settledGoroutines(t, "after 30 failed Slack posts", base, 3)
			eventually(t, 5*time.Second, "at most one connection open", func() bool { return conns.count() <= 1 })
			cancel()
			if err := <-done; err != nil {
				t.Fatal(err)
			}
		})
	}
}
