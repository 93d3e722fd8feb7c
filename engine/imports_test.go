package engine_test

import (
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

const module = "github.com/kilnbuild/kiln/"

// TestImportArrows keeps the package layout's arrows pointing one way (see
// docs/architecture.md): the lower packages never import the engine, the engine's
// parts never import the composition root or the server, the Execution service knows
// its Scheduler only as an interface, and internal/ holds leaves.
func TestImportArrows(t *testing.T) {
	imports := map[string][]string{} // package dir -> kiln packages its non-test files import
	err := filepath.WalkDir("..", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
			return err
		}
		f, err := parser.ParseFile(token.NewFileSet(), p, nil, parser.ImportsOnly)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel("..", filepath.Dir(p))
		for _, im := range f.Imports {
			if path, _ := strconv.Unquote(im.Path.Value); strings.HasPrefix(path, module) {
				imports[filepath.ToSlash(rel)] = append(imports[filepath.ToSlash(rel)], strings.TrimPrefix(path, module))
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	under := func(p, root string) bool { return p == root || strings.HasPrefix(p, root+"/") }
	rules := []struct {
		from   func(string) bool
		banned func(string) bool
		why    string
	}{
		{func(p string) bool {
			return under(p, "cache") || under(p, "sandbox") || under(p, "toolchains") || under(p, "lockfiles")
		}, func(p string) bool { return under(p, "engine") || under(p, "cmd") }, "the lower packages never import the engine"},
		{func(p string) bool { return under(p, "internal") }, func(p string) bool { return !under(p, "internal") }, "internal/ holds leaves"},
		{func(p string) bool {
			return under(p, "engine") && p != "engine/server" && p != "engine/rebuild" && p != "engine"
		},
			func(p string) bool { return p == "engine" || p == "engine/server" }, "the engine's parts never import the composition root or the server"},
		{func(p string) bool { return p == "engine/execution" },
			func(p string) bool { return p == "engine/scheduler" || under(p, "engine/executor") }, "the Execution service knows its scheduler only as an interface"},
		{func(p string) bool { return under(p, "engine/executor") },
			func(p string) bool { return p == "engine/scheduler" || p == "engine/execution" }, "running one action knows nothing of scheduling"},
		{func(p string) bool { return p != "cmd/kiln" }, func(p string) bool { return p == "engine/server" }, "only the binary starts the server"},
	}
	checked := 0
	for from, ims := range imports {
		for _, im := range ims {
			checked++
			for _, r := range rules {
				if r.from(from) && r.banned(im) {
					t.Errorf("%s imports %s: %s", from, im, r.why)
				}
			}
		}
	}
	if checked < 50 {
		t.Fatalf("checked only %d imports: the module was not found from %s", checked, "..")
	}
}
