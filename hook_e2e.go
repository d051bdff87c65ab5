//go:build e2e

package main

import (
	"context"
	"os"
	"time"

	"github.com/die-net/deployer/internal/backoff"
)

// With the e2e build tag, DEPLOYER_E2E_PARKED_DELAY=<duration> makes
// recreate wait that long once the old container is parked (renamed and
// stopped) and before the new one, created under its temporary name,
// gets the old one's: the end-to-end suite kills the deployer in that
// window.
func init() {
	recreateHook = func(ctx context.Context, stage string) {
		if stage != "parked" {
			return
		}
		if d, err := time.ParseDuration(os.Getenv("DEPLOYER_E2E_PARKED_DELAY")); err == nil && d > 0 {
			backoff.Sleep(ctx, d)
		}
	}
}
