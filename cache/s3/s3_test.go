package s3_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/cachetest"
	s3 "github.com/kilnbuild/kiln/cache/s3"
	"github.com/kilnbuild/kiln/test/harness"
)

func openBucket(t *testing.T, srv *harness.S3, bucket, prefix string) *s3.Bucket {
	t.Helper()
	cfg, err := s3.ParseURL(srv.URL(bucket, prefix))
	if err != nil {
		t.Fatal(err)
	}
	cfg.PartSize = 5 << 20
	b, err := s3.Open(context.Background(), cfg, s3.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestConformance(t *testing.T) {
	srv := harness.StartS3(t, "kiln")
	srv.Setenv(t)
	n := 0
	prefix := func() string { n++; return "t" + string(rune('a'+n%26)) + string(rune('a'+n/26)) }
	cachetest.BlobStore(t, func(t *testing.T) cache.BlobStore { return openBucket(t, srv, "kiln", prefix()).CAS() })
	cachetest.ActionCache(t, func(t *testing.T) cache.ActionCache { return openBucket(t, srv, "kiln", prefix()).ActionCache() })
}

// TestServerChecksPayload: a PUT whose bytes are not the digest's is refused by the
// server itself (kiln signs the digest as the SigV4 payload hash), and
// nothing appears in the bucket.
func TestServerChecksPayload(t *testing.T) {
	srv := harness.StartS3(t, "kiln")
	srv.Setenv(t)
	cas := openBucket(t, srv, "kiln", "p").CAS()
	ctx := context.Background()
	_, d := cachetest.RandomBlob(t, 1000)
	other, _ := cachetest.RandomBlob(t, 1000)
	if err := cas.PutFile(ctx, d, bytes.NewReader(other)); err == nil {
		t.Fatal("the server accepted bytes that do not match the signed digest")
	}
	if m, err := cas.FindMissing(ctx, []cache.Digest{d}); err != nil || len(m) != 1 {
		t.Fatalf("after a refused PUT: missing=%v err=%v", m, err)
	}
}

// TestMultipartAndRefresh uploads a blob in parts, then, with a clock moved past
// RefreshAfter, finds it: the object's timestamp is rewritten (its age reset) and its
// content is unchanged.
func TestMultipartAndRefresh(t *testing.T) {
	srv := harness.StartS3(t, "kiln")
	srv.Setenv(t)
	ctx := context.Background()
	now := time.Now()
	clock := func() time.Time { return now }
	cfg, _ := s3.ParseURL(srv.URL("kiln", "m", "exists-ttl=1h", "refresh-after=24h"))
	cfg.PartSize = 5 << 20
	b, err := s3.Open(ctx, cfg, s3.Options{Now: func() time.Time { return clock() }})
	if err != nil {
		t.Fatal(err)
	}
	cas := b.CAS()
	data, d := cachetest.RandomBlob(t, 12<<20+3)
	if err := cas.Put(ctx, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(srv.Dir, "kiln", "m", "cas", d.Hash[:2], d.Hash)
	old := time.Now().Add(-48 * time.Hour)
	if err := os.Chtimes(file, old, old); err != nil {
		t.Fatal(err)
	}
	// Fresh in the cache: no request, no refresh.
	if m, err := cas.FindMissing(ctx, []cache.Digest{d}); err != nil || len(m) != 0 {
		t.Fatalf("missing=%v err=%v", m, err)
	}
	if fi, _ := os.Stat(file); !fi.ModTime().Equal(old) {
		t.Fatal("a fresh cache entry caused a request")
	}
	// Two hours on, the cache entry has expired: a HEAD sees a 48-hour-old object and
	// refreshes it.
	now = now.Add(2 * time.Hour)
	if m, err := cas.FindMissing(ctx, []cache.Digest{d}); err != nil || len(m) != 0 {
		t.Fatalf("missing=%v err=%v", m, err)
	}
	fi, err := os.Stat(file)
	if err != nil || time.Since(fi.ModTime()) > time.Minute {
		t.Fatalf("object not refreshed: mtime %v, err %v", fi.ModTime(), err)
	}
	got, err := cache.ReadAll(ctx, cas, d, 0)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("after refresh: %v", err)
	}
}
