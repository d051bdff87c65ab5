package main

// freeze.go: freezes (README, Release policy). A freeze is a record in
// etcd (_freeze/<scope>) that keeps new versions from replacing
// containers: of every image (scope "_all"), of one repository, or of one
// image tag, until it is thawed or its -until passes. While a version is
// held (by a freeze or outside its tag's deploy windows, policy.go), a
// waiting record (_waiting/<image ref>) names the newest version that
// waits, so that its release writes the tag's trigger again (hold.go).

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/distribution/reference"
	"go.etcd.io/etcd/api/v3/mvccpb"
)

// errHeld: a freeze or a closed window holds the version (replace.go's
// gate, hold.go).
var errHeld = errors.New("held")

// freezeAll is the scope of a freeze of every image.
const freezeAll = "_all"

// freezeRecord is the value of a freeze key.
type freezeRecord struct {
	Scope  string    `json:"scope"` // freezeAll, a repository (docker.io/myorg/foo) or an image tag (docker.io/myorg/foo:latest)
	Since  time.Time `json:"since"`
	Until  time.Time `json:"until,omitzero"` // zero: until thawed
	Reason string    `json:"reason,omitempty"`
	By     string    `json:"by,omitempty"` // the command or request and its host

	rev int64 // the key's ModRevision, when read
}

// active reports whether the freeze holds at now.
func (f freezeRecord) active(now time.Time) bool { return f.Until.IsZero() || now.Before(f.Until) }

// covers reports whether the freeze's scope includes ref.
func (f freezeRecord) covers(ref reference.NamedTagged) bool {
	return f.Scope == freezeAll || f.Scope == ref.Name() || f.Scope == ref.String()
}

// holdText is the reason a held version shows: "frozen since …: reason".
func (f freezeRecord) holdText() string {
	s := "frozen since " + f.Since.UTC().Format(time.DateTime) + " UTC"
	if !f.Until.IsZero() {
		s += " until " + f.Until.UTC().Format(time.DateTime) + " UTC"
	}
	if f.Scope != freezeAll {
		s += " (" + reference.FamiliarString(mustNamed(f.Scope)) + ")"
	}
	if f.Reason != "" {
		s += ": " + f.Reason
	}
	return s
}

// mustNamed parses a canonical scope for display; a scope that does not
// parse shows as it is.
func mustNamed(s string) reference.Named {
	if n, err := reference.ParseNormalizedNamed(s); err == nil {
		return n
	}
	return rawName(s)
}

type rawName string

func (n rawName) Name() string   { return string(n) }
func (n rawName) String() string { return string(n) }

// parseScope reads the scope of deployer freeze and thaw: "" for every
// image, else repository or repository:tag, bare names belonging to
// -registry as for a trigger.
func parseScope(s, registryDomain string) (string, error) {
	if s == "" || s == freezeAll {
		return freezeAll, nil
	}
	full := s
	if !hasDomain(s) && registryDomain != dockerHub {
		full = registryDomain + "/" + s
	}
	named, err := reference.ParseNormalizedNamed(full)
	if err != nil {
		return "", fmt.Errorf("%w: %q: %w", errUsage, s, err)
	}
	if _, digested := named.(reference.Digested); digested {
		return "", fmt.Errorf("%w: %q: want repository or repository:tag", errUsage, s)
	}
	if t, ok := named.(reference.NamedTagged); ok {
		return t.String(), nil
	}
	return named.Name(), nil
}

// decodeFreezes reads the freeze records; unreadable ones are skipped.
func decodeFreezes(kvs []*mvccpb.KeyValue) []freezeRecord {
	var out []freezeRecord
	for _, kv := range kvs {
		var f freezeRecord
		if json.Unmarshal(kv.Value, &f) != nil || f.Scope == "" {
			continue
		}
		f.rev = kv.ModRevision
		out = append(out, f)
	}
	slices.SortFunc(out, func(a, b freezeRecord) int { return a.Since.Compare(b.Since) })
	return out
}

// waitingRecord is the value of a waiting key: the newest version of a
// tag that a hold keeps from replacing containers.
type waitingRecord struct {
	Ref     string    `json:"ref"`  // the image tag, canonical
	Repo    string    `json:"repo"` // the repository whose trigger releases it
	ImageID string    `json:"image_id"`
	Digest  string    `json:"digest,omitempty"`
	Reason  string    `json:"reason"` // as the node that recorded it saw it
	Since   time.Time `json:"since"`  // when it was first held
	Node    string    `json:"node"`   // the node that recorded it

	rev int64 // the key's ModRevision, when read
}

func decodeWaiting(kvs []*mvccpb.KeyValue) []waitingRecord {
	var out []waitingRecord
	for _, kv := range kvs {
		var w waitingRecord
		if json.Unmarshal(kv.Value, &w) != nil || w.Ref == "" {
			continue
		}
		w.rev = kv.ModRevision
		out = append(out, w)
	}
	return out
}

// holdReason is the one decision whether a version of ref may replace
// containers at now: "" when it may, else why not (the first active
// freeze that covers ref, else the tag's closed deploy windows).
func holdReason(freezes []freezeRecord, p rolloutPolicy, ref reference.NamedTagged, now time.Time) string {
	for _, f := range freezes {
		if f.active(now) && f.covers(ref) {
			return f.holdText()
		}
	}
	if !p.Windows.open(now) {
		specs := make([]string, len(p.Windows))
		for i, w := range p.Windows {
			specs[i] = w.spec
		}
		s := "outside window " + strings.Join(specs, "; ")
		if next := p.Windows.next(now); !next.IsZero() {
			s += " (opens " + next.UTC().Format(time.DateTime) + " UTC)"
		}
		return s
	}
	return ""
}
