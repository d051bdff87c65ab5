package main

import (
	"testing"

	"golang.org/x/tools/go/analysis/analysistest"
)

// TestNolint: //nolint directives silence the linter they name (or every
// linter), on their own line or, standing on the line before a
// declaration or statement at its column, in the whole of it.
func TestNolint(t *testing.T) {
	l := linter{name: "errcheck"}
	analysistest.Run(t, analysistest.TestData(), l.wrap(errcheckAnalyzer()), "nolint")
}
