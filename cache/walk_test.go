package cache_test

import (
	"context"
	"reflect"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/cachetest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// dag stores root -> {a, b} -> shared (a DAG with one directory at two paths), shared
// holding a file and a subdirectory absent from the CAS.
func dag(t *testing.T) (cache.BlobStore, cache.Digest, cache.Digest) {
	t.Helper()
	ctx := context.Background()
	m := cache.NewMemoryStore()
	absent := cache.DigestOf([]byte("never stored"))
	put := func(d *repb.Directory) cache.Digest {
		dg, err := cache.PutProto(ctx, m, d)
		if err != nil {
			t.Fatal(err)
		}
		return dg
	}
	shared := put(&repb.Directory{Files: []*repb.FileNode{{Name: "f", Digest: cache.EmptyDigest.Proto()}},
		Directories: []*repb.DirectoryNode{{Name: "gone", Digest: absent.Proto()}}})
	root := put(&repb.Directory{Directories: []*repb.DirectoryNode{{Name: "a", Digest: shared.Proto()}, {Name: "b", Digest: shared.Proto()}}})
	return m, root, absent
}

func paths(t *testing.T, w *cache.Walk, stopAfter int) (visited, missing []string) {
	t.Helper()
	for n := 0; !w.Done() && (stopAfter <= 0 || n < stopAfter); n++ {
		it, _, err := w.Next(context.Background())
		switch {
		case err == nil:
			visited = append(visited, it.Path)
		case status.Code(err) == codes.NotFound:
			missing = append(missing, it.Path)
		default:
			t.Fatal(err)
		}
	}
	return visited, missing
}

// TestWalk: a walk visits every path of the expanded tree, or each distinct directory
// once; an absent directory is reported with its path and the walk goes on; a walk
// stopped part way goes on where it stopped.
func TestWalk(t *testing.T) {
	cas, root, _ := dag(t)
	get := cache.DirectoriesIn(cas, 1<<20)
	v, m := paths(t, cache.NewWalk(root, get, cache.WalkOptions{}), 0)
	if !reflect.DeepEqual(v, []string{"", "a", "b"}) || !reflect.DeepEqual(m, []string{"a/gone", "b/gone"}) {
		t.Fatalf("every path: visited %q, missing %q", v, m)
	}
	v, m = paths(t, cache.NewWalk(root, get, cache.WalkOptions{Distinct: true}), 0)
	if !reflect.DeepEqual(v, []string{"", "a"}) || !reflect.DeepEqual(m, []string{"a/gone"}) {
		t.Fatalf("distinct: visited %q, missing %q", v, m)
	}
	w := cache.NewWalk(root, get, cache.WalkOptions{})
	v1, _ := paths(t, w, 2)
	v2, m2 := paths(t, w, 0)
	if !reflect.DeepEqual(append(v1, v2...), []string{"", "a", "b"}) || len(m2) != 2 {
		t.Fatalf("resumed walk: %q then %q, missing %q", v1, v2, m2)
	}
	// Depth bound: root is 0, a and b are 1, their children 2.
	w = cache.NewWalk(root, get, cache.WalkOptions{MaxDepth: 1})
	var err error
	for !w.Done() && err == nil {
		_, _, err = w.Next(context.Background())
	}
	cachetest.WantCode(t, err, codes.InvalidArgument)
	// WalkAll stops at the first absent directory.
	err = cache.WalkAll(context.Background(), root, get, cache.WalkOptions{}, func(cache.WalkItem, *repb.Directory) error { return nil })
	cachetest.WantCode(t, err, codes.NotFound)
}

// TestTreeDirectories: a Tree's directories are found by digest, and one it lacks
// makes the Tree INVALID_ARGUMENT; a malformed child digest is INVALID_ARGUMENT too.
func TestTreeDirectories(t *testing.T) {
	leaf := &repb.Directory{Files: []*repb.FileNode{{Name: "x", Digest: cache.EmptyDigest.Proto()}}}
	_, ld, _ := cache.DigestOfProto(leaf)
	tree := &repb.Tree{Root: &repb.Directory{Directories: []*repb.DirectoryNode{{Name: "d", Digest: ld.Proto()}}}, Children: []*repb.Directory{leaf}}
	root, dirs, err := cache.TreeDirectories(tree)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	err = cache.WalkAll(context.Background(), root, dirs, cache.WalkOptions{}, func(it cache.WalkItem, d *repb.Directory) error {
		got = append(got, it.Path)
		return nil
	})
	if err != nil || !reflect.DeepEqual(got, []string{"", "d"}) {
		t.Fatalf("%q %v", got, err)
	}
	tree.Children = nil
	root, dirs, _ = cache.TreeDirectories(tree)
	cachetest.WantCode(t, cache.WalkAll(context.Background(), root, dirs, cache.WalkOptions{}, func(cache.WalkItem, *repb.Directory) error { return nil }), codes.InvalidArgument)
	bad := &repb.Tree{Root: &repb.Directory{Directories: []*repb.DirectoryNode{{Name: "d", Digest: &repb.Digest{Hash: "nope"}}}}}
	root, dirs, _ = cache.TreeDirectories(bad)
	cachetest.WantCode(t, cache.WalkAll(context.Background(), root, dirs, cache.WalkOptions{}, func(cache.WalkItem, *repb.Directory) error { return nil }), codes.InvalidArgument)
}
