package tiered_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/cachetest"
	"github.com/kilnbuild/kiln/cache/disk"
	s3 "github.com/kilnbuild/kiln/cache/s3"
	"github.com/kilnbuild/kiln/cache/tiered"
	"github.com/kilnbuild/kiln/test/harness"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

var prefixes atomic.Int64

// node is one kiln process's view: a local disk tier and the shared bucket.
type node struct {
	*tiered.Store
	bucket *s3.Bucket
	local  *disk.Store
}

type nodeOpts struct {
	prefix  string
	maxSize int64
	now     func() time.Time
	params  []string
}

func newNode(t *testing.T, srv *harness.S3, o nodeOpts) node {
	t.Helper()
	cfg, err := s3.ParseURL(srv.URL("kiln", o.prefix, o.params...))
	if err != nil {
		t.Fatal(err)
	}
	cfg.PartSize = 5 << 20
	b, err := s3.Open(context.Background(), cfg, s3.Options{Now: o.now})
	if err != nil {
		t.Fatal(err)
	}
	local, err := disk.Open(context.Background(), t.TempDir(), disk.Options{Primary: true, MaxSize: o.maxSize})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { local.Close() })
	return node{tiered.New(local, b.CAS(), tiered.Options{}), b, local}
}

func freshPrefix() string { return fmt.Sprintf("p%d", prefixes.Add(1)) }

func TestConformance(t *testing.T) {
	srv := harness.StartS3(t, "kiln")
	srv.Setenv(t)
	cachetest.BlobStore(t, func(t *testing.T) cache.BlobStore { return newNode(t, srv, nodeOpts{prefix: freshPrefix()}) })
	cachetest.BlobStore(t, func(t *testing.T) cache.BlobStore {
		return newNode(t, srv, nodeOpts{prefix: freshPrefix(), maxSize: 512 << 10})
	})
}

// TestSharedBucket: what one node writes, another node (its own local tier) reads and
// finds, and the writer's local tier holds it too.
func TestSharedBucket(t *testing.T) {
	srv := harness.StartS3(t, "kiln")
	srv.Setenv(t)
	ctx := context.Background()
	p := freshPrefix()
	a, b := newNode(t, srv, nodeOpts{prefix: p}), newNode(t, srv, nodeOpts{prefix: p})
	data, d := cachetest.RandomBlob(t, 300<<10)
	if err := a.Put(ctx, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	if !a.local.Has(d) {
		t.Fatal("the writer's local tier lacks the blob")
	}
	if m, err := b.FindMissing(ctx, []cache.Digest{d}); err != nil || len(m) != 0 {
		t.Fatalf("other node: missing=%v err=%v", m, err)
	}
	got, err := cache.ReadAll(ctx, b, d, 0)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("other node read: %v", err)
	}
	if !b.local.Has(d) {
		t.Fatal("a read did not bring the blob to the reader's local tier")
	}
	path, err := b.BlobFile(ctx, d)
	if err != nil || !strings.HasPrefix(path, b.local.Dir()) {
		t.Fatalf("BlobFile = %q, %v", path, err)
	}
}

