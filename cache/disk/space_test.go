package disk

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/cachetest"
	"google.golang.org/grpc/codes"
)

// untouchable fails the test if anything reads it: a refusal must come first.
type untouchable struct{ t *testing.T }

func (u untouchable) Read([]byte) (int, error) {
	u.t.Error("the store read a blob it should have refused before writing a byte")
	return 0, io.ErrUnexpectedEOF
}

// TestDeclaredSizeRefusedBeforeWriting (issue 19, cases 4 and 5): a blob larger than
// the bound, or than the free disk space, is RESOURCE_EXHAUSTED before a byte is read;
// a blob that fits is kept, never evicted to make room for itself.
func TestDeclaredSizeRefusedBeforeWriting(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir(), Options{Primary: true, MaxSize: 1 << 20})
	huge := cache.Digest{Hash: strings.Repeat("ab", 32), Size: 2 << 20}
	cachetest.WantCode(t, s.Put(ctx, huge, untouchable{t}), codes.ResourceExhausted)
	cachetest.WantCode(t, s.Put(ctx, cache.Digest{Hash: huge.Hash, Size: 1 << 62}, untouchable{t}), codes.ResourceExhausted)

	old, od := cachetest.RandomBlob(t, 100<<10)
	if err := s.Put(ctx, od, bytes.NewReader(old)); err != nil {
		t.Fatal(err)
	}
	fits, fd := cachetest.RandomBlob(t, 1<<20-1000) // over the 95% eviction mark
	if err := s.Put(ctx, fd, bytes.NewReader(fits)); err != nil {
		t.Fatal(err)
	}
	if m, _ := s.FindMissing(ctx, []cache.Digest{fd}); len(m) != 0 {
		t.Fatal("a blob the store accepted was evicted at once")
	}
	if m, _ := s.FindMissing(ctx, []cache.Digest{od}); len(m) != 1 {
		t.Fatal("the older blob should have made room")
	}

	// Without a bound, the free disk space is the limit.
	u := open(t, t.TempDir(), Options{})
	u.freeSpace = func() (int64, error) { return 10 << 20, nil }
	cachetest.WantCode(t, u.Put(ctx, cache.Digest{Hash: huge.Hash, Size: 1 << 62}, untouchable{t}), codes.ResourceExhausted)
	cachetest.WantCode(t, u.Put(ctx, cache.Digest{Hash: huge.Hash, Size: 11 << 20}, untouchable{t}), codes.ResourceExhausted)
}

// TestBlobsInFlightCountInBound (issue 19, case 4): the bytes of blobs being written
// count in MaxSize: older entries are evicted as a temp file grows, and blobs being
// written at once cannot claim more than the bound together.
func TestBlobsInFlightCountInBound(t *testing.T) {
	ctx := context.Background()
	const max = 8 << 20
	s := open(t, t.TempDir(), Options{Primary: true, MaxSize: max})
	var olds []cache.Digest
	for i := 0; i < 6; i++ {
		b, d := cachetest.RandomBlob(t, 1<<20)
		if err := s.Put(ctx, d, bytes.NewReader(b)); err != nil {
			t.Fatal(err)
		}
		olds = append(olds, d)
	}
	data, d := cachetest.RandomBlob(t, 5<<20)
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() { done <- s.Put(ctx, d, pr) }()
	if _, err := pw.Write(data[:4<<20+1]); err != nil {
		t.Fatal(err)
	}
	// 6 MiB stored and 4 MiB on its way: older entries made room while it was written.
	deadline := time.Now().Add(10 * time.Second)
	for s.Size()+s.temp.Load() > max && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if s.Size()+s.temp.Load() > max || s.temp.Load() < 4<<20 {
		t.Fatalf("stored %d + being written %d, bound %d", s.Size(), s.temp.Load(), max)
	}
	// Another blob that would take the claimed total over the bound is refused.
	cachetest.WantCode(t, s.Put(ctx, cache.Digest{Hash: strings.Repeat("cd", 32), Size: 4 << 20}, untouchable{t}), codes.ResourceExhausted)
	pw.Write(data[4<<20+1:])
	pw.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if s.temp.Load() != 0 || s.Size() > max {
		t.Fatalf("after the write: %d temp bytes, size %d", s.temp.Load(), s.Size())
	}
	if m, _ := s.FindMissing(ctx, append(olds[:1:1], d)); len(m) != 1 || m[0] != olds[0] {
		t.Fatalf("missing %v: want the oldest blob evicted and the new one kept", m)
	}
}
