package cache_test

import (
	"bytes"
	"context"
	"io"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/cachetest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
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

// gatedStore is a memory store whose Put announces itself on started and then waits
// for release (or fails with err).
type gatedStore struct {
	*cache.MemoryStore
	started chan struct{}
	release chan struct{}
	err     error
}

func (g gatedStore) Put(ctx context.Context, d cache.Digest, r io.Reader) error {
	close(g.started)
	select {
	case <-g.release:
	case <-ctx.Done():
		return ctx.Err()
	}
	if g.err != nil {
		return g.err
	}
	return g.MemoryStore.Put(ctx, d, r)
}

func newGated(err error) gatedStore {
	return gatedStore{cache.NewMemoryStore(), make(chan struct{}), make(chan struct{}), err}
}

// TestDurableCopySmallAtOnce: a small blob is written to both stores at once (each
// store's Put has begun before either ends), Put returns only when both hold it, and
// a failure of either store fails the Put with that store's error.
func TestDurableCopySmallAtOnce(t *testing.T) {
	ctx := context.Background()
	data := []byte("a signed link's envelope")
	d := cache.DigestOf(data)
	s, durable := newGated(nil), newGated(nil)
	done := make(chan error, 1)
	go func() { done <- cache.WithDurableCopy(s, durable).Put(ctx, d, bytes.NewReader(data)) }()
	for _, g := range []gatedStore{s, durable} {
		select {
		case <-g.started:
		case err := <-done:
			t.Fatalf("Put returned (%v) before both stores' writes had begun", err)
		case <-time.After(30 * time.Second):
			t.Fatal("the two writes do not run at once: one waits for the other")
		}
	}
	close(s.release)
	select {
	case err := <-done:
		t.Fatalf("Put returned (%v) while the durable copy was still being written", err)
	default:
	}
	close(durable.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	for _, st := range []*cache.MemoryStore{s.MemoryStore, durable.MemoryStore} {
		if b, err := cache.ReadAll(ctx, st, d, 0); err != nil || !bytes.Equal(b, data) {
			t.Fatalf("a store holds %q, %v", b, err)
		}
	}

	for _, failDurable := range []bool{false, true} {
		s, durable := newGated(nil), newGated(nil)
		bad := &s
		if failDurable {
			bad = &durable
		}
		bad.err = status.Error(codes.Unavailable, "bucket unreachable")
		close(s.release)
		close(durable.release)
		err := cache.WithDurableCopy(s, durable).Put(ctx, d, bytes.NewReader(data))
		if status.Code(err) != codes.Unavailable {
			t.Fatalf("durable fails=%v: Put = %v, want UNAVAILABLE", failDurable, err)
		}
	}

	// Bytes that are not the blob reach neither store.
	s, durable = newGated(nil), newGated(nil)
	close(s.release)
	close(durable.release)
	err := cache.WithDurableCopy(s, durable).Put(ctx, d, bytes.NewReader([]byte("something else entirely!")))
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("Put of wrong bytes = %v, want INVALID_ARGUMENT", err)
	}
	for _, g := range []gatedStore{s, durable} {
		select {
		case <-g.started:
			t.Fatal("a store was asked to write bytes that are not the blob")
		default:
		}
	}
}
