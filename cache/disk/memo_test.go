package disk

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/cache/cachetest"
)

// TestRecentlyVerifiedBlobIsNotHashedAgain: a blob written through the store is read
// as it is (no second hash) within verifyTTL; after it the read verifies it again, and a
// read to the end renews the memo.
func TestRecentlyVerifiedBlobIsNotHashedAgain(t *testing.T) {
	ctx := context.Background()
	now := time.Unix(1_700_000_000, 0)
	s := open(t, t.TempDir(), Options{Primary: true, Now: func() time.Time { return now }})
	data, d := cachetest.RandomBlob(t, 100000)
	if err := s.Put(ctx, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	get := func(off int64) (io.ReadCloser, []byte) {
		t.Helper()
		r, err := s.Get(ctx, d, off)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(r)
		if err != nil {
			t.Fatal(err)
		}
		r.Close()
		if !bytes.Equal(b, data[off:]) {
			t.Fatalf("read from %d: wrong bytes", off)
		}
		return r, b
	}
	if r, _ := get(0); !isPlainFile(r) {
		t.Fatalf("read right after the write was hashed again (%T)", r)
	}
	if r, _ := get(4321); !isPlainFile(r) {
		t.Fatalf("read from an offset right after the write was hashed again (%T)", r)
	}
	now = now.Add(verifyTTL + time.Second)
	if r, _ := get(0); isPlainFile(r) {
		t.Fatal("read after verifyTTL was not verified")
	}
	if r, _ := get(0); !isPlainFile(r) {
		t.Fatalf("a whole verified read did not renew the memo (%T)", r)
	}
	// A file damaged after it was remembered is verified again: TestCorruptBlobRemovedOnRead.
}

func isPlainFile(r io.ReadCloser) bool {
	_, verifying := r.(*memoizingReader)
	return !verifying
}

// TestMemoIsBounded: the memo keeps the most recent verifications in two generations
// of at most memoSize entries each.
func TestMemoIsBounded(t *testing.T) {
	m := newMemo()
	now := time.Unix(1_700_000_000, 0)
	for i := 0; i < 3*memoSize+5; i++ {
		m.add(strconv.Itoa(i), fileID{ino: uint64(i)}, now)
	}
	if n := len(m.cur) + len(m.old); n > 2*memoSize {
		t.Fatalf("%d entries, want at most %d", n, 2*memoSize)
	}
	last := 3*memoSize + 4
	if !m.ok(strconv.Itoa(last), fileID{ino: uint64(last)}, now) {
		t.Fatal("the newest verification was forgotten")
	}
	if m.ok("0", fileID{ino: 0}, now) {
		t.Fatal("the oldest verification is still remembered")
	}
	if m.ok(strconv.Itoa(last), fileID{ino: uint64(last) + 1}, now) {
		t.Fatal("a different file passed for the verified one")
	}
	m.drop(strconv.Itoa(last))
	if m.ok(strconv.Itoa(last), fileID{ino: uint64(last)}, now) {
		t.Fatal("a dropped verification is still remembered")
	}
}

// TestLinkedBlobStaysVerified: hardlinking a blob into an exec root and removing the link
// (which change its ctime) keep it remembered; a write to it (which moves its mtime)
// does not.
func TestLinkedBlobStaysVerified(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir(), Options{Primary: true})
	data, d := cachetest.RandomBlob(t, 100000)
	if err := s.Put(ctx, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	for i := 0; i < 3; i++ {
		src, err := s.BlobFile(ctx, d)
		if err != nil {
			t.Fatal(err)
		}
		link := filepath.Join(root, "input"+strconv.Itoa(i))
		if err := os.Link(src, link); err != nil {
			t.Fatal(err)
		}
		if i%2 == 1 {
			os.Remove(link)
		}
	}
	r, err := s.Get(ctx, d, 0)
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	if !isPlainFile(r) {
		t.Fatal("a blob was hashed again after it was linked and unlinked")
	}
	os.Chmod(s.BlobPath(d), 0o644)
	f, err := os.OpenFile(s.BlobPath(d), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte{data[10] ^ 0xff}, 10)
	f.Close()
	if err := s.Verify(d); err == nil {
		t.Fatal("a blob written to after it was remembered passed Verify without a hash")
	}
}
