package dockerc

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
)

// Events: one GET /events with the filters; events arrive in order;
// the channel is closed when the stream ends, not when it is removed.
func TestEventsStream(t *testing.T) {
	gotFilters := make(chan string, 4)
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/events" {
			http.NotFound(w, r)
			return
		}
		gotFilters <- r.URL.Query().Get("filters")
		w.WriteHeader(200)
		enc := json.NewEncoder(w)
		enc.Encode(docker.APIEvents{Type: "container", Action: "start", Actor: docker.APIActor{ID: "c1"}})
		enc.Encode(docker.APIEvents{Type: "container", Action: "die", Actor: docker.APIActor{ID: "c1"}})
		w.(http.Flusher).Flush()
		select {
		case <-release: // the stream ends
		case <-r.Context().Done(): // the client went
		}
	}))
	defer srv.Close()
	defer close(release)
	c, err := docker.NewClient(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	e := NewEvents(c, 5*time.Second)
	opts := docker.EventsOptions{Filters: map[string][]string{"type": {"container"}}}

	ch := make(chan *docker.APIEvents, 8)
	if err := e.AddEventListenerWithOptions(opts, ch); err != nil {
		t.Fatal(err)
	}
	if f := <-gotFilters; f != `{"type":["container"]}` {
		t.Errorf("filters = %q", f)
	}
	for _, want := range []string{"start", "die"} {
		select {
		case ev := <-ch:
			if ev.Action != want || ev.Actor.ID != "c1" {
				t.Errorf("event = %+v; want %s of c1", ev, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no %s event", want)
		}
	}
	// Removed: the stream is closed, the channel is not.
	e.RemoveEventListener(ch)
	select {
	case ev, ok := <-ch:
		t.Errorf("after remove: %v, %v; want nothing", ev, ok)
	case <-time.After(100 * time.Millisecond):
	}

	// Ended by the daemon: the channel is closed.
	ch2 := make(chan *docker.APIEvents, 8)
	if err := e.AddEventListenerWithOptions(opts, ch2); err != nil {
		t.Fatal(err)
	}
	<-gotFilters
	<-ch2
	<-ch2
	release <- struct{}{}
	select {
	case _, ok := <-ch2:
		if ok {
			t.Error("an event after the stream ended")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("channel not closed when the stream ended")
	}

	// Unreachable: an error, no subscription.
	srv.Close()
	if err := e.AddEventListenerWithOptions(opts, make(chan *docker.APIEvents)); err == nil {
		t.Error("subscription to a closed server succeeded")
	}
}
