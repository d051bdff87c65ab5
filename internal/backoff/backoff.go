// Package backoff holds the waits of every retry loop: a capped
// exponential delay with jitter, a sleep a context ends, and a wake-up
// that never blocks.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Delay returns a capped exponential delay with jitter: base, 2*base, ...
// up to 30*base, each between 50% and 100% of its nominal value.
func Delay(base time.Duration, attempt int) time.Duration {
	d := base
	for i := 1; i < attempt && d < 30*base; i++ {
		d *= 2
	}
	d = min(d, 30*base)
	return d/2 + rand.N(d/2+1) //nolint:gosec // jitter, not a secret
}

// Sleep waits for d or until ctx is done; it reports whether d passed.
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// Wake sends a wake-up on ch, a channel of capacity 1, without blocking:
// a wake-up already pending covers this one (the receiver re-reads the
// state it is woken for).
func Wake(ch chan<- struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}
