// Command lint is the vet tool behind `make lint`: the linters this project
// ran through golangci-lint v2.15.0 until December 2026, at the versions
// that release pins and with the settings its .golangci.yml gave them (they
// live here now), built from the handful of modules they come from rather
// than golangci-lint's hundreds (a cold build takes half the time and a
// tenth of the downloads), and run by `go vet -vettool`, which reuses the
// build cache for the dependencies' export data and analysis facts.
//
// What golangci-lint did around the analyzers is done here too:
//   - a //nolint:name directive (or a bare //nolint, or //nolint:all) drops
//     the diagnostics of that linter on its own line, or, when the comment
//     stands on the line before a declaration or statement at the same
//     column, in the whole of it (nolint.go);
//   - errcheck, gosec and noctx say nothing about _test.go files,
//     scripts/ and internal/test* (tests, test-only tools and the packages
//     only tests import: an unchecked Close or a fixed
//     test file mode is not a bug, and a test request needs no context of
//     its own);
//   - generated files are skipped;
//   - every message ends with the linter's name in parentheses, as
//     golangci-lint printed it, so that the name to put in a //nolint
//     directive is in front of you.
//
// To add or drop a linter, edit linters below; the settings live next to
// each one.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strings"

	"codeberg.org/polyfloyd/go-errorlint/errorlint"
	"github.com/gordonklaus/ineffassign/pkg/ineffassign"
	"github.com/kkHAIKE/contextcheck"
	"github.com/sonatard/noctx"
	"github.com/timakin/bodyclose/passes/bodyclose"
	"go-simpler.org/sloglint"
	"golang.org/x/tools/go/analysis"
	"golang.org/x/tools/go/analysis/passes/appends"
	"golang.org/x/tools/go/analysis/passes/asmdecl"
	"golang.org/x/tools/go/analysis/passes/assign"
	"golang.org/x/tools/go/analysis/passes/atomic"
	"golang.org/x/tools/go/analysis/passes/atomicalign"
	"golang.org/x/tools/go/analysis/passes/bools"
	"golang.org/x/tools/go/analysis/passes/buildtag"
	"golang.org/x/tools/go/analysis/passes/cgocall"
	"golang.org/x/tools/go/analysis/passes/composite"
	"golang.org/x/tools/go/analysis/passes/copylock"
	"golang.org/x/tools/go/analysis/passes/ctrlflow"
	"golang.org/x/tools/go/analysis/passes/deepequalerrors"
	"golang.org/x/tools/go/analysis/passes/defers"
	"golang.org/x/tools/go/analysis/passes/directive"
	"golang.org/x/tools/go/analysis/passes/errorsas"
	"golang.org/x/tools/go/analysis/passes/framepointer"
	"golang.org/x/tools/go/analysis/passes/hostport"
	"golang.org/x/tools/go/analysis/passes/httpmux"
	"golang.org/x/tools/go/analysis/passes/httpresponse"
	"golang.org/x/tools/go/analysis/passes/ifaceassert"
	"golang.org/x/tools/go/analysis/passes/inline"
	"golang.org/x/tools/go/analysis/passes/inspect"
	"golang.org/x/tools/go/analysis/passes/lostcancel"
	"golang.org/x/tools/go/analysis/passes/nilfunc"
	"golang.org/x/tools/go/analysis/passes/nilness"
	"golang.org/x/tools/go/analysis/passes/printf"
	"golang.org/x/tools/go/analysis/passes/reflectvaluecompare"
	"golang.org/x/tools/go/analysis/passes/shift"
	"golang.org/x/tools/go/analysis/passes/sigchanyzer"
	"golang.org/x/tools/go/analysis/passes/slog"
	"golang.org/x/tools/go/analysis/passes/sortslice"
	"golang.org/x/tools/go/analysis/passes/stdmethods"
	"golang.org/x/tools/go/analysis/passes/stdversion"
	"golang.org/x/tools/go/analysis/passes/stringintconv"
	"golang.org/x/tools/go/analysis/passes/structtag"
	"golang.org/x/tools/go/analysis/passes/testinggoroutine"
	"golang.org/x/tools/go/analysis/passes/tests"
	"golang.org/x/tools/go/analysis/passes/timeformat"
	"golang.org/x/tools/go/analysis/passes/unmarshal"
	"golang.org/x/tools/go/analysis/passes/unreachable"
	"golang.org/x/tools/go/analysis/passes/unsafeptr"
	"golang.org/x/tools/go/analysis/passes/unusedresult"
	"golang.org/x/tools/go/analysis/passes/unusedwrite"
	"golang.org/x/tools/go/analysis/passes/waitgroup"
	"golang.org/x/tools/go/analysis/unitchecker"
	scconfig "honnef.co/go/tools/config"
	"honnef.co/go/tools/quickfix"
	"honnef.co/go/tools/simple"
	"honnef.co/go/tools/staticcheck"
	"honnef.co/go/tools/stylecheck"
)

