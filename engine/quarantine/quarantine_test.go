package quarantine

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/cachetest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestQuarantineHidesResultsAndAudits(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	l, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	cas := cache.NewMemoryStore()
	bad := []byte("tampered binary")
	bd := cache.DigestOf(bad)
	cas.Put(ctx, bd, bytes.NewReader(bad))
	ac := l.WrapActionCache(cas.ActionCache(), cas)
	key := cache.ActionKey{Action: cache.DigestOf([]byte("action"))}
	ac.Put(ctx, key, &repb.ActionResult{OutputFiles: []*repb.OutputFile{{Path: "bin/app", Digest: bd.Proto()}}})
	if _, err := ac.Get(ctx, key); err != nil {
		t.Fatal(err)
	}
	// Another process (a second List on the same dir) quarantines: seen at once.
	other, _ := Open(dir)
	if _, err := other.Add("sha256:"+bd.Hash, "bin/app", "rebuild FAILED: bin/app differs", "test"); err != nil {
		t.Fatal(err)
	}
	if _, err := ac.Get(ctx, key); status.Code(err) != codes.NotFound {
		t.Fatalf("quarantined result served: %v", err)
	}
	es, _ := l.List()
	if len(es) != 1 || es[0].Reason == "" || es[0].Subject != "bin/app" {
		t.Fatalf("list %+v", es)
	}
	if _, err := l.Release(bd.Hash, "", "test"); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("release without a reason: %v", err)
	}
	if _, err := l.Release("sha256:"+bd.Hash, "false alarm: the toolchain image was re-pinned", "test"); err != nil {
		t.Fatal(err)
	}
	if _, err := ac.Get(ctx, key); err != nil {
		t.Fatalf("released result still hidden: %v", err)
	}
	if _, err := l.Release("sha256:"+bd.Hash, "again", "test"); status.Code(err) != codes.NotFound {
		t.Fatalf("double release: %v", err)
	}
	audit, err := l.Audit()
	if err != nil || len(audit) != 2 || audit[0].Event != "quarantine" || audit[1].Event != "release" || audit[1].Reason == "" {
		t.Fatalf("audit %+v %v", audit, err)
	}
	if _, err := l.Add("nonsense", "", "x", "test"); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("bad digest: %v", err)
	}
}

// TestQuarantineSameTick: a quarantine added within the same tick of the directory's
// coarse mtime as the change before it (so the mtime does not move) is still seen.
func TestQuarantineSameTick(t *testing.T) {
	dir := t.TempDir()
	l, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	first, second := cache.DigestOf([]byte("one")), cache.DigestOf([]byte("two"))
	if _, err := l.Add("sha256:"+first.Hash, "a", "first", "test"); err != nil {
		t.Fatal(err)
	}
	if !l.Quarantined(first.Hash) {
		t.Fatal("first quarantine not seen")
	}
	qdir := filepath.Join(dir, "quarantine")
	fi, err := os.Stat(qdir)
	if err != nil {
		t.Fatal(err)
	}
	other, _ := Open(dir)
	if _, err := other.Add("sha256:"+second.Hash, "b", "second", "test"); err != nil {
		t.Fatal(err)
	}
	// The same tick: the directory's mtime is where it was when l last read it.
	if err := os.Chtimes(qdir, fi.ModTime(), fi.ModTime()); err != nil {
		t.Fatal(err)
	}
	if !l.Quarantined(second.Hash) {
		t.Fatal("a quarantine added in the same mtime tick as the last read was missed")
	}
}

// TestWrapActionCacheConforms: with nothing quarantined, the wrapped action cache keeps
// the ActionCache contract.
func TestWrapActionCacheConforms(t *testing.T) {
	cachetest.ActionCache(t, func(t *testing.T) cache.ActionCache {
		l, err := Open(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		m := cache.NewMemoryStore()
		return l.WrapActionCache(m.ActionCache(), m)
	})
}
