package executor

import (
	"context"
	"path"
	"sort"
	"strings"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/limits"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// fuzzTree builds a DAG of Directory messages from a fuzzer's bytes: names, targets
// and digests come from small sets of good and bad values, and each directory may
// reference any earlier one any number of times (so trees can double at every level).
func fuzzTree(prog []byte, store *cache.MemoryStore) (cache.Digest, int) {
	next := func() int {
		if len(prog) == 0 {
			return 0
		}
		b := int(prog[0])
		prog = prog[1:]
		return b
	}
	names := []string{"a", "b", "c", "", ".", "..", "a/b", "x\x00", "d", "e"}
	targets := []string{"a", "b/c", "../x", "/etc/passwd", "..", "a/../b", "c/..", "", "d/e/../../a", "b"}
	present := cache.DigestOf([]byte("content"))
	store.Put(context.Background(), present, strings.NewReader("content"))
	files := []*repb.Digest{present.Proto(), cache.DigestOf([]byte("missing")).Proto(), {Hash: "bad"}, cache.EmptyDigest.Proto()}
	var dirs []cache.Digest
	n := 1 + next()%8
	for i := 0; i < n; i++ {
		dir := &repb.Directory{}
		for k := next() % 6; k > 0; k-- {
			name := names[next()%len(names)]
			switch next() % 3 {
			case 0:
				dir.Files = append(dir.Files, &repb.FileNode{Name: name, Digest: files[next()%len(files)], IsExecutable: next()%2 == 0})
			case 1:
				child := cache.DigestOf([]byte("a directory nobody stored")).Proto()
				if i > 0 && next()%8 != 0 {
					child = dirs[next()%i].Proto()
				}
				dir.Directories = append(dir.Directories, &repb.DirectoryNode{Name: name, Digest: child})
			default:
				dir.Symlinks = append(dir.Symlinks, &repb.SymlinkNode{Name: name, Target: targets[next()%len(targets)]})
			}
		}
		if next()%4 != 0 { // mostly sorted, so that valid trees are common
			sort.Slice(dir.Files, func(i, j int) bool { return dir.Files[i].Name < dir.Files[j].Name })
			sort.Slice(dir.Directories, func(i, j int) bool { return dir.Directories[i].Name < dir.Directories[j].Name })
			sort.Slice(dir.Symlinks, func(i, j int) bool { return dir.Symlinks[i].Name < dir.Symlinks[j].Name })
		}
		d, _ := cache.PutProto(context.Background(), store, dir)
		dirs = append(dirs, d)
	}
	return dirs[len(dirs)-1], n
}

// expandedNodes counts the nodes the tree under d expands to, naively, stopping past
// limit (the fuzz target's reference for the validator's shared-subtree count).
func expandedNodes(store *cache.MemoryStore, d cache.Digest, limit int) int {
	dir := &repb.Directory{}
	if cache.ReadProto(context.Background(), store, d, dir, 0) != nil {
		return 1
	}
	n := 1 + len(dir.GetFiles()) + len(dir.GetSymlinks())
	for _, sub := range dir.GetDirectories() {
		if n > limit {
			break
		}
		sd, err := cache.FromProto(sub.GetDigest())
		if err != nil {
			return n
		}
		n += expandedNodes(store, sd, limit-n)
	}
	return n
}

// FuzzInputTree: whatever DAG a client stores, the input-tree validator never panics,
// refuses it only with INVALID_ARGUMENT (malformed), FAILED_PRECONDITION (blobs
// missing) or RESOURCE_EXHAUSTED (over the memory budget), gives back all it charged,
// and what it accepts is sound: clean relative paths inside the root, directories
// before their contents, every symlink resolving inside, within the node bound; and a
// tree claiming more nodes than the bound is refused as such. Corpus:
// testdata/fuzz/FuzzInputTree.
func FuzzInputTree(f *testing.F) {
	f.Add([]byte{0})
	f.Add([]byte{3, 2, 0, 0, 0, 1, 2, 1, 0, 0, 1, 1, 0, 3, 0, 1, 1, 0, 2, 1, 2, 0})
	f.Add([]byte{7, 1, 0, 0, 0, 0, 1, 2, 0, 1, 0, 1, 1, 0, 1, 1, 2, 1, 1, 0, 1, 1, 2, 0, 1, 1, 0, 1, 1, 2, 1, 1, 0, 1, 1})
	f.Add([]byte{1, 3, 2, 2, 3, 0, 5, 4, 2, 3, 2, 0, 0, 1})
	f.Fuzz(func(t *testing.T, prog []byte) {
		store := cache.NewMemoryStore()
		root, _ := fuzzTree(prog, store)
		mem := limits.NewBudget(256<<20, 0)
		charge, _ := mem.Charge("fuzz", "tree", 0)
		tree, err := fetchTreeCharged(context.Background(), store, root, charge)
		if err != nil {
			charge.Release()
			switch status.Code(err) {
			case codes.InvalidArgument, codes.FailedPrecondition, codes.ResourceExhausted:
			default:
				t.Fatalf("refused with %v", err)
			}
			if strings.Contains(err.Error(), "nodes") && expandedNodes(store, root, maxTreeNodes) <= maxTreeNodes {
				t.Fatalf("refused as too large, but the tree has at most %d nodes: %v", maxTreeNodes, err)
			}
			return
		}
		if charge.Size() == 0 {
			t.Fatal("an accepted tree is not charged")
		}
		charge.Release()
		if mem.Used("") != 0 {
			t.Fatalf("%d bytes still charged", mem.Used(""))
		}
		if n := len(tree.dirs) + len(tree.files) + len(tree.symlinks); n > maxTreeNodes || n != expandedNodes(store, root, maxTreeNodes) {
			t.Fatalf("accepted a tree of %d nodes; it expands to %d", n, expandedNodes(store, root, maxTreeNodes))
		}
		dirs := map[string]bool{}
		for i, d := range tree.dirs {
			if i == 0 && d != "" {
				t.Fatalf("first directory %q, want the root", d)
			}
			if i > 0 && (validRelPath(d, false) != nil || !dirs[parent(d)]) {
				t.Fatalf("directory %q: not clean, or before its parent", d)
			}
			dirs[d] = true
		}
		links := map[string]string{}
		for _, s := range tree.symlinks {
			links[s.path] = s.target
		}
		for _, p := range append(filePaths(tree), symlinkPaths(tree)...) {
			if validRelPath(p, false) != nil || !dirs[parent(p)] {
				t.Fatalf("entry %q: not clean, or outside the directories", p)
			}
		}
		for p, target := range links {
			if _, err := resolveInTree(links, path.Dir(p), target, 0); err != nil {
				t.Fatalf("accepted symlink %q -> %q: %v", p, target, err)
			}
		}
	})
}

func parent(p string) string {
	if d := path.Dir(p); d != "." {
		return d
	}
	return ""
}

func filePaths(t *inputTree) []string {
	var out []string
	for _, f := range t.files {
		out = append(out, f.path)
	}
	return out
}

func symlinkPaths(t *inputTree) []string {
	var out []string
	for _, s := range t.symlinks {
		out = append(out, s.path)
	}
	return out
}
