package main

// filedeps_test.go: the files of package main form a layered graph, never
// a cycle, and every cross-file edge is written down in filedeps.txt so
// that a new one shows up in review (tailscale keeps depaware.txt for the
// same reason). Syntax only: a file uses another when it names one of the
// other's top-level declarations (the parser's unresolved identifiers, so
// a local variable that shadows a package name is no use), or calls a
// method that only the other file declares.

import (
	"flag"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
)

var updateFileDeps = flag.Bool("update-filedeps", false, "rewrite filedeps.txt from the code")

const fileDepsHeader = `# filedeps.txt: which file of package main uses which (code files only).
# Written by: go test -run TestFileDeps -update-filedeps .
# A line per edge: a file, then a file whose top-level names it uses.
# No cycles allowed; the layer order is in main.go's package comment.
`

func TestFileDeps(t *testing.T) {
	g, err := fileGraph(".")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range g.pairs() {
		a, b := p[0], p[1]
		t.Errorf("files that use each other: %s uses %s of %s, which uses %s of it", a, strings.Join(g[a][b], " "), b, strings.Join(g[b][a], " "))
	}
	for _, c := range g.cycles() {
		t.Errorf("files that use each other, directly or through others: %s", strings.Join(c, " "))
	}
	got := fileDepsHeader + g.String()
	if *updateFileDeps {
		if err := os.WriteFile("filedeps.txt", []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile("filedeps.txt")
	if err != nil {
		t.Fatalf("%v (write it with: go test -run TestFileDeps -update-filedeps .)", err)
	}
	if added, removed := diffLines(string(want), got); len(added)+len(removed) > 0 {
		t.Errorf("the file graph changed; review the edges, then go test -run TestFileDeps -update-filedeps .\nnew:\n%s\ngone:\n%s",
			strings.Join(added, "\n"), strings.Join(removed, "\n"))
	}
}

// TestFileGraph checks the analysis on a small package: a use through a
// name, through a method only one file declares, and none through a
// local variable that shadows a package-level name.
func TestFileGraph(t *testing.T) {
	dir := t.TempDir()
	files := map[string]string{
		"a.go": "package main\nfunc a() { b(); var c int; _ = c }\n",
		"b.go": "package main\ntype T struct{}\nfunc (T) m() {}\nfunc b() {}\n",
		"c.go": "package main\nvar c = 1\nfunc d(t T2) { t.m() }\n",
		"d.go": "package main\ntype T2 struct{ T }\n",
	}
	for name, src := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	g, err := fileGraph(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := "a.go b.go\nc.go b.go\nc.go d.go\nd.go b.go\n"
	if got := g.String(); got != want {
		t.Errorf("graph:\n%s\nwant:\n%s", got, want)
	}
	if c := g.cycles(); len(c) != 0 {
		t.Errorf("cycles %v in an acyclic graph", c)
	}
	g["b.go"]["a.go"] = []string{"a"}
	if c := g.cycles(); len(c) != 1 || strings.Join(c[0], " ") != "a.go b.go" {
		t.Errorf("cycles %v, want [[a.go b.go]]", c)
	}
}

// graph maps a file to the files it uses, and each to the names it uses
// from it.
type graph map[string]map[string][]string

// fileGraph reads the non-test Go files of package main in dir.
func fileGraph(dir string) (graph, error) {
	paths, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil {
		return nil, err
	}
	fset := token.NewFileSet()
	files := map[string]*ast.File{}
	for _, p := range paths {
		if strings.HasSuffix(p, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, p, nil, 0)
		if err != nil {
			return nil, err
		}
		if f.Name.Name != "main" || buildTagged(f) {
			continue
		}
		files[filepath.Base(p)] = f
	}
	defs := map[string]string{}             // top-level name → its file
	methods := map[string]map[string]bool{} // method name → the files declaring one
	fields := map[string]bool{}             // field names of the package's structs
	for name, f := range files {
		for _, d := range f.Decls {
			switch d := d.(type) {
			case *ast.FuncDecl:
				if d.Recv == nil {
					defs[d.Name.Name] = name
					continue
				}
				if methods[d.Name.Name] == nil {
					methods[d.Name.Name] = map[string]bool{}
				}
				methods[d.Name.Name][name] = true
			case *ast.GenDecl:
				for _, s := range d.Specs {
					switch s := s.(type) {
					case *ast.TypeSpec:
						defs[s.Name.Name] = name
						if st, ok := s.Type.(*ast.StructType); ok {
							for _, fl := range st.Fields.List {
								for _, n := range fl.Names {
									fields[n.Name] = true
								}
							}
						}
					case *ast.ValueSpec:
						for _, n := range s.Names {
							defs[n.Name] = name
						}
					}
				}
			}
		}
	}
	g := graph{}
	for name, f := range files {
		uses := map[string][]string{}
		g[name] = uses
		use := func(file, what string) {
			if !slices.Contains(uses[file], what) {
				uses[file] = append(uses[file], what)
			}
		}
		for _, id := range f.Unresolved {
			if def, ok := defs[id.Name]; ok && def != name {
				use(def, id.Name)
			}
		}
		imports := map[string]bool{}
		for _, im := range f.Imports {
			p := strings.Trim(im.Path.Value, `"`)
			n := p[strings.LastIndex(p, "/")+1:]
			if im.Name != nil {
				n = im.Name.Name
			}
			imports[n] = true
		}
		ast.Inspect(f, func(n ast.Node) bool {
			sel, ok := n.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			if x, ok := sel.X.(*ast.Ident); ok && imports[x.Name] && x.Obj == nil {
				return true // a package's name
			}
			in := methods[sel.Sel.Name]
			if len(in) != 1 || fields[sel.Sel.Name] || in[name] || ast.IsExported(sel.Sel.Name) {
				// a field, a method name more than one file declares, or an
				// exported one (String, Close: mostly other packages' interfaces)
				return true
			}
			for def := range in {
				use(def, "."+sel.Sel.Name)
			}
			return true
		})
	}
	return g, nil
}

// buildTagged reports a file with a //go:build line (the e2e and bench
// harness), which is not part of the daemon.
func buildTagged(f *ast.File) bool {
	for _, c := range f.Comments {
		for _, l := range c.List {
			if strings.HasPrefix(l.Text, "//go:build") {
				return true
			}
		}
	}
	return false
}

// String is the graph in filedeps.txt's form: one edge a line.
func (g graph) String() string {
	var b strings.Builder
	for _, name := range slices.Sorted(mapKeys(g)) {
		for _, u := range slices.Sorted(mapKeys(g[name])) {
			fmt.Fprintf(&b, "%s %s\n", name, u)
		}
	}
	return b.String()
}

func mapKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// cycles returns the strongly connected components of more than one file
// (Tarjan's algorithm), each sorted.
func (g graph) cycles() [][]string {
	index, low := map[string]int{}, map[string]int{}
	onStack := map[string]bool{}
	var stack []string
	var out [][]string
	var visit func(v string)
	visit = func(v string) {
		index[v], low[v] = len(index), len(index)
		stack = append(stack, v)
		onStack[v] = true
		for _, w := range slices.Sorted(mapKeys(g[v])) {
			if _, seen := index[w]; !seen {
				visit(w)
				low[v] = min(low[v], low[w])
			} else if onStack[w] {
				low[v] = min(low[v], index[w])
			}
		}
		if low[v] != index[v] {
			return
		}
		var c []string
		for {
			w := stack[len(stack)-1]
			stack = stack[:len(stack)-1]
			onStack[w] = false
			c = append(c, w)
			if w == v {
				break
			}
		}
		if len(c) > 1 {
			sort.Strings(c)
			out = append(out, c)
		}
	}
	for _, v := range slices.Sorted(mapKeys(g)) {
		if _, seen := index[v]; !seen {
			visit(v)
		}
	}
	return out
}

// pairs returns the pairs of files that use each other.
func (g graph) pairs() [][2]string {
	var out [][2]string
	for a, uses := range g {
		for b := range uses {
			if _, back := g[b][a]; a < b && back {
				out = append(out, [2]string{a, b})
			}
		}
	}
	slices.SortFunc(out, func(x, y [2]string) int { return strings.Compare(x[0]+x[1], y[0]+y[1]) })
	return out
}

// diffLines returns the lines only in b (added) and only in a (removed).
func diffLines(a, b string) (added, removed []string) {
	as, bs := strings.Split(a, "\n"), strings.Split(b, "\n")
	for _, l := range bs {
		if !slices.Contains(as, l) {
			added = append(added, "+ "+l)
		}
	}
	for _, l := range as {
		if !slices.Contains(bs, l) {
			removed = append(removed, "- "+l)
		}
	}
	return added, removed
}
