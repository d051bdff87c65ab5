package backoff

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestDelay(t *testing.T) {
	base := 100 * time.Millisecond
	for attempt := 1; attempt < 20; attempt++ {
		nominal := min(base<<(attempt-1), 30*base)
		d := Delay(base, attempt)
		if d < nominal/2 || d > nominal {
			t.Errorf("Delay(%v, %d) = %v; want within [%v, %v]", base, attempt, d, nominal/2, nominal)
		}
	}
}

// TestEvery: fn runs at once, its errors go to failed while ctx lives,
// and Every returns when ctx is done.
func TestEvery(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	calls, failures := 0, 0
	done := make(chan struct{})
	go func() {
		defer close(done)
		Every(ctx, time.Millisecond, func(context.Context) error {
			calls++
			if calls == 3 {
				cancel()
				return errors.New("after the cancel: not reported")
			}
			return errors.New("reported")
		}, func(error) { failures++ })
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Every did not return after its context was cancelled")
	}
	if calls != 3 || failures != 2 {
		t.Errorf("calls %d, failures reported %d; want 3 and 2", calls, failures)
	}
}
