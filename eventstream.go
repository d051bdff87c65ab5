package main

// eventstream.go: the part of the Docker client that subscribes to
// Docker events (internal/dockerc's Events in production).

import (
	docker "github.com/fsouza/go-dockerclient"
)

// eventAPI is the part of the Docker client the status reporter's event
// subscription uses (dockerc.Events in production).
type eventAPI interface {
	// AddEventListenerWithOptions subscribes to the daemon's events; the
	// channel is closed when the event stream ends.
	AddEventListenerWithOptions(opts docker.EventsOptions, listener chan<- *docker.APIEvents) error
	// RemoveEventListener ends a subscription.
	RemoveEventListener(listener chan *docker.APIEvents) error
}
