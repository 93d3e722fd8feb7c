// Package cachetest holds the conformance tests every cache.BlobStore and
// cache.ActionCache implementation must pass.
package cachetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"sync"
	"sync/atomic"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// RandomBlob returns n random bytes and their digest.
func RandomBlob(t testing.TB, n int) ([]byte, cache.Digest) {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b, cache.DigestOf(b)
}

// WantCode fails t unless err carries code c.
func WantCode(t testing.TB, err error, c codes.Code) {
	t.Helper()
	if got := status.Code(err); got != c {
		t.Fatalf("got code %v (%v), want %v", got, err, c)
	}
}

// BlobStore runs the BlobStore contract against stores made by newStore.
func BlobStore(t *testing.T, newStore func(t *testing.T) cache.BlobStore) {
	ctx := context.Background()
	t.Run("RoundTrip", func(t *testing.T) {
		s := newStore(t)
		for _, n := range []int{1, 100, 64 << 10, 1<<20 + 7} {
			data, d := RandomBlob(t, n)
			if err := s.Put(ctx, d, bytes.NewReader(data)); err != nil {
				t.Fatalf("put %d bytes: %v", n, err)
			}
			got, err := cache.ReadAll(ctx, s, d, 0)
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("read back %d bytes: err=%v equal=%v", n, err, bytes.Equal(got, data))
			}
		}
	})
	t.Run("ReadFromOffset", func(t *testing.T) {
		s := newStore(t)
		data, d := RandomBlob(t, 10000)
		if err := s.Put(ctx, d, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		for _, off := range []int64{0, 1, 5000, 9999, 10000} {
			r, err := s.Get(ctx, d, off)
			if err != nil {
				t.Fatalf("offset %d: %v", off, err)
			}
			got, err := io.ReadAll(r)
			r.Close()
			if err != nil || !bytes.Equal(got, data[off:]) {
				t.Fatalf("offset %d: err=%v, %d bytes", off, err, len(got))
			}
		}
		_, err := s.Get(ctx, d, 10001)
		WantCode(t, err, codes.OutOfRange)
		_, err = s.Get(ctx, d, -1)
		WantCode(t, err, codes.OutOfRange)
	})
	t.Run("BadWrites", func(t *testing.T) {
		s := newStore(t)
		data, d := RandomBlob(t, 4096)
		other, _ := RandomBlob(t, 4096)
		cases := []struct {
			name string
			d    cache.Digest
			body []byte
		}{
			{"wrong hash", d, other},
			{"short", d, data[:4000]},
			{"long", d, append(append([]byte{}, data...), 'x')},
			{"size says more", cache.Digest{Hash: d.Hash, Size: d.Size + 1}, data},
			{"size says less", cache.Digest{Hash: d.Hash, Size: d.Size - 1}, data},
		}
		for _, c := range cases {
			err := s.Put(ctx, c.d, bytes.NewReader(c.body))
			WantCode(t, err, codes.InvalidArgument)
			for _, probe := range []cache.Digest{d, c.d} {
				if missing, err := s.FindMissing(ctx, []cache.Digest{probe}); err != nil || len(missing) != 1 {
					t.Fatalf("%s: after a refused write, find-missing(%v) = %v, %v; nothing may be stored", c.name, probe, missing, err)
				}
			}
		}
		// Bad data for a blob already present is refused too, and the blob survives.
		if err := s.Put(ctx, d, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		WantCode(t, s.Put(ctx, d, bytes.NewReader(other)), codes.InvalidArgument)
		if got, err := cache.ReadAll(ctx, s, d, 0); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("blob damaged by a refused overwrite: %v", err)
		}
	})
	t.Run("FindMissing", func(t *testing.T) {
		s := newStore(t)
		var ds []cache.Digest
		for i := 0; i < 10; i++ {
			data, d := RandomBlob(t, 10+i)
			ds = append(ds, d)
			if i%2 == 0 {
				if err := s.Put(ctx, d, bytes.NewReader(data)); err != nil {
					t.Fatal(err)
				}
			}
		}
		missing, err := s.FindMissing(ctx, ds)
		if err != nil {
			t.Fatal(err)
		}
		if len(missing) != 5 {
			t.Fatalf("missing %d, want 5", len(missing))
		}
		for i, d := range missing {
			if d != ds[2*i+1] {
				t.Fatalf("missing[%d] = %v, want %v (caller's order)", i, d, ds[2*i+1])
			}
		}
		// Same hash, other size: missing.
		odd := cache.Digest{Hash: ds[0].Hash, Size: ds[0].Size + 1}
		if m, _ := s.FindMissing(ctx, []cache.Digest{odd}); len(m) != 1 {
			t.Fatalf("a digest with the right hash and wrong size was found")
		}
	})
	t.Run("NotFound", func(t *testing.T) {
		s := newStore(t)
		_, d := RandomBlob(t, 10)
		_, err := s.Get(ctx, d, 0)
		WantCode(t, err, codes.NotFound)
	})
	t.Run("ConcurrentSameBlob", func(t *testing.T) {
		s := newStore(t)
		data, d := RandomBlob(t, 256<<10)
		var wg sync.WaitGroup
		errs := make(chan error, 32)
		for i := 0; i < 32; i++ {
			wg.Add(2)
			go func() {
				defer wg.Done()
				errs <- s.Put(ctx, d, bytes.NewReader(data))
			}()
			go func() {
				defer wg.Done()
				// Readers racing the writers see the whole blob or NOT_FOUND, never a part.
				r, err := s.Get(ctx, d, 0)
				if err != nil {
					if status.Code(err) != codes.NotFound {
						errs <- err
					}
					return
				}
				got, err := io.ReadAll(r)
				r.Close()
				if err != nil || !bytes.Equal(got, data) {
					errs <- status.Errorf(codes.DataLoss, "racing reader saw %d bytes, err %v", len(got), err)
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		if got, err := cache.ReadAll(ctx, s, d, 0); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("after concurrent writes: %v", err)
		}
	})
	t.Run("FailingReader", func(t *testing.T) {
		s := newStore(t)
		data, d := RandomBlob(t, 100000)
		err := s.Put(ctx, d, io.MultiReader(bytes.NewReader(data[:5000]), errReader{}))
		if err == nil {
			t.Fatal("a write whose reader failed was accepted")
		}
		if m, _ := s.FindMissing(ctx, []cache.Digest{d}); len(m) != 1 {
			t.Fatal("a failed write left a blob behind")
		}
	})
}

type errReader struct{}

func (errReader) Read([]byte) (int, error) {
	return 0, status.Error(codes.Canceled, "client went away")
}

// ActionCache runs the ActionCache contract against caches made by newAC.
func ActionCache(t *testing.T, newAC func(t *testing.T) cache.ActionCache) {
	ctx := context.Background()
	_, d1 := RandomBlob(t, 10)
	_, d2 := RandomBlob(t, 10)
	res := &repb.ActionResult{ExitCode: 3, StdoutRaw: []byte("hi"),
		OutputFiles: []*repb.OutputFile{{Path: "a/b", Digest: d2.Proto(), IsExecutable: true}}}
	t.Run("RoundTripAndPartition", func(t *testing.T) {
		ac := newAC(t)
		WantCode(t, func() error { _, err := ac.Get(ctx, cache.ActionKey{Action: d1}); return err }(), codes.NotFound)
		if err := ac.Put(ctx, cache.ActionKey{Instance: "x", Action: d1}, res); err != nil {
			t.Fatal(err)
		}
		got, err := ac.Get(ctx, cache.ActionKey{Instance: "x", Action: d1})
		if err != nil || !proto.Equal(got, res) {
			t.Fatalf("got %v, %v", got, err)
		}
		for _, k := range []cache.ActionKey{{Instance: "", Action: d1}, {Instance: "y", Action: d1}, {Instance: "x", Action: d2}} {
			if _, err := ac.Get(ctx, k); status.Code(err) != codes.NotFound {
				t.Fatalf("key %+v: got %v, want NOT_FOUND (instances partition the cache)", k, err)
			}
		}
		res2 := proto.Clone(res).(*repb.ActionResult)
		res2.ExitCode = 0
		if err := ac.Put(ctx, cache.ActionKey{Instance: "x", Action: d1}, res2); err != nil {
			t.Fatal(err)
		}
		if got, _ := ac.Get(ctx, cache.ActionKey{Instance: "x", Action: d1}); !proto.Equal(got, res2) {
			t.Fatal("overwrite not visible")
		}
	})
}

// CountingStore counts the blobs read through it (tests that bound reads).
type CountingStore struct {
	cache.BlobStore
	N atomic.Int64
}

// Get implements cache.BlobStore.
func (c *CountingStore) Get(ctx context.Context, d cache.Digest, offset int64) (io.ReadCloser, error) {
	c.N.Add(1)
	return c.BlobStore.Get(ctx, d, offset)
}
