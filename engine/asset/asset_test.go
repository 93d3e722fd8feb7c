package asset

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	remoteasset "github.com/bazelbuild/remote-apis/build/bazel/remote/asset/v1"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/disk"
	"github.com/kilnbuild/kiln/internal/grpctest"
	"github.com/kilnbuild/kiln/internal/logtest"
	"github.com/kilnbuild/kiln/lockfiles"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// origin is an HTTP server on 127.0.0.1 serving fixed files and counting requests.
type origin struct {
	*httptest.Server
	mu    sync.Mutex
	files map[string][]byte
	hits  atomic.Int64
}

func newOrigin(t *testing.T, files map[string][]byte) *origin {
	o := &origin{files: files}
	o.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		o.hits.Add(1)
		o.mu.Lock()
		b, ok := o.files[r.URL.Path]
		o.mu.Unlock()
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Write(b)
	}))
	t.Cleanup(o.Close)
	return o
}

func (o *origin) set(path string, b []byte) {
	o.mu.Lock()
	o.files[path] = b
	o.mu.Unlock()
}

func (o *origin) host() string { return strings.TrimPrefix(o.URL, "http://") }

// serve starts srv on a loopback listener and returns a real gRPC client for it.
func serve(t *testing.T, srv *Server) remoteasset.FetchClient {
	t.Helper()
	return remoteasset.NewFetchClient(grpctest.Serve(t, func(g *grpc.Server) { srv.Register(g) }))
}

type fixture struct {
	origin *origin
	cas    cache.BlobStore
	logs   *logtest.Buffer
	client remoteasset.FetchClient
}

func newFixture(t *testing.T, cas cache.BlobStore, allow []string, files map[string][]byte, opts ...Option) *fixture {
	t.Helper()
	fx := &fixture{origin: newOrigin(t, files), cas: cas, logs: &logtest.Buffer{}}
	if allow == nil {
		allow = []string{fx.origin.host()}
	}
	log := slog.New(slog.NewTextHandler(fx.logs, nil))
	f, err := lockfiles.NewFetcher(lockfiles.FetcherOptions{Allow: allow, Logger: log, TempDir: t.TempDir(), Retries: -1})
	if err != nil {
		t.Fatal(err)
	}
	fx.client = serve(t, NewServer(cas, f, append([]Option{WithLogger(log)}, opts...)...))
	return fx
}

func sri256(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256-" + base64.StdEncoding.EncodeToString(s[:])
}

func sri384(b []byte) string {
	s := sha512.Sum384(b)
	return "sha384-" + base64.StdEncoding.EncodeToString(s[:])
}

func blobReq(uris []string, quals ...string) *remoteasset.FetchBlobRequest {
	req := &remoteasset.FetchBlobRequest{Uris: uris}
	for i := 0; i+1 < len(quals); i += 2 {
		req.Qualifiers = append(req.Qualifiers, &remoteasset.Qualifier{Name: quals[i], Value: quals[i+1]})
	}
	return req
}

var archive = bytes.Repeat([]byte("an archive "), 5000)

func TestFetchBlobSuccessAndPresent(t *testing.T) {
	ctx := context.Background()
	cas := cache.NewMemoryStore()
	fx := newFixture(t, cas, nil, map[string][]byte{"/a.tar.gz": archive})
	url := fx.origin.URL + "/a.tar.gz"
	resp, err := fx.client.FetchBlob(ctx, blobReq([]string{url}, QualifierChecksumSRI, sri256(archive), QualifierCanonicalID, "some-id"))
	if err != nil {
		t.Fatal(err)
	}
	want := cache.DigestOf(archive)
	if resp.GetBlobDigest().GetHash() != want.Hash || resp.GetBlobDigest().GetSizeBytes() != want.Size || resp.GetUri() != url {
		t.Fatalf("response %v", resp)
	}
	if q := resp.GetQualifiers(); len(q) != 1 || q[0].GetValue() != sri256(archive) {
		t.Errorf("qualifiers %v", q)
	}
	if got, err := cache.ReadAll(ctx, cas, want, 0); err != nil || !bytes.Equal(got, archive) {
		t.Fatalf("blob not in the CAS: %v", err)
	}
	// Again: served from the CAS, the origin is not contacted.
	if _, err := fx.client.FetchBlob(ctx, blobReq([]string{url}, QualifierChecksumSRI, sri256(archive))); err != nil {
		t.Fatal(err)
	}
	if n := fx.origin.hits.Load(); n != 1 {
		t.Errorf("origin saw %d requests, want 1 (the second fetch must be served from the CAS)", n)
	}
}

