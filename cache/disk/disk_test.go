package disk

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/cachetest"
	"google.golang.org/grpc/codes"
)

func open(t *testing.T, dir string, opts Options) *Store {
	t.Helper()
	s, err := Open(context.Background(), dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestConformance(t *testing.T) {
	cachetest.BlobStore(t, func(t *testing.T) cache.BlobStore { return open(t, t.TempDir(), Options{}) })
	cachetest.BlobStore(t, func(t *testing.T) cache.BlobStore { return open(t, t.TempDir(), Options{Primary: true}) })
	cachetest.ActionCache(t, func(t *testing.T) cache.ActionCache { return open(t, t.TempDir(), Options{}).ActionCache() })
	cachetest.BlobStore(t, func(t *testing.T) cache.BlobStore {
		return open(t, t.TempDir(), Options{Primary: true, MaxSize: 1 << 30, Fsync: true})
	})
}

// TestCorruptBlobRemovedOnRead flips a byte in a stored blob: the read fails with
// DATA_LOSS at the end and the blob is gone afterwards.
func TestCorruptBlobRemovedOnRead(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir(), Options{Primary: true, MaxSize: 1 << 30})
	data, d := cachetest.RandomBlob(t, 100000)
	if err := s.Put(ctx, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	damage(t, s.BlobPath(d), 500)
	r, err := s.Get(ctx, d, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = io.ReadAll(r)
	r.Close()
	cachetest.WantCode(t, err, codes.DataLoss)
	if m, _ := s.FindMissing(ctx, []cache.Digest{d}); len(m) != 1 {
		t.Fatal("corrupt blob still reported present")
	}
	if _, err := os.Stat(s.BlobPath(d)); !os.IsNotExist(err) {
		t.Fatalf("corrupt blob file still on disk: %v", err)
	}
	// A later sound upload brings it back.
	if err := s.Put(ctx, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	if got, err := cache.ReadAll(ctx, s, d, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatal(err)
	}
}

// TestTruncatedBlob: a blob file cut short (a torn write after power loss) is missing.
func TestTruncatedBlob(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir(), Options{})
	data, d := cachetest.RandomBlob(t, 5000)
	if err := s.Put(ctx, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	p := s.BlobPath(d)
	os.Chmod(p, 0o644)
	if err := os.Truncate(p, 100); err != nil {
		t.Fatal(err)
	}
	_, err := s.Get(ctx, d, 0)
	cachetest.WantCode(t, err, codes.NotFound)
	if _, err := os.Stat(p); !os.IsNotExist(err) {
		t.Fatal("truncated blob not removed")
	}
}

// TestCorruptReadFromOffset: a read from an offset verifies the skipped prefix too.
func TestCorruptReadFromOffset(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir(), Options{})
	data, d := cachetest.RandomBlob(t, 5000)
	s.Put(ctx, d, bytes.NewReader(data))
	damage(t, s.BlobPath(d), 10)
	r, err := s.Get(ctx, d, 4000)
	if err != nil {
		t.Fatal(err)
	}
	_, err = io.ReadAll(r)
	r.Close()
	cachetest.WantCode(t, err, codes.DataLoss)
}

func damage(t *testing.T, path string, off int64) {
	t.Helper()
	os.Chmod(path, 0o644)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	f.ReadAt(b, off)
	b[0] ^= 0xff
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
	f.Close()
}

func TestDamagedActionCacheEntry(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir(), Options{})
	ac := s.ActionCache()
	_, d := cachetest.RandomBlob(t, 10)
	k := cache.ActionKey{Action: d}
	if err := ac.Put(ctx, k, &repb.ActionResult{ExitCode: 0, StdoutRaw: []byte("hello world")}); err != nil {
		t.Fatal(err)
	}
	damage(t, s.acPath(cache.ActionKeyHash(k)), 40)
	_, err := ac.Get(ctx, k)
	cachetest.WantCode(t, err, codes.NotFound)
	if _, err := os.Stat(s.acPath(cache.ActionKeyHash(k))); !os.IsNotExist(err) {
		t.Fatal("damaged entry not removed")
	}
}

func TestEvictionLRU(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir(), Options{Primary: true, MaxSize: 100 << 10})
	var dg []cache.Digest
	for i := 0; i < 10; i++ {
		data, d := cachetest.RandomBlob(t, 10<<10)
		dg = append(dg, d)
		if err := s.Put(ctx, d, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			continue
		}
		// Keep blob 0 hot.
		if m, _ := s.FindMissing(ctx, dg[:1]); len(m) != 0 {
			t.Fatalf("hot blob evicted after %d puts", i)
		}
	}
	// One more blob pushes the store over 100 KiB: the coldest (blob 1) goes, blob 0 stays.
	data, d := cachetest.RandomBlob(t, 10<<10)
	if err := s.Put(ctx, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	if s.Size() > 100<<10 {
		t.Fatalf("size %d over bound", s.Size())
	}
	if m, _ := s.FindMissing(ctx, []cache.Digest{dg[1]}); len(m) != 1 {
		t.Fatal("least recently used blob survived eviction")
	}
	if m, _ := s.FindMissing(ctx, []cache.Digest{dg[0], d}); len(m) != 0 {
		t.Fatalf("recently used blobs evicted: %v", m)
	}
	if _, err := os.Stat(s.BlobPath(dg[1])); !os.IsNotExist(err) {
		t.Fatal("evicted blob's file remains")
	}
}

// TestEvictionWhileReading: a reader that opened a blob keeps reading it whole even if
// eviction removes it meanwhile.
func TestEvictionWhileReading(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir(), Options{Primary: true, MaxSize: 1 << 20})
	data, d := cachetest.RandomBlob(t, 600<<10)
	s.Put(ctx, d, bytes.NewReader(data))
	r, err := s.Get(ctx, d, 0)
	if err != nil {
		t.Fatal(err)
	}
	other, od := cachetest.RandomBlob(t, 600<<10)
	if err := s.Put(ctx, od, bytes.NewReader(other)); err != nil {
		t.Fatal(err)
	}
	if m, _ := s.FindMissing(ctx, []cache.Digest{d}); len(m) != 1 {
		t.Fatal("expected the first blob to be evicted")
	}
	got, err := io.ReadAll(r)
	r.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("reader of an evicted blob: %v", err)
	}
}

