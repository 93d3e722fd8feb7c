package tlog

import (
	"bytes"
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"

	"golang.org/x/mod/sumdb/note"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// memObjects is an in-memory object store (a fake of the bucket) that counts requests.
type memObjects struct {
	mu   sync.Mutex
	objs map[string][]byte
	gets int
}

func newMemObjects() *memObjects { return &memObjects{objs: map[string][]byte{}} }

func (m *memObjects) GetObject(_ context.Context, key string, max int64) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.gets++
	b, ok := m.objs[key]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "%s not found", key)
	}
	return append([]byte(nil), b...), nil
}

func (m *memObjects) PutObject(_ context.Context, key string, data []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.objs[key] = append([]byte(nil), data...)
	return nil
}

func (m *memObjects) DeleteObject(_ context.Context, key string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.objs, key)
	return nil
}

func (m *memObjects) ListKeys(_ context.Context, prefix string, max int) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var ks []string
	for k := range m.objs {
		if strings.HasPrefix(k, prefix) {
			ks = append(ks, k)
		}
	}
	sort.Strings(ks)
	if len(ks) > max {
		ks = ks[:max]
	}
	return ks, nil
}

func (m *memObjects) String() string { return "memory" }

func (m *memObjects) keys(prefix string) []string {
	ks, _ := m.ListKeys(context.Background(), prefix, 1<<20)
	return ks
}

// openLog opens a new log named name in a temp dir, closed at the test's end.
func openLog(t *testing.T, name string) (dir, sk string, v note.Verifier, l *Log) {
	t.Helper()
	ctx := context.Background()
	dir = t.TempDir()
	sk, vk := newKey(t, name)
	s, v := signerVerifier(t, sk, vk)
	l, err := Open(ctx, dir, s, fastOpts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close(ctx) })
	return dir, sk, v, l
}

