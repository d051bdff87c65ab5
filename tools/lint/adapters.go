package main

// The linters that are libraries rather than analyzers, made analyzers the
// way golangci-lint v2.15.0 does it (pkg/golinters/{errcheck,gosec,
// misspell,unused}), with its defaults.

import (
	"cmp"
	"fmt"
	"go/token"
	"io"
	"log"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"

	"github.com/golangci/misspell"
	"github.com/kisielk/errcheck/errcheck"
	"github.com/securego/gosec/v2"
	gosecanalyzers "github.com/securego/gosec/v2/analyzers"
	"github.com/securego/gosec/v2/rules"
	"golang.org/x/tools/go/analysis"
	"golang.org/x/tools/go/packages"
	"honnef.co/go/tools/unused"
)

// asPackage is the view of a pass that the library linters take.
func asPackage(pass *analysis.Pass) *packages.Package {
	return &packages.Package{
		Fset:      pass.Fset,
		Syntax:    pass.Files,
		Types:     pass.Pkg,
		TypesInfo: pass.TypesInfo,
	}
}

// posOf turns a file position the libraries report back into a token.Pos of
// the pass (token.NoPos if the file is not one of the pass's).
func posOf(pass *analysis.Pass, filename string, line, column int) token.Pos {
	for _, f := range pass.Files {
		tf := pass.Fset.File(f.Pos())
		if tf == nil || tf.Name() != filename || line < 1 || line > tf.LineCount() {
			continue
		}
		return tf.LineStart(line) + token.Pos(max(column-1, 0))
	}
	return token.NoPos
}

// errcheckAnalyzer is errcheck with its default exclusions and the
// functions named excluded too; blank assignments and type assertions are
// not checked (golangci-lint's defaults).
func errcheckAnalyzer(exclude ...string) *analysis.Analyzer {
	return &analysis.Analyzer{
		Name: "errcheck",
		Doc:  "errcheck reports unchecked errors",
		Run: func(pass *analysis.Pass) (any, error) {
			checker := errcheck.Checker{Exclusions: errcheck.Exclusions{
				BlankAssignments:       true,
				TypeAssertions:         true,
				SymbolRegexpsByPackage: map[string]*regexp.Regexp{},
				Symbols:                append(append([]string(nil), errcheck.DefaultExcludedSymbols...), exclude...),
			}}
			for _, e := range checker.CheckPackage(asPackage(pass)).Unique().UncheckedErrors {
				text := "Error return value is not checked"
				if e.FuncName != "" {
					text = fmt.Sprintf("Error return value of %s is not checked", formatCode(cmp.Or(e.SelectorName, e.FuncName)))
				}
				pass.Report(analysis.Diagnostic{Pos: posOf(pass, e.Pos.Filename, e.Pos.Line, e.Pos.Column), Message: text})
			}
			return nil, nil
		},
	}
}

func formatCode(code string) string {
	if strings.Contains(code, "`") {
		return code
	}
	return fmt.Sprintf("%#q", code)
}

// gosecAnalyzer is gosec's rules and SSA analyzers, less the IDs named, at
// every severity and confidence, tests included (the exclusion rule drops
// them afterwards).
func gosecAnalyzer(exclude ...string) *analysis.Analyzer {
	return &analysis.Analyzer{
		Name: "gosec",
		Doc:  "gosec inspects source code for security problems",
		Run: func(pass *analysis.Pass) (any, error) {
			ruleDefs := rules.Generate(false, rules.NewRuleFilter(true, exclude...))
			analyzerDefs := gosecanalyzers.Generate(false, gosecanalyzers.NewAnalyzerFilter(true, exclude...))
			g := gosec.NewAnalyzer(gosec.NewConfig(), true, false, false, runtime.GOMAXPROCS(0), log.New(io.Discard, "", 0))
			g.LoadRules(ruleDefs.RulesInfo())
			g.LoadAnalyzers(analyzerDefs.AnalyzersInfo())
			pkg := asPackage(pass)
			g.CheckRules(pkg)
			g.CheckAnalyzers(pkg)
			issues, _, _ := g.Report()
			for _, i := range issues {
				from, _, _ := strings.Cut(i.Line, "-") // "12" or "12-14"
				line, err := strconv.Atoi(from)
				if err != nil {
					return nil, fmt.Errorf("gosec: line %q of %s: %w", i.Line, i.File, err)
				}
				col, err := strconv.Atoi(i.Col)
				if err != nil {
					return nil, fmt.Errorf("gosec: column %q of %s: %w", i.Col, i.File, err)
				}
				pass.Report(analysis.Diagnostic{Pos: posOf(pass, i.File, line, col), Message: i.RuleID + ": " + i.What})
			}
			return nil, nil
		},
	}
}

// misspellReplacer is built on first use: it takes a while, and most runs
// of the tool (a dependency's facts) have no use for it.
var misspellReplacer = sync.OnceValue(func() *misspell.Replacer {
	r := &misspell.Replacer{Replacements: misspell.DictMain}
	r.Compile()
	return r
})

// misspellAnalyzer reports commonly misspelled English words anywhere in a
// Go file (misspell's default mode: the file as plain text).
var misspellAnalyzer = &analysis.Analyzer{
	Name: "misspell",
	Doc:  "misspell finds commonly misspelled English words",
	Run: func(pass *analysis.Pass) (any, error) {
		for _, file := range pass.Files {
			name := pass.Fset.PositionFor(file.Pos(), false).Filename
			if !strings.HasSuffix(name, ".go") {
				continue
			}
			content, err := pass.ReadFile(name)
			if err != nil {
				return nil, fmt.Errorf("misspell: %w", err)
			}
			tf := pass.Fset.File(file.Pos())
			_, diffs := misspellReplacer().Replace(string(content))
			for _, d := range diffs {
				start := tf.LineStart(d.Line) + token.Pos(d.Column)
				pass.Report(analysis.Diagnostic{
					Pos:     start,
					End:     start + token.Pos(len(d.Original)),
					Message: fmt.Sprintf("%#q is a misspelling of %#q", d.Original, d.Corrected),
				})
			}
		}
		return nil, nil
	},
}

// unusedAnalyzer is staticcheck's unused (U1000) with golangci-lint's
// options, which are unused's defaults (exported names, fields, parameters
// and locals count as used), reported as golangci-lint reports it. (Its
// wrapper merges the graph itself, which traces every node to stderr.)
var unusedAnalyzer = &analysis.Analyzer{
	Name:     "unused",
	Doc:      unused.Analyzer.Analyzer.Doc,
	Requires: []*analysis.Analyzer{unused.Analyzer.Analyzer},
	Run: func(pass *analysis.Pass) (any, error) {
		res := pass.ResultOf[unused.Analyzer.Analyzer].(unused.Result)
		used := make(map[string]bool)
		for _, obj := range res.Used {
			used[fmt.Sprintf("%s %d %s", obj.Position.Filename, obj.Position.Line, obj.Name)] = true
		}
		for _, obj := range res.Unused {
			if obj.Kind == "type param" || used[fmt.Sprintf("%s %d %s", obj.Position.Filename, obj.Position.Line, obj.Name)] {
				continue
			}
			pass.Report(analysis.Diagnostic{
				Pos:     posOf(pass, obj.Position.Filename, obj.Position.Line, obj.Position.Column),
				Message: fmt.Sprintf("%s %s is unused", obj.Kind, obj.Name),
			})
		}
		return nil, nil
	},
}