// module is this project's import path: contextcheck follows calls into
// its packages only, as golangci-lint ran it.
const module = "github.com/die-net/deployer"

// linter is a named group of analyzers: the name is the one a //nolint
// directive uses and the one printed after each message.
type linter struct {
	name      string
	analyzers []*analysis.Analyzer
	// checkName puts the analyzer's own name before each message:
	// staticcheck's check IDs (SA4006), govet's pass names (printf).
	checkName bool
	// notInTests: nothing is reported in _test.go files, under scripts/
	// or in internal/test*.
	notInTests bool
}

func linters() []linter {
	return []linter{
		// govet: every pass, less fieldalignment (struct layout for
		// readability, not bytes), shadow (`err` shadowing in nested scopes
		// is idiomatic here), loopclosure (golangci-lint drops it for
		// go >= 1.22) and findcall (a demonstration pass that reports
		// calls to the function named by its -name flag, empty here).
		{name: "govet", checkName: true, analyzers: []*analysis.Analyzer{
			appends.Analyzer, asmdecl.Analyzer, assign.Analyzer, atomic.Analyzer,
			atomicalign.Analyzer, bools.Analyzer, buildtag.Analyzer, cgocall.Analyzer,
			composite.Analyzer, copylock.Analyzer, deepequalerrors.Analyzer, defers.Analyzer,
			directive.Analyzer, errorsas.Analyzer, framepointer.Analyzer, hostport.Analyzer,
			httpmux.Analyzer, httpresponse.Analyzer, ifaceassert.Analyzer, inline.Analyzer,
			lostcancel.Analyzer, nilfunc.Analyzer, nilness.Analyzer, printf.Analyzer,
			reflectvaluecompare.Analyzer, shift.Analyzer, sigchanyzer.Analyzer, slog.Analyzer,
			sortslice.Analyzer, stdmethods.Analyzer, stdversion.Analyzer, stringintconv.Analyzer,
			structtag.Analyzer, testinggoroutine.Analyzer, tests.Analyzer, timeformat.Analyzer,
			unmarshal.Analyzer, unreachable.Analyzer, unsafeptr.Analyzer, unusedresult.Analyzer,
			unusedwrite.Analyzer, waitgroup.Analyzer,
		}},
		{name: "staticcheck", checkName: true, analyzers: staticcheckAnalyzers(
			// staticcheck's defaults: no package comments or initialism rules.
			"ST1000", "ST1003", "ST1016", "ST1020", "ST1021", "ST1022",
			// n.dockerd.proc names which process of a node; keep it spelled out.
			"QF1008",
		)},
		{name: "unused", analyzers: []*analysis.Analyzer{unusedAnalyzer}},
		{name: "errcheck", notInTests: true, analyzers: []*analysis.Analyzer{errcheckAnalyzer(
			"(net/http.ResponseWriter).Write",
			// Command-line output (usage, deployer status): a failed write to
			// the terminal has nowhere else to be reported.
			"fmt.Fprint",
			"fmt.Fprintf",
			"fmt.Fprintln",
			"(*text/tabwriter.Writer).Flush",
			// Closing the etcd client of a command on its way out: nothing is
			// left to do with an error.
			"(*go.etcd.io/etcd/client/v3.Client).Close",
		)}},
		{name: "errorlint", analyzers: []*analysis.Analyzer{withFlags(errorlint.NewAnalyzer(),
			"errorf", "true", "errorf-multi", "true", "asserts", "true", "comparison", "true")}},
		{name: "sloglint", analyzers: []*analysis.Analyzer{sloglint.New(&sloglint.Options{
			KeyValuePairsOnly: true,
			StaticMessage:     true,
			NoGlobalLogger:    "all",
			KeyNamingCase:     "snake",
			ForbiddenKeys:     []string{"reason", "cause", "error"},
			NoMixedArguments:  true,
		})}},
		{name: "contextcheck", analyzers: []*analysis.Analyzer{contextcheckAnalyzer()}},
		{name: "bodyclose", analyzers: []*analysis.Analyzer{bodyclose.Analyzer}},
		{name: "noctx", notInTests: true, analyzers: []*analysis.Analyzer{noctx.Analyzer}},
		// G104 (unchecked errors) is errcheck's job, with its exclusion list.
		{name: "gosec", notInTests: true, analyzers: []*analysis.Analyzer{gosecAnalyzer("G104")}},
		{name: "ineffassign", analyzers: []*analysis.Analyzer{ineffassign.Analyzer}},
		{name: "misspell", analyzers: []*analysis.Analyzer{misspellAnalyzer}},
	}
}

