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
	changed func() // called after every change (the status reporter's poke); may be nil
}

func newLeftAlone() *leftAlone {
	return &leftAlone{entries: map[string]leftAloneEntry{}}
}

// configKey is what "its configuration changes" compares, beside the
// container's ID: its labels (the strategy label is one). Any other
// change of configuration (image, environment, mounts) makes a new
// container, with a new ID.
func configKey(c staleContainer) string {
	var b strings.Builder
	for _, k := range slices.Sorted(maps.Keys(c.Labels)) {
		b.WriteString(k + "=" + c.Labels[k] + "\n")
	}
	return b.String()
}

// add leaves container c alone: for every version when image is "", else
// for that image ID only.
func (l *leftAlone) add(c staleContainer, image, reason string) {
	l.mu.Lock()
	l.entries[c.ID] = leftAloneEntry{Name: c.Name, ID: c.ID, Image: image, Reason: reason, Since: time.Now().UTC(), config: configKey(c)}
	changed := l.changed
	l.mu.Unlock()
	if changed != nil {
		changed()
	}
}

// check reports why c is left alone ("" when it is not). An entry whose
// container's labels changed, or that was for another version, is
// dropped.
func (l *leftAlone) check(c staleContainer) string {
	l.mu.Lock()
	e, ok := l.entries[c.ID]
	if !ok {
		l.mu.Unlock()
		return ""
	}
	if e.config == configKey(c) && (e.Image == "" || e.Image == c.NewID) {
		l.mu.Unlock()
		return e.Reason
	}
	delete(l.entries, c.ID)
	changed := l.changed
	l.mu.Unlock()
	if changed != nil {
		changed()
	}
	return ""
}

// forget drops what is left alone whose container is not in ids (the
// containers that exist): a removed container is not shown for ever.
func (l *leftAlone) forget(ids map[string]bool) {
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
