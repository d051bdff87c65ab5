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
	// DEPLOYER_E2E_HOLD_REPORTS=<file>: while the file exists, a rollout
	// report waits between its claim and its send (two minutes at most):
	// the suite kills the claimant there.
	reportHook = func(ctx context.Context) {
		hold := os.Getenv("DEPLOYER_E2E_HOLD_REPORTS")
		for deadline := time.Now().Add(2 * time.Minute); hold != "" && time.Now().Before(deadline); {
			if _, err := os.Stat(hold); err != nil || !backoff.Sleep(ctx, 100*time.Millisecond) { //nolint:gosec // the test suite names the file (e2e build only)
				return
			}
		}
	}
}
