package main

import (
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"

	"github.com/die-net/deployer/internal/dockerc"
)

// eventServer is a Docker daemon's GET /events as dockerd serves it: a
// stream that stays open, with an event now and then (other containers'
// activity), until the client goes. It counts the connections open.
type eventServer struct {
	*httptest.Server
	mu       sync.Mutex
	open     map[net.Conn]bool
	requests int
}

func newEventServer(t *testing.T) *eventServer {
	t.Helper()
	s := &eventServer{open: map[net.Conn]bool{}}
	s.Server = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/events" {
			http.NotFound(w, r)
			return
		}
		s.mu.Lock()
		s.requests++
		s.mu.Unlock()
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		enc := json.NewEncoder(w)
		for {
			select {
			case <-r.Context().Done():
				return
			case now := <-tick.C:
				ev := docker.APIEvents{Type: "container", Action: "exec_start", Actor: docker.APIActor{ID: "other"}, Time: now.Unix(), TimeNano: now.UnixNano()}
				if enc.Encode(ev) != nil {
					return
				}
				w.(http.Flusher).Flush()
			}
		}
	}))
	s.Config.ConnState = func(c net.Conn, st http.ConnState) {
		s.mu.Lock()
		defer s.mu.Unlock()
		switch st {
		case http.StateNew:
			s.open[c] = true
		case http.StateClosed, http.StateHijacked:
			delete(s.open, c)
		}
	}
	s.Start()
	t.Cleanup(func() {
		// Close waits for every request; a stream the client
		// never closes is ended here.
		s.CloseClientConnections()
		s.Close()
	})
	return s
}

func (s *eventServer) counts() (open, requests int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.open), s.requests
}

// Every wait for a replacement subscribes to Docker's events and ends its
// subscription when done. The daemon's waiter must close the stream's
// connection then (and with it the goroutine reading it): one left open
// per wait is a descriptor and a goroutine leaked per deploy.
func TestUpWaitSubscriptionEndsItsStream(t *testing.T) {
	srv := newEventServer(t)
	c, err := docker.NewClient(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	d, err := newDaemon(config{Registry: "reg:5000", NodeName: "n1", EtcdPrefix: testPrefix(t), RestartStrategy: strategyStop}, testNS(t), dockerc.NewFor(c, srv.URL, "1.41"), testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	const waits = 5
	for i := range waits {
		ev := d.parker.wait.watch()
		eventually(t, 5*time.Second, "the subscription's stream", func() bool { _, n := srv.counts(); return n == i+1 })
		select { // the stream delivers
		case <-ev.events():
		case <-time.After(5 * time.Second):
			t.Fatal("no event on the subscription")
		}
		ev.close()
	}
	if _, ok := pollUntil(5*time.Second, pollEvery, func() bool { open, _ := srv.counts(); return open == 0 }); !ok {
		open, _ := srv.counts()
		t.Fatalf("%d event streams still open 5s after their %d subscriptions ended; want 0", open, waits)
	}
}
