package cache_test

import (
	"context"
	"testing"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/cachetest"
)

func TestMemoryStore(t *testing.T) {
	cachetest.BlobStore(t, func(*testing.T) cache.BlobStore { return cache.NewMemoryStore() })
	cachetest.ActionCache(t, func(*testing.T) cache.ActionCache { return cache.NewMemoryStore().ActionCache() })
}

// TestDurableCopy: what is written through the wrapper is in both stores; a blob the
// first store loses is still read and found.
func TestDurableCopy(t *testing.T) {
	ctx := context.Background()
	s, durable := cache.NewMemoryStore(), cache.NewMemoryStore()
	w := cache.WithDurableCopy(s, durable)
	d, err := cache.PutBytes(ctx, w, []byte("a signed link"))
	if err != nil {
		t.Fatal(err)
	}
	if m, _ := durable.FindMissing(ctx, []cache.Digest{d}); len(m) != 0 {
		t.Fatal("the durable store lacks the blob")
	}
	s.Delete(d)
	if m, err := w.FindMissing(ctx, []cache.Digest{d}); err != nil || len(m) != 0 {
		t.Fatalf("missing=%v err=%v", m, err)
	}
	if b, err := cache.ReadAll(ctx, w, d, 0); err != nil || string(b) != "a signed link" {
		t.Fatalf("read = %q, %v", b, err)
	}
}