// appendEntries appends n entries "entry-<index>" to l and to entries, and has l sign
// a checkpoint covering them.
func appendEntries(t *testing.T, l *Log, entries *[][]byte, n int) {
	t.Helper()
	ctx := context.Background()
	var es [][]byte
	for range n {
		es = append(es, []byte(fmt.Sprintf("entry-%d", len(*entries)+len(es))))
	}
	if _, err := l.AppendBatch(ctx, es); err != nil {
		t.Fatal(err)
	}
	*entries = append(*entries, es...)
	if err := l.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestPublish: a log published batch by batch to an object store reads there like in
// its directory: every checkpoint verifies, every entry proves its inclusion, a reader
// still on an older checkpoint (whose partial tiles were superseded) proves too, and
// only the current partial tiles are left.
func TestPublish(t *testing.T) {
	ctx := context.Background()
	dir, sk, v, l := openLog(t, "kiln-log/publish")
	o := newMemObjects()
	pub, err := NewPublisher(ctx, dir, v, o, "kiln/log/")
	if err != nil {
		t.Fatal(err)
	}
	if cp, err := pub.Publish(ctx); err != nil || cp != nil {
		t.Fatalf("publishing an empty log: %v %v", cp, err)
	}
	r := NewReaderFrom(ObjectSource(o, "kiln/log/", 1<<20), v)
	var entries [][]byte
	var old *Checkpoint
	// Batches that cross bundle and level-1 tile boundaries (256 and 65536 would be
	// slow; 256 is the one that matters for partials).
	for _, batch := range []int{1, 3, 250, 2, 1, 300, 40} {
		appendEntries(t, l, &entries, batch)
		cp, err := pub.Publish(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if cp.Size != uint64(len(entries)) {
			t.Fatalf("published size %d, want %d", cp.Size, len(entries))
		}
		got, err := r.Checkpoint(ctx)
		if err != nil || got.Size != cp.Size || !bytes.Equal(got.Root, cp.Root) {
			t.Fatalf("read back %+v %v, published %+v", got, err, cp)
		}
		pv, err := r.Prover(ctx, got.Size)
		if err != nil {
			t.Fatal(err)
		}
		for i, e := range entries {
			if _, _, err := r.Include(ctx, e, uint64(i), true, got, pv); err != nil {
				t.Fatalf("size %d: entry %d: %v", got.Size, i, err)
			}
		}
		if old != nil { // a reader on the previous checkpoint
			pv, err := r.Prover(ctx, old.Size)
			if err != nil {
				t.Fatal(err)
			}
			for i := uint64(0); i < old.Size; i++ {
				if _, _, err := r.Include(ctx, entries[i], i, true, old, pv); err != nil {
					t.Fatalf("old size %d: entry %d: %v", old.Size, i, err)
				}
			}
			root, err := r.RootAt(ctx, old.Size)
			if err != nil || !bytes.Equal(root, old.Root) {
				t.Fatalf("root at the old size %d: %v", old.Size, err)
			}
		}
		n := 0
		if err := r.ScanFrom(ctx, 0, got.Size, func(i uint64, e []byte) bool {
			if !bytes.Equal(e, entries[i]) {
				t.Fatalf("entry %d reads %q", i, e)
			}
			n++
			return true
		}); err != nil || n != len(entries) {
			t.Fatalf("scan: %d entries, %v", n, err)
		}
		old = got
	}
	// 597 entries: bundles 0 and 1 full, 2 partial (85); level-0 tiles likewise; level 1
	// one partial tile of 2. No superseded partial is left.
	want := []string{"kiln/log/checkpoint", "kiln/log/tile/0/000", "kiln/log/tile/0/001", "kiln/log/tile/0/002.p/85",
		"kiln/log/tile/1/000.p/2", "kiln/log/tile/entries/000", "kiln/log/tile/entries/001", "kiln/log/tile/entries/002.p/85"}
	if got := o.keys("kiln/log/"); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("published objects:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	// Full tiles are read once, then from memory.
	before := o.gets
	if _, err := r.Entry(ctx, 3, old.Size); err != nil {
		t.Fatal(err)
	}
	if o.gets != before {
		t.Fatalf("a full entry bundle was read from the store again (%d requests)", o.gets-before)
	}
	// A tampered entry in the store fails its proof.
	o.objs["kiln/log/tile/entries/002.p/85"] = bytes.Replace(o.objs["kiln/log/tile/entries/002.p/85"], []byte("entry-520"), []byte("entry-XYZ"), 1)
	if _, _, err := NewReaderFrom(ObjectSource(o, "kiln/log/", 0), v).Include(ctx, []byte("entry-XYZ"), 520, true, old, nil); err == nil {
		t.Fatal("a tampered published entry proved its inclusion")
	}

	// A publisher of the same log resumes; of another log, or of a shorter one, refuses.
	if _, err := NewPublisher(ctx, dir, v, o, "kiln/log/"); err != nil {
		t.Fatalf("resuming: %v", err)
	}
	_, v2 := newKey(t, "kiln-log/other")
	_, v2v := signerVerifier(t, sk, v2)
	if _, err := NewPublisher(ctx, t.TempDir(), v2v, o, "kiln/log/"); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("another log's publisher: %v", err)
	}
	if _, err := NewPublisher(ctx, t.TempDir(), v, o, "kiln/log/"); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("a publisher whose log is shorter than the published one: %v", err)
	}
}

// failAfter is an object store that accepts only the first n writes, as a publisher
// killed mid-publish leaves it.
type failAfter struct {
	*memObjects
	n int
}

func (f *failAfter) PutObject(ctx context.Context, key string, data []byte) error {
	if f.n <= 0 {
		return status.Errorf(codes.Unavailable, "crashed before %s", key)
	}
	f.n--
	return f.memObjects.PutObject(ctx, key, data)
}

func (f *failAfter) DeleteObject(ctx context.Context, key string) error {
	if f.n <= 0 {
		return status.Errorf(codes.Unavailable, "crashed before deleting %s", key)
	}
	return f.memObjects.DeleteObject(ctx, key)
}

// TestPublishInterrupted: a publish cut off after any number of writes leaves the
// published log as it was (the checkpoint never names a tree whose tiles are not all
// there); a publisher started again on the same store resumes and completes it.
func TestPublishInterrupted(t *testing.T) {
	ctx := context.Background()
	dir, _, v, l := openLog(t, "kiln-log/interrupted")
	var entries [][]byte
	appendN := func(n int) { appendEntries(t, l, &entries, n) }
	// checkPublished proves every entry of the published tree, which must have size want.
	checkPublished := func(o Objects, want uint64) {
		t.Helper()
		r := NewReaderFrom(ObjectSource(o, "log/", 0), v)
		cp, err := r.Checkpoint(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if cp.Size != want {
			t.Fatalf("published size %d, want %d", cp.Size, want)
		}
		if root, err := r.RootAt(ctx, cp.Size); err != nil || !bytes.Equal(root, cp.Root) {
			t.Fatalf("the published tiles do not hash to the checkpoint's root: %v", err)
		}
		pv, err := r.Prover(ctx, cp.Size)
		if err != nil {
			t.Fatal(err)
		}
		for i := uint64(0); i < cp.Size; i++ {
			if _, _, err := r.Include(ctx, entries[i], i, true, cp, pv); err != nil {
				t.Fatalf("published size %d: entry %d: %v", cp.Size, i, err)
			}
		}
	}
	appendN(200)
	base := newMemObjects()
	pub, err := NewPublisher(ctx, dir, v, base, "log/")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pub.Publish(ctx); err != nil {
		t.Fatal(err)
	}
	appendN(100) // crosses the first bundle's and tile's end: full ones, new partials
	for k := 0; ; k++ {
		o := &memObjects{objs: map[string][]byte{}}
		for key, b := range base.objs {
			o.objs[key] = b
		}
		pub, err := NewPublisher(ctx, dir, v, o, "log/")
		if err != nil {
			t.Fatal(err)
		}
		f := &failAfter{memObjects: o, n: k}
		cut, err := NewPublisher(ctx, dir, v, f, "log/")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := cut.Publish(ctx); err == nil {
			if k == 0 {
				t.Fatal("a publish with no write allowed succeeded")
			}
			checkPublished(o, 300)
			t.Logf("a publish is %d writes; each cut before its end left the previous tree", k)
			break // k writes are the whole publish
		}
		checkPublished(o, 200)
		if _, err := pub.Publish(ctx); err != nil {
			t.Fatalf("resuming after %d writes: %v", k, err)
		}
		checkPublished(o, 300)
	}
}