func TestFetchBlobPresentAcrossRestart(t *testing.T) {
	ctx := context.Background()
	store, err := disk.Open(ctx, t.TempDir(), disk.Options{})
	if err != nil {
		t.Fatal(err)
	}
	d, err := cache.PutBytes(ctx, store, archive)
	if err != nil {
		t.Fatal(err)
	}
	// A new server knows no sizes; the disk store tells it by the blob's file.
	fx := newFixture(t, store, nil, map[string][]byte{"/a.tar.gz": archive}, WithSizeLookup(SizeFromBlobFiles(store)))
	resp, err := fx.client.FetchBlob(ctx, blobReq([]string{fx.origin.URL + "/a.tar.gz"}, QualifierChecksumSRI, sri256(archive)))
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetBlobDigest().GetSizeBytes() != d.Size || fx.origin.hits.Load() != 0 {
		t.Errorf("digest %v, origin hits %d; want the stored blob and no download", resp.GetBlobDigest(), fx.origin.hits.Load())
	}
	// A memory store cannot say; a lockfile that pins the size can.
	mem := cache.NewMemoryStore()
	cache.PutBytes(ctx, mem, archive)
	o := newOrigin(t, map[string][]byte{"/a.tar.gz": archive})
	lf := lockfiles.New()
	if err := lf.SetDependency("a", lockfiles.Dependency{URLs: []string{o.URL + "/a.tar.gz"}, SHA256: d.Hash, Size: d.Size}); err != nil {
		t.Fatal(err)
	}
	f, _ := lockfiles.NewFetcher(lockfiles.FetcherOptions{Allow: []string{o.host()}, TempDir: t.TempDir()})
	client := serve(t, NewServer(mem, f, WithLockfile(lf)))
	if _, err := client.FetchBlob(ctx, blobReq([]string{o.URL + "/a.tar.gz"}, QualifierChecksumSRI, sri256(archive))); err != nil {
		t.Fatal(err)
	}
	if o.hits.Load() != 0 {
		t.Errorf("origin contacted although the lockfile pins size and the CAS holds the blob")
	}
}

func TestFetchBlobWrongChecksum(t *testing.T) {
	ctx := context.Background()
	cas := cache.NewMemoryStore()
	fx := newFixture(t, cas, nil, map[string][]byte{"/a.tar.gz": archive})
	url := fx.origin.URL + "/a.tar.gz"
	wrong := []byte("what the BUILD file expects")
	_, err := fx.client.FetchBlob(ctx, blobReq([]string{url}, QualifierChecksumSRI, sri256(wrong)))
	if status.Code(err) != codes.Aborted {
		t.Fatalf("got %v, want ABORTED", err)
	}
	wantHex, gotHex := cache.DigestOf(wrong).Hash, cache.DigestOf(archive).Hash
	for _, s := range []string{status.Convert(err).Message(), fx.logs.String()} {
		for _, w := range []string{url, wantHex, gotHex} {
			if !strings.Contains(s, w) {
				t.Errorf("%q does not name %s", s, w)
			}
		}
	}
	missing, _ := cas.FindMissing(ctx, []cache.Digest{cache.DigestOf(archive)})
	if len(missing) != 1 {
		t.Error("mismatching content was cached")
	}
	// The origin is asked again next time: a mismatch is never remembered as content.
	fx.client.FetchBlob(ctx, blobReq([]string{url}, QualifierChecksumSRI, sri256(wrong)))
	if fx.origin.hits.Load() != 2 {
		t.Errorf("origin hits %d, want 2", fx.origin.hits.Load())
	}
}

func TestFetchBlobChangedContentCaught(t *testing.T) {
	ctx := context.Background()
	fx := newFixture(t, cache.NewMemoryStore(), nil, map[string][]byte{"/r.tgz": []byte("v1")})
	url := fx.origin.URL + "/r.tgz"
	if _, err := fx.client.FetchBlob(ctx, blobReq([]string{url}, QualifierChecksumSRI, sri256([]byte("v1")))); err != nil {
		t.Fatal(err)
	}
	fx.origin.set("/r.tgz", []byte("v2 (tampered)"))
	// Another checksum of the same URL; the origin now serves other bytes than pinned.
	_, err := fx.client.FetchBlob(ctx, blobReq([]string{url}, QualifierChecksumSRI, sri384([]byte("v1"))))
	if status.Code(err) != codes.Aborted {
		t.Fatalf("got %v, want ABORTED for content that changed", err)
	}
}

func TestFetchBlobHostNotAllowed(t *testing.T) {
	fx := newFixture(t, cache.NewMemoryStore(), []string{"mirror.example"}, map[string][]byte{"/a": archive})
	url := fx.origin.URL + "/a"
	_, err := fx.client.FetchBlob(context.Background(), blobReq([]string{url}, QualifierChecksumSRI, sri256(archive)))
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), url) {
		t.Fatalf("got %v, want PERMISSION_DENIED naming %s", err, url)
	}
	if fx.origin.hits.Load() != 0 {
		t.Error("a host off the allowlist was contacted")
	}
}

