package main

import (
	"go/ast"
	"go/token"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"

	"golang.org/x/tools/go/analysis"
)

// wrap makes a report only what golangci-lint would have shown: it drops
// diagnostics in generated files, in files the linter is excluded from,
// and under a //nolint directive for the linter, and appends the linter's
// name. It changes a in place, so that an analyzer another one requires is
// the same value.
func (l linter) wrap(a *analysis.Analyzer) *analysis.Analyzer {
	run := a.Run
	name := a.Name
	a.Run = func(pass *analysis.Pass) (any, error) {
		report := pass.Report
		pass.Report = func(d analysis.Diagnostic) {
			if l.suppressed(pass, d.Pos) {
				return
			}
			if l.checkName {
				d.Message = name + ": " + d.Message
			}
			d.Message += " (" + l.name + ")"
			report(d)
		}
		return run(pass)
	}
	return a
}

// testOrScript is where errcheck, gosec and noctx are not run: a path
// relative to the module's root (tests, test-only tools, and the
// test-support packages internal/test*, which only tests import).
var testOrScript = regexp.MustCompile(`(_test\.go|^scripts/|^internal/test[a-z]*/)`)

func (l linter) suppressed(pass *analysis.Pass, pos token.Pos) bool {
	p := pass.Fset.Position(pos)
	if l.notInTests && testOrScript.MatchString(moduleRelative(p.Filename)) {
		return true
	}
	for _, f := range pass.Files {
		if pass.Fset.File(f.Pos()) != pass.Fset.File(pos) {
			continue
		}
		if ast.IsGenerated(f) {
			return true
		}
		for _, r := range nolintRanges(pass.Fset, f) {
			if r.from <= p.Line && p.Line <= r.to && r.covers(l.name) {
				return true
			}
		}
	}
	return false
}

// ignored is the span of lines one //nolint directive covers.
type ignored struct {
	from, to int
	col      int
	linters  []string // nil: all
}

func (r ignored) covers(linter string) bool {
	return r.linters == nil || slices.Contains(r.linters, linter)
}

var nolintCache sync.Map // *ast.File -> []ignored

var nolintPattern = regexp.MustCompile(`^nolint( |:|$)`)

// nolintRanges are the spans of f's //nolint directives, worked out as
// golangci-lint's nolint filter does: the comment group's own lines, and,
// when a node begins on the next line at the group's column, that node's
// lines too.
func nolintRanges(fset *token.FileSet, f *ast.File) []ignored {
	if rs, ok := nolintCache.Load(f); ok {
		return rs.([]ignored)
	}
	var inline []ignored
	for _, g := range f.Comments {
		for _, c := range g.List {
			text := strings.TrimLeft(c.Text, "/ ")
			if !nolintPattern.MatchString(text) {
				continue
			}
			start := fset.Position(g.Pos())
			r := ignored{from: start.Line, to: fset.Position(g.End()).Line, col: start.Column}
			if strings.HasPrefix(text, "nolint:") && !strings.HasPrefix(text, "nolint:all") {
				text, _, _ = strings.Cut(text, "//")
				for item := range strings.SplitSeq(strings.TrimPrefix(text, "nolint:"), ",") {
					name := strings.ToLower(strings.TrimSpace(item))
					if name == "all" {
						r.linters = nil
						break
					}
					r.linters = append(r.linters, name)
				}
			}
			inline = append(inline, r)
		}
	}
	all := inline
	if len(inline) > 0 {
		ast.Inspect(f, func(n ast.Node) bool {
			if n == nil {
				return true
			}
			start := fset.Position(n.Pos())
			for _, r := range inline {
				if r.to == start.Line-1 && r.col == start.Column {
					r.to = max(r.to, fset.Position(n.End()).Line)
					all = append(all, r)
					break
				}
			}
			return true
		})
	}
	nolintCache.Store(f, all)
	return all
}

var roots sync.Map // directory -> module root ("" if none)

// moduleRelative is filename relative to the root of the module it is in
// (the nearest directory above it with a go.mod), slash-separated.
func moduleRelative(filename string) string {
	dir := filepath.Dir(filename)
	root, ok := roots.Load(dir)
	if !ok {
		root = ""
		for d := dir; ; d = filepath.Dir(d) {
			if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
				root = d
				break
			}
			if filepath.Dir(d) == d {
				break
			}
		}
		roots.Store(dir, root)
	}
	rel, err := filepath.Rel(root.(string), filename)
	if root == "" || err != nil {
		return filepath.ToSlash(filename)
	}
	return filepath.ToSlash(rel)
}
