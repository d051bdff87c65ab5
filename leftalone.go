package main

// leftalone.go: the containers this process has decided to leave alone,
// so that a failure that will happen again is not acted on at every
// trigger: a container the stop strategy found unsupervised (nothing
// replaced it: stopping it again would only take it down again) until its
// configuration changes, and a re-create the runtime refused twice alike,
// for that version. Each is reported once, by the deploy that found it;
// later deploys pass it over quietly, and the node's status record lists
// it (status.go, `deployer status`). The record is this process's memory:
// a restart of the deployer forgets it, and the next trigger tries once
// more.

import (
	"maps"
	"slices"
	"strings"
	"sync"
	"time"
)

// leftAloneEntry is one container left alone, as the status record shows it.
type leftAloneEntry struct {
	Name   string    `json:"name"`
	ID     string    `json:"id"`
	Image  string    `json:"image,omitempty"` // the version given up on; "" for every version
	Reason string    `json:"reason"`
	Since  time.Time `json:"since"`

	config string // the configuration it was left alone with (configKey)
}

// leftAlone is the set of containers left alone, by container ID.
type leftAlone struct {
	mu      sync.Mutex
	entries map[string]leftAloneEntry
}

func newLeftAlone() *leftAlone {
	return &leftAlone{entries: map[string]leftAloneEntry{}}
}

// configKey is what "its configuration changes" compares, beside the
// container's ID: its labels (the strategy label is one). Any other
// change of configuration (image, environment, mounts) makes a new
// container, with a new ID.
func configKey(labels map[string]string) string {
	var b strings.Builder
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		b.WriteString(k + "=" + labels[k] + "\n")
	}
	return b.String()
}

// add leaves container id (called name, with labels) alone: for every
// version when image is "", else for that image ID only.
func (l *leftAlone) add(id, name string, labels map[string]string, image, reason string) {
	l.mu.Lock()
	l.entries[id] = leftAloneEntry{Name: name, ID: id, Image: image, Reason: reason, Since: time.Now().UTC(), config: configKey(labels)}
	l.mu.Unlock()
}

// check reports why container id, with labels, is left alone from the
// deploy of image newID ("" when it is not). An entry whose container's
// labels changed, or that was for another version, is dropped.
func (l *leftAlone) check(id string, labels map[string]string, newID string) string {
	l.mu.Lock()
	e, ok := l.entries[id]
	if !ok {
		l.mu.Unlock()
		return ""
	}
	if e.config == configKey(labels) && (e.Image == "" || e.Image == newID) {
		l.mu.Unlock()
		return e.Reason
	}
	delete(l.entries, id)
	l.mu.Unlock()
	return ""
}

// prune forgets the containers that are not in ids (every container
// there is): a removed container is not shown for ever.
func (l *leftAlone) prune(ids map[string]bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	maps.DeleteFunc(l.entries, func(id string, _ leftAloneEntry) bool { return !ids[id] })
}

// list returns the entries, by name.
func (l *leftAlone) list() []leftAloneEntry {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := slices.Collect(maps.Values(l.entries))
	slices.SortFunc(out, func(a, b leftAloneEntry) int { return strings.Compare(a.Name, b.Name) })
	return out
}
