package main

// haltrollback.go: the one way a halted version is rolled back by the
// deployers themselves (a canary that failed its bake, deployer abort):
// the registry's tag goes back to the previous version and the rollback
// is recorded in the deploy ledger with a trigger (rollback.go), so that
// every node deploys the previous version through the ordinary path.
// canary.go's rollbackStep claims it once for the fleet.

import (
	"context"
	"fmt"

	"github.com/distribution/reference"
)

// rollbackHalted returns the rollback of a halted version of ref to
// previous (an image ID in the tag's ledger; "": the newest earlier
// version that rolled out), run through rb on behalf of node.
func rollbackHalted(rb *rollbacker, node string) haltRollback {
	return func(ctx context.Context, ref reference.NamedTagged, previous string) (string, error) {
		res, err := rb.rollback(ctx, rollbackRequest{Image: ref.String(), To: previous},
			askedBy{Command: "rollback of a halted version", Host: node, Node: node})
		if err != nil {
			return "", fmt.Errorf("roll %s back to %s: %w", reference.FamiliarString(ref), shortID(previous), err)
		}
		return fmt.Sprintf("rolled back to %s (ledger version %d)", shortID(res.ImageID), res.Version), nil
	}
}