func TestFetchBlobLockfilePolicy(t *testing.T) {
	ctx := context.Background()
	cas := cache.NewMemoryStore()
	lf := lockfiles.New()
	fx := &fixture{}
	fx.origin = newOrigin(t, map[string][]byte{"/pinned.tgz": archive, "/other.tgz": []byte("other")})
	pinned, other := fx.origin.URL+"/pinned.tgz", fx.origin.URL+"/other.tgz"
	d := cache.DigestOf(archive)
	if err := lf.SetDependency("pinned", lockfiles.Dependency{URLs: []string{pinned}, SHA256: d.Hash, Size: d.Size}); err != nil {
		t.Fatal(err)
	}
	f, _ := lockfiles.NewFetcher(lockfiles.FetcherOptions{Allow: []string{fx.origin.host()}, TempDir: t.TempDir()})
	client := serve(t, NewServer(cas, f, WithLockfile(lf)))

	_, err := client.FetchBlob(ctx, blobReq([]string{other}, QualifierChecksumSRI, sri256([]byte("other"))))
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), other) || !strings.Contains(err.Error(), "not pinned") {
		t.Fatalf("unpinned URL: got %v, want PERMISSION_DENIED naming it", err)
	}
	_, err = client.FetchBlob(ctx, blobReq([]string{pinned}, QualifierChecksumSRI, sri256([]byte("other"))))
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "other content") {
		t.Fatalf("pinned URL, other digest: got %v, want PERMISSION_DENIED", err)
	}
	if fx.origin.hits.Load() != 0 {
		t.Fatal("refused requests contacted the origin")
	}
	// The pin supplies the checksum when the request has none.
	resp, err := client.FetchBlob(ctx, blobReq([]string{other, pinned}))
	if err != nil || resp.GetUri() != pinned || resp.GetBlobDigest().GetHash() != d.Hash {
		t.Fatalf("pinned URL without a qualifier: %v, %v", resp, err)
	}
}

func TestFetchBlobBadRequests(t *testing.T) {
	ctx := context.Background()
	fx := newFixture(t, cache.NewMemoryStore(), nil, map[string][]byte{"/a": archive})
	url := fx.origin.URL + "/a"
	for _, tc := range []struct {
		name string
		req  *remoteasset.FetchBlobRequest
		want codes.Code
		msg  string
	}{
		{"no uri", blobReq(nil, QualifierChecksumSRI, sri256(archive)), codes.InvalidArgument, "no URI"},
		{"no checksum", blobReq([]string{url}), codes.InvalidArgument, "only content verified by digest"},
		{"unknown qualifier", blobReq([]string{url}, QualifierChecksumSRI, sri256(archive), "resource_type", "application/x-git"), codes.InvalidArgument, "not supported: resource_type"},
		{"md5 only", blobReq([]string{url}, QualifierChecksumSRI, "md5-AAAA"), codes.InvalidArgument, "unsupported algorithm"},
		{"ftp", blobReq([]string{"ftp://" + fx.origin.host() + "/a"}, QualifierChecksumSRI, sri256(archive)), codes.InvalidArgument, "only http and https"},
		{"not found", blobReq([]string{fx.origin.URL + "/missing"}, QualifierChecksumSRI, sri256(archive)), codes.NotFound, "404"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := fx.client.FetchBlob(ctx, tc.req)
			if status.Code(err) != tc.want || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("got %v, want %v containing %q", err, tc.want, tc.msg)
			}
		})
	}
	_, err := fx.client.FetchBlob(ctx, blobReq([]string{url}, "resource_type", "x"))
	var found bool
	for _, d := range status.Convert(err).Details() {
		if br, ok := d.(*errdetails.BadRequest); ok && len(br.FieldViolations) == 1 && br.FieldViolations[0].Field == "qualifiers.name" {
			found = true
		}
	}
	if !found {
		t.Errorf("no BadRequest detail for an unsupported qualifier: %v", err)
	}
	// sha384 alone is verified by downloading.
	resp, err := fx.client.FetchBlob(ctx, blobReq([]string{url}, QualifierChecksumSRI, "sha1-AAAA "+sri384(archive)))
	if err != nil || resp.GetBlobDigest().GetHash() != cache.DigestOf(archive).Hash {
		t.Errorf("sha384: %v, %v", resp, err)
	}
}

func TestDirectoryAndPushRefused(t *testing.T) {
	srv := NewServer(cache.NewMemoryStore(), nil)
	lis, _ := net.Listen("tcp", "127.0.0.1:0")
	g := grpc.NewServer()
	srv.Register(g)
	go g.Serve(lis)
	defer g.Stop()
	conn, _ := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	defer conn.Close()
	ctx := context.Background()
	_, err := remoteasset.NewFetchClient(conn).FetchDirectory(ctx, &remoteasset.FetchDirectoryRequest{Uris: []string{"https://h.example/x.git"}})
	if status.Code(err) != codes.Unimplemented {
		t.Errorf("FetchDirectory: %v", err)
	}
	_, err = remoteasset.NewPushClient(conn).PushBlob(ctx, &remoteasset.PushBlobRequest{Uris: []string{"https://h.example/x"}})
	if status.Code(err) != codes.PermissionDenied {
		t.Errorf("PushBlob: %v", err)
	}
	// A server without a fetcher refuses every download.
	_, err = remoteasset.NewFetchClient(conn).FetchBlob(ctx, blobReq([]string{"http://127.0.0.1:1/x"}, QualifierChecksumSRI, sri256(archive)))
	if status.Code(err) != codes.PermissionDenied {
		t.Errorf("nil fetcher: %v", err)
	}

}
