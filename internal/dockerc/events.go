package dockerc

// events.go: Docker's event stream, the daemon's one way to subscribe to
// Docker events: the status reporter's subscription, held for the
// daemon's whole life and read without a timer so that an idle node
// sleeps, and each wait for a replacement's, closed when the wait ends.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"sync"
	"time"

	docker "github.com/fsouza/go-dockerclient"
)

// Events streams the Docker daemon's events to listeners with the
// contract of go-dockerclient's AddEventListenerWithOptions (the channel
// is closed when the stream ends). Each subscription is one GET /events
// whose reader blocks until dockerd writes an event, so an idle node
// sleeps, and RemoveEventListener closes its connection and ends its
// reader. go-dockerclient's own event monitor (event.go) does neither: it
// wakes every 100 ms while any listener is subscribed (monitorEvents),
// about half a second of CPU per idle 10 minutes on our test machine, and
// when the last listener goes it only flags its reader to stop, which then
// drains the endless stream in res.Body.Close (eventHijack) and never
// closes the connection: one goroutine and one descriptor left per
// subscription.
type Events struct {
	client      *docker.Client
	callTimeout time.Duration // until the response headers arrive

	mu   sync.Mutex
	subs map[chan<- *docker.APIEvents]context.CancelFunc
}

// NewEvents returns the event streams of c; a subscription waits for
// its response headers for at most callTimeout.
func NewEvents(c *docker.Client, callTimeout time.Duration) *Events {
	return &Events{client: c, callTimeout: callTimeout, subs: map[chan<- *docker.APIEvents]context.CancelFunc{}}
}

// eventsURL is the URL of GET /events on the client's endpoint, for its
// HTTPClient (which dials the socket itself for unix:// endpoints).
func (e *Events) eventsURL(opts docker.EventsOptions) (string, error) {
	u, err := url.Parse(e.client.Endpoint())
	if err != nil {
		return "", fmt.Errorf("docker endpoint: %w", err)
	}
	switch u.Scheme {
	case "unix", "npipe":
		u.Scheme, u.Host, u.Path = "http", "docker", ""
	case "https":
	default: // tcp, http
		u.Scheme = "http"
		if e.client.TLSConfig != nil {
			u.Scheme = "https"
		}
	}
	q := url.Values{}
	if len(opts.Filters) > 0 {
		b, err := json.Marshal(opts.Filters)
		if err != nil {
			return "", fmt.Errorf("event filters: %w", err)
		}
		q.Set("filters", string(b))
	}
	if opts.Since != "" {
		q.Set("since", opts.Since)
	}
	if opts.Until != "" {
		q.Set("until", opts.Until)
	}
	u.Path, u.RawQuery = "/events", q.Encode()
	return u.String(), nil
}

// AddEventListenerWithOptions opens the stream (within callTimeout) and
// sends its events to l until the stream ends, when it closes l, or until
// RemoveEventListener.
func (e *Events) AddEventListenerWithOptions(opts docker.EventsOptions, l chan<- *docker.APIEvents) error {
	u, err := e.eventsURL(opts)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		cancel()
		return fmt.Errorf("docker events: %w", err)
	}
	// A deadline on the connection and the headers only: the body is a
	// stream that lasts as long as the subscription.
	deadline := time.AfterFunc(e.callTimeout, cancel)
	resp, err := e.client.HTTPClient.Do(req) //nolint:bodyclose // closed below on every path, by the reader goroutine once subscribed
	if !deadline.Stop() && err == nil {
		_ = resp.Body.Close()
		err = context.DeadlineExceeded
	}
	if err != nil {
		cancel()
		return fmt.Errorf("docker events: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		_ = resp.Body.Close()
		cancel()
		return fmt.Errorf("docker events: %s", resp.Status)
	}
	e.mu.Lock()
	if _, dup := e.subs[l]; dup {
		e.mu.Unlock()
		_ = resp.Body.Close()
		cancel()
		return docker.ErrListenerAlreadyExists
	}
	e.subs[l] = cancel
	e.mu.Unlock()
	go func() {
		defer func() { _ = resp.Body.Close() }()
		dec := json.NewDecoder(resp.Body)
		for {
			var ev docker.APIEvents
			if dec.Decode(&ev) != nil {
				break
			}
			select {
			case l <- &ev:
			case <-ctx.Done():
			}
			if ctx.Err() != nil {
				break
			}
		}
		e.mu.Lock()
		defer e.mu.Unlock()
		if ctx.Err() == nil { // the stream ended by itself: tell the listener
			delete(e.subs, l)
			cancel()
			close(l)
		}
	}()
	return nil
}

// RemoveEventListener ends l's subscription; l is not closed.
func (e *Events) RemoveEventListener(l chan *docker.APIEvents) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if cancel, ok := e.subs[l]; ok {
		delete(e.subs, l)
		cancel()
	}
	return nil
}