// TestSmallLocalTier: with a 1 MiB local tier, blobs of 6 MiB (multipart) and 300 KiB
// are all served and verified; the large ones are never kept locally and have no
// local file, the small ones come back after eviction.
func TestSmallLocalTier(t *testing.T) {
	srv := harness.StartS3(t, "kiln")
	srv.Setenv(t)
	ctx := context.Background()
	n := newNode(t, srv, nodeOpts{prefix: freshPrefix(), maxSize: 1 << 20})
	type blob struct {
		data []byte
		d    cache.Digest
	}
	var blobs []blob
	for i := 0; i < 8; i++ {
		size := 300 << 10
		if i%2 == 0 {
			size = 6<<20 + i
		}
		data, d := cachetest.RandomBlob(t, size)
		if err := n.Put(ctx, d, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		blobs = append(blobs, blob{data, d})
	}
	if _, size := n.local.Stats(); size > 1<<20 {
		t.Fatalf("local tier holds %d bytes, over its 1 MiB bound", size)
	}
	for round := 0; round < 2; round++ {
		for _, b := range blobs {
			got, err := cache.ReadAll(ctx, n, b.d, 0)
			if err != nil || !bytes.Equal(got, b.data) {
				t.Fatalf("read %v: %v", b.d, err)
			}
			r, err := n.Get(ctx, b.d, b.d.Size/2)
			if err != nil {
				t.Fatal(err)
			}
			tail, err := io.ReadAll(r)
			r.Close()
			if err != nil || !bytes.Equal(tail, b.data[b.d.Size/2:]) {
				t.Fatalf("read %v from the middle: %v", b.d, err)
			}
			_, err = n.BlobFile(ctx, b.d)
			if b.d.Size > 1<<20 {
				cachetest.WantCode(t, err, codes.ResourceExhausted)
			} else if err != nil {
				t.Fatalf("BlobFile(%v): %v", b.d, err)
			}
		}
	}
	if _, size := n.local.Stats(); size > 1<<20 {
		t.Fatalf("local tier holds %d bytes, over its 1 MiB bound", size)
	}
}

// TestDeletedBehindKilnsBack: a blob removed from the bucket by someone else makes the
// action-cache entry that references it a miss, at once on a node that has not seen the
// blob, and on the writer once its existence cache entry expires; a fresh upload heals.
func TestDeletedBehindKilnsBack(t *testing.T) {
	srv := harness.StartS3(t, "kiln")
	srv.Setenv(t)
	ctx := context.Background()
	var now atomic.Int64
	now.Store(time.Now().UnixNano())
	clock := func() time.Time { return time.Unix(0, now.Load()) }
	p := freshPrefix()
	a := newNode(t, srv, nodeOpts{prefix: p, now: clock, params: []string{"exists-ttl=1m"}})
	b := newNode(t, srv, nodeOpts{prefix: p, now: clock, params: []string{"exists-ttl=1m"}})
	data, d := cachetest.RandomBlob(t, 5000)
	if err := a.Put(ctx, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	key := cache.ActionKey{Action: cache.DigestOf([]byte("action"))}
	res := &repb.ActionResult{OutputFiles: []*repb.OutputFile{{Path: "out", Digest: d.Proto()}}}
	if err := a.bucket.ActionCache().Put(ctx, key, res); err != nil {
		t.Fatal(err)
	}
	acA := cache.WithCompletenessCheck(a.bucket.ActionCache(), a)
	acB := cache.WithCompletenessCheck(b.bucket.ActionCache(), b)
	if _, err := acB.Get(ctx, key); err != nil {
		t.Fatalf("complete entry: %v", err)
	}
	b2 := newNode(t, srv, nodeOpts{prefix: p, now: clock})
	if err := os.Remove(filepath.Join(srv.Dir, "kiln", p, "cas", d.Hash[:2], d.Hash)); err != nil {
		t.Fatal(err)
	}
	_, err := cache.WithCompletenessCheck(b2.bucket.ActionCache(), b2).Get(ctx, key)
	cachetest.WantCode(t, err, codes.NotFound)
	now.Add(int64(2 * time.Minute))
	_, err = acA.Get(ctx, key)
	cachetest.WantCode(t, err, codes.NotFound)
	_, err = acB.Get(ctx, key)
	cachetest.WantCode(t, err, codes.NotFound)
	// The client uploads again (the writer still holds a local copy): healed everywhere.
	if err := a.Put(ctx, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	if _, err := acB.Get(ctx, key); err != nil {
		t.Fatalf("after re-upload: %v", err)
	}
}

// TestBucketDown: with the server gone, writes fail UNAVAILABLE naming the endpoint and
// leave nothing behind in either tier; after a restart the same writes succeed.
func TestBucketDown(t *testing.T) {
	srv := harness.StartS3(t, "kiln")
	srv.Setenv(t)
	ctx := context.Background()
	n := newNode(t, srv, nodeOpts{prefix: freshPrefix()})
	small, ds := cachetest.RandomBlob(t, 4096)
	big, db := cachetest.RandomBlob(t, 11<<20)
	srv.Kill()
	for _, c := range []struct {
		d    cache.Digest
		data []byte
	}{{ds, small}, {db, big}} {
		err := n.Put(ctx, c.d, bytes.NewReader(c.data))
		cachetest.WantCode(t, err, codes.Unavailable)
		if !strings.Contains(status.Convert(err).Message(), srv.Endpoint) {
			t.Fatalf("error does not name the endpoint %s: %v", srv.Endpoint, err)
		}
		if n.local.Has(c.d) {
			t.Fatal("a blob the bucket never got is in the local tier")
		}
		_, err = n.FindMissing(ctx, []cache.Digest{c.d})
		cachetest.WantCode(t, err, codes.Unavailable)
	}
	srv.Start(t)
	if m, err := n.FindMissing(ctx, []cache.Digest{ds, db}); err != nil || len(m) != 2 {
		t.Fatalf("after restart: missing=%v err=%v (nothing may have reached the bucket)", m, err)
	}
	for _, c := range []struct {
		d    cache.Digest
		data []byte
	}{{ds, small}, {db, big}} {
		if err := n.Put(ctx, c.d, bytes.NewReader(c.data)); err != nil {
			t.Fatal(err)
		}
		if got, err := cache.ReadAll(ctx, n, c.d, 0); err != nil || !bytes.Equal(got, c.data) {
			t.Fatal(err)
		}
	}
}

// TestConcurrentClients: 8 writers on two nodes upload the same blob and blobs of
// their own at once; every blob ends up readable by both nodes.
func TestConcurrentClients(t *testing.T) {
	srv := harness.StartS3(t, "kiln")
	srv.Setenv(t)
	ctx := context.Background()
	p := freshPrefix()
	nodes := []node{newNode(t, srv, nodeOpts{prefix: p}), newNode(t, srv, nodeOpts{prefix: p})}
	shared, sd := cachetest.RandomBlob(t, 7<<20)
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	own := make([][]byte, 8)
	for i := 0; i < 8; i++ {
		own[i], _ = cachetest.RandomBlob(t, 64<<10+i)
		wg.Add(1)
		go func() {
			defer wg.Done()
			n := nodes[i%2]
			errs <- n.Put(ctx, sd, bytes.NewReader(shared))
			_, err := cache.PutBytes(ctx, n, own[i])
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range nodes {
		for _, b := range append(own, shared) {
			if got, err := cache.ReadAll(ctx, n, cache.DigestOf(b), 0); err != nil || !bytes.Equal(got, b) {
				t.Fatalf("read back: %v", err)
			}
		}
	}
}