// TestReopenKeepsOrderAndSharesDir: a second Store on the same directory (another
// process, e.g. the CLI while a server runs) sees blobs the first wrote, and the index
// rebuilt at open keeps the LRU order by mtime.
func TestReopenKeepsOrderAndSharesDir(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	now := time.Unix(1_700_000_000, 0)
	clock := func() time.Time { return now }
	a := open(t, dir, Options{Now: clock})
	var dg []cache.Digest
	for i := 0; i < 4; i++ {
		data, d := cachetest.RandomBlob(t, 30<<10)
		if err := a.Put(ctx, d, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		// Make the mtimes distinct and ordered: blob 0 oldest.
		mt := now.Add(time.Duration(i) * time.Minute)
		os.Chtimes(a.BlobPath(d), mt, mt)
		dg = append(dg, d)
	}
	b := open(t, dir, Options{Primary: true, MaxSize: 100 << 10})
	// Opening over the bound evicted the oldest first.
	if m, _ := b.FindMissing(ctx, dg); len(m) != 1 || m[0] != dg[0] {
		t.Fatalf("missing after reopen = %v, want only the oldest", m)
	}
	// Blobs written by a, unknown to b's index, are found and accounted.
	data, d := cachetest.RandomBlob(t, 1000)
	a.Put(ctx, d, bytes.NewReader(data))
	if m, _ := b.FindMissing(ctx, []cache.Digest{d}); len(m) != 0 {
		t.Fatal("blob written by another Store not visible")
	}
	// A second primary on the dir is refused: one indexer per dir.
	if _, err := Open(ctx, dir, Options{Primary: true}); err == nil {
		t.Fatal("two primary stores on one dir")
	}
	// A blob that another process removed is not reported present by the primary
	// once it has been looked at (Get notices and forgets it).
	os.Remove(a.BlobPath(d))
	if _, err := b.Get(ctx, d, 0); err == nil {
		t.Fatal("removed blob readable")
	}
	if m, _ := b.FindMissing(ctx, []cache.Digest{d}); len(m) != 1 {
		t.Fatal("removed blob still reported present")
	}
}

// TestSweepsTempFilesOfDeadWriters: temp files of a Store whose process died are
// removed when the next Store opens; those of a live Store are left alone.
func TestSweepsTempFilesOfDeadWriters(t *testing.T) {
	dir := t.TempDir()
	live := open(t, dir, Options{})
	liveTmp, err := live.createNamedTemp(0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer liveTmp.Close()
	// A crashed writer: its owner file exists, unlocked, with a temp file beside it.
	os.WriteFile(filepath.Join(dir, "tmp", "deadbeef"+ownerSuffix), nil, 0o600)
	deadTmp := filepath.Join(dir, "tmp", "deadbeef-0123")
	os.WriteFile(deadTmp, []byte("half a blob"), 0o644)
	open(t, dir, Options{})
	if _, err := os.Stat(deadTmp); !os.IsNotExist(err) {
		t.Fatal("temp file of a dead writer not swept")
	}
	if _, err := os.Stat(liveTmp.Name()); err != nil {
		t.Fatal("temp file of a live writer was removed")
	}
}

// TestVerifyAndRepair: a blob damaged in place (same size) is caught by Verify, which
// callers use before hardlinking it, and an upload of the right bytes repairs it.
func TestVerifyAndRepair(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir(), Options{Primary: true})
	data, d := cachetest.RandomBlob(t, 4096)
	if err := s.Put(ctx, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	if err := s.Verify(d); err != nil {
		t.Fatal(err)
	}
	info, _ := os.Stat(s.BlobPath(d))
	if !info.ModTime().Equal(cache.InputMtime) {
		t.Fatalf("blob mtime %v, want the fixed input mtime", info.ModTime())
	}
	damage(t, s.BlobPath(d), 100)
	os.Chmod(s.BlobPath(d), 0o444)
	cachetest.WantCode(t, s.Verify(d), codes.NotFound)
	if err := s.Put(ctx, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	if got, err := cache.ReadAll(ctx, s, d, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("not repaired: %v", err)
	}
	// Damage after a successful Verify is caught too: the file changed (ctime).
	if err := s.Verify(d); err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Millisecond)
	damage(t, s.BlobPath(d), 7)
	cachetest.WantCode(t, s.Verify(d), codes.NotFound)
}

// TestConcurrentOpensKeepTheirOwners: stores opened at once on one dir never take each
// other for dead (an owner file seen before its lock was swept, or its lock refused).
func TestConcurrentOpensKeepTheirOwners(t *testing.T) {
	dir := t.TempDir()
	const n = 40
	stores := make(chan *Store, n)
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		go func() {
			s, err := Open(context.Background(), dir, Options{})
			if err != nil {
				errs <- err
				return
			}
			stores <- s
		}()
	}
	for i := 0; i < n; i++ {
		select {
		case err := <-errs:
			t.Fatalf("open: %v", err)
		case s := <-stores:
			t.Cleanup(func() { s.Close() })
			if _, err := os.Stat(filepath.Join(dir, "tmp", s.owner+ownerSuffix)); err != nil {
				t.Fatalf("a live store's owner file was swept: %v", err)
			}
		}
	}
}

// TestPutOverBlobsTheIndexLacks: a primary's Put does not stat a blob its index lacks,
// so a file another process put at the blob's name is met at the link: kept when it
// holds the blob (and indexed), replaced when it is damaged in place or truncated.
func TestPutOverBlobsTheIndexLacks(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	other := open(t, dir, Options{})
	s := open(t, dir, Options{Primary: true})

	data, d := cachetest.RandomBlob(t, 4096)
	if err := other.Put(ctx, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	before, _ := os.Stat(s.BlobPath(d))
	if err := s.Put(ctx, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	after, _ := os.Stat(s.BlobPath(d))
	if !os.SameFile(before, after) {
		t.Fatal("a good blob another process wrote was replaced")
	}
	if !s.indexed("c"+d.Hash, d.Size) {
		t.Fatal("the blob found at the link was not indexed")
	}

	for name, spoil := range map[string]func(path string){
		"damaged in place": func(path string) { damage(t, path, 100) },
		"truncated":        func(path string) { os.Truncate(path, 1000) },
	} {
		data, d := cachetest.RandomBlob(t, 8192)
		if err := other.Put(ctx, d, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		path := s.BlobPath(d)
		os.Chmod(path, 0o644)
		spoil(path)
		os.Chmod(path, 0o444)
		if err := s.Put(ctx, d, bytes.NewReader(data)); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if got, err := os.ReadFile(path); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("%s: the blob was not replaced by the bytes uploaded (%v)", name, err)
		}
		if err := s.Verify(d); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
}

// TestFreeSpaceReadingReused: with ample room the free disk space is read once per
// freeTTL, not per blob; near a full disk every reservation reads it afresh, and a
// blob that does not fit is refused.
func TestFreeSpaceReadingReused(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir(), Options{Primary: true})
	reads, free := 0, int64(100<<30)
	s.freeSpace = func() (int64, error) { reads++; return free, nil }
	put := func() error {
		data, d := cachetest.RandomBlob(t, 4096)
		return s.Put(ctx, d, bytes.NewReader(data))
	}
	for i := 0; i < 5; i++ {
		if err := put(); err != nil {
			t.Fatal(err)
		}
	}
	if reads != 1 {
		t.Fatalf("free space read %d times for 5 blobs with 100 GiB free, want 1", reads)
	}
	free = freeMargin
	s.mu.Lock()
	s.lastAt = s.lastAt.Add(-freeTTL) // the reading expired
	s.mu.Unlock()
	for i := 0; i < 3; i++ {
		if err := put(); err != nil {
			t.Fatal(err)
		}
	}
	if reads != 4 {
		t.Fatalf("free space read %d times, want a fresh reading per blob near the margin (4)", reads)
	}
	free = 2048
	cachetest.WantCode(t, put(), codes.ResourceExhausted)
}