func main() {
	var all []*analysis.Analyzer
	for _, l := range linters() {
		for _, a := range l.analyzers {
			all = append(all, l.wrap(a))
		}
	}
	if cfg, ok := vetConfig(os.Args[1:]); ok && cfg.VetxOnly {
		all = factProducers(all, strings.HasPrefix(cfg.ImportPath, module))
	}
	unitchecker.Main(all...)
}

// vetConfig reads the package description go vet hands the tool (the
// argument ending in .cfg), if there is one.
func vetConfig(args []string) (cfg struct {
	ImportPath string
	VetxOnly   bool
}, ok bool) {
	if len(args) == 0 || !strings.HasSuffix(args[len(args)-1], ".cfg") {
		return cfg, false
	}
	data, err := os.ReadFile(args[len(args)-1])
	if err != nil || json.Unmarshal(data, &cfg) != nil {
		return cfg, false // unitchecker reports it
	}
	return cfg, true
}

// factProducers is what a dependency is analyzed with when go vet wants
// only its facts (VetxOnly): the analyzers that export facts, which bring
// their own requirements. unitchecker would also run every analyzer that
// merely reads facts (most of staticcheck's), and throw their findings
// away; on a cold cache that is most of the tool's time. Outside this
// module contextcheck is left out too: it exports nothing there
// (pkgprefix), but its SSA would still be built for every package.
func factProducers(roots []*analysis.Analyzer, inModule bool) []*analysis.Analyzer {
	seen := map[*analysis.Analyzer]bool{}
	var out []*analysis.Analyzer
	var visit func(a *analysis.Analyzer)
	visit = func(a *analysis.Analyzer) {
		if seen[a] || (!inModule && a.Name == "contextcheck") {
			return
		}
		seen[a] = true
		if len(a.FactTypes) > 0 {
			out = append(out, a)
		}
		for _, r := range a.Requires {
			visit(r)
		}
	}
	for _, a := range roots {
		visit(a)
	}
	return out
}

// staticcheckAnalyzers is staticcheck's "all" less the checks named, with
// staticcheck's default configuration otherwise, as golangci-lint runs it
// (staticcheck, gosimple, stylecheck and quickfix in one).
func staticcheckAnalyzers(disabled ...string) []*analysis.Analyzer {
	cfg := &scconfig.Config{
		Checks:                  append([]string{"all"}, prefixed("-", disabled)...),
		Initialisms:             scconfig.DefaultConfig.Initialisms,
		DotImportWhitelist:      scconfig.DefaultConfig.DotImportWhitelist,
		HTTPStatusCodeWhitelist: scconfig.DefaultConfig.HTTPStatusCodeWhitelist,
	}
	// The analyzers read their configuration from this one, which would
	// otherwise look for staticcheck.conf files.
	scconfig.Analyzer.Run = func(*analysis.Pass) (any, error) { return cfg, nil }
	var as []*analysis.Analyzer
	for _, a := range slices.Concat(staticcheck.Analyzers, stylecheck.Analyzers, simple.Analyzers, quickfix.Analyzers) {
		if !slices.Contains(disabled, a.Analyzer.Name) {
			as = append(as, a.Analyzer)
		}
	}
	return as
}

func prefixed(p string, ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = p + s
	}
	return out
}

// contextcheckAnalyzer is contextcheck as golangci-lint sets it up: it
// follows calls into this module's packages only (pkgprefix), and needs
// ctrlflow and inspect besides SSA.
func contextcheckAnalyzer() *analysis.Analyzer {
	a := withFlags(contextcheck.NewAnalyzer(contextcheck.Configuration{}), "pkgprefix", module)
	a.Requires = append(a.Requires, ctrlflow.Analyzer, inspect.Analyzer)
	return a
}

// withFlags sets an analyzer's flags (name, value pairs): the settings
// golangci-lint passed from .golangci.yml.
func withFlags(a *analysis.Analyzer, nameValues ...string) *analysis.Analyzer {
	for i := 0; i+1 < len(nameValues); i += 2 {
		if err := a.Flags.Set(nameValues[i], nameValues[i+1]); err != nil {
			fmt.Fprintf(os.Stderr, "lint: %s: %v\n", a.Name, err)
			os.Exit(2)
		}
	}
	return a
}
