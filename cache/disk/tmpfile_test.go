package disk

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/cachetest"
	"github.com/kilnbuild/kiln/internal/dirplace"
	"github.com/kilnbuild/kiln/internal/dirplace/dirplacetest"
)

// TestUnnamedTempFiles: blobs and action-cache entries are written through unnamed
// temp files, so nothing is left in tmp/ but the owner file; the same blob stored by two
// writers at once is stored once; and a store on a filesystem without O_TMPFILE (named
// temp files) passes the conformance suite too.
func TestUnnamedTempFiles(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := open(t, dir, Options{Primary: true})
	data, d := cachetest.RandomBlob(t, 70000)
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		go func() { errs <- s.Put(ctx, d, bytes.NewReader(data)) }()
	}
	for i := 0; i < 8; i++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if got, err := cache.ReadAll(ctx, s, d, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v", err)
	}
	ac := s.ActionCache()
	key := cache.ActionKey{Action: d}
	for _, code := range []int32{1, 2} {
		if err := ac.Put(ctx, key, &repb.ActionResult{ExitCode: code}); err != nil {
			t.Fatal(err)
		}
	}
	if r, err := ac.Get(ctx, key); err != nil || r.GetExitCode() != 2 {
		t.Fatalf("action cache entry not replaced: %v %v", r, err)
	}
	ents, _ := os.ReadDir(filepath.Join(dir, "tmp"))
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ownerSuffix) {
			t.Errorf("left in tmp/: %s", e.Name())
		}
	}
	cachetest.BlobStore(t, func(t *testing.T) cache.BlobStore {
		s := open(t, t.TempDir(), Options{Primary: true})
		s.noTmpfile.Store(true)
		return s
	})
}

// TestNewStoreSpreadsItsDirectories: on ext2/3/4 a new store asks for its parts and
// their subdirectories to be placed apart (chattr +T on the store, cas/ and ac/).
func TestNewStoreSpreadsItsDirectories(t *testing.T) {
	dir := t.TempDir()
	dirplacetest.SkipUnlessExt(t, dir)
	open(t, dir, Options{})
	for _, d := range []string{"", "cas", "ac"} {
		if m, err := dirplace.Marked(filepath.Join(dir, d)); err != nil || !m {
			t.Errorf("%q: marked %v, %v", d, m, err)
		}
	}
	if m, _ := dirplace.Marked(filepath.Join(dir, "cas", "00")); m {
		t.Error("cas/00 marked: blobs would be spread one by one")
	}
}
