package reapi

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/cachetest"
	"github.com/kilnbuild/kiln/cache/disk"
	"github.com/klauspost/compress/zstd"
	"google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

type env struct {
	cas   repb.ContentAddressableStorageClient
	ac    repb.ActionCacheClient
	bs    bytestream.ByteStreamClient
	caps  repb.CapabilitiesClient
	store *disk.Store
	srv   *Server
}

func newEnv(t *testing.T, opts Options, gopts ...grpc.ServerOption) *env {
	t.Helper()
	store, err := disk.Open(context.Background(), t.TempDir(), disk.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return newEnvOn(t, store, cache.WithEmptyBlob(store), opts, gopts...)
}

// openBounded opens a primary store in dir bounded to maxSize bytes.
func openBounded(t *testing.T, dir string, maxSize int64) *disk.Store {
	t.Helper()
	store, err := disk.Open(context.Background(), dir, disk.Options{Primary: true, MaxSize: maxSize})
	if err != nil {
		t.Fatal(err)
	}
	return store
}

// newEnvOn serves cas (over store) to a client, with gopts after the test's client
// naming (as).
func newEnvOn(t *testing.T, store *disk.Store, cas cache.BlobStore, opts Options, gopts ...grpc.ServerOption) *env {
	t.Helper()
	srv := New(cas, cache.WithCompletenessCheck(store.ActionCache(), cas), opts)
	g := grpc.NewServer(append([]grpc.ServerOption{grpc.MaxRecvMsgSize(MaxMessageSize),
		grpc.ChainUnaryInterceptor(testClientUnary), grpc.ChainStreamInterceptor(testClientStream)}, gopts...)...)
	srv.Register(g)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(lis)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20), grpc.MaxCallSendMsgSize(16<<20)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(); g.Stop(); srv.Close(); store.Close() })
	return &env{
		cas: repb.NewContentAddressableStorageClient(conn), ac: repb.NewActionCacheClient(conn),
		bs: bytestream.NewByteStreamClient(conn), caps: repb.NewCapabilitiesClient(conn),
		store: store, srv: srv,
	}
}

func blob(t *testing.T, n int) ([]byte, cache.Digest) { return cachetest.RandomBlob(t, n) }

func (e *env) put(t *testing.T, data []byte) cache.Digest {
	t.Helper()
	d := cache.DigestOf(data)
	if err := e.store.Put(context.Background(), d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	return d
}

func want(t *testing.T, err error, c codes.Code, what string) {
	t.Helper()
	if got := status.Code(err); got != c {
		t.Fatalf("%s: got %v (%v), want %v", what, got, err, c)
	}
}

func TestCapabilities(t *testing.T) {
	ctx := context.Background()
	for _, allow := range []bool{false, true} {
		e := newEnv(t, Options{AllowClientACWrites: allow})
		c, err := e.caps.GetCapabilities(ctx, &repb.GetCapabilitiesRequest{InstanceName: "main"})
		if err != nil {
			t.Fatal(err)
		}
		cc := c.GetCacheCapabilities()
		if len(cc.GetDigestFunctions()) != 1 || cc.GetDigestFunctions()[0] != repb.DigestFunction_SHA256 {
			t.Fatalf("digest functions %v", cc.GetDigestFunctions())
		}
		if cc.GetActionCacheUpdateCapabilities().GetUpdateEnabled() != allow {
			t.Fatalf("update enabled = %v, want %v", !allow, allow)
		}
		if cc.GetMaxBatchTotalSizeBytes() != MaxBatchSize || !containsZstd(cc.GetSupportedCompressors()) {
			t.Fatalf("cache caps %v", cc)
		}
		if c.GetLowApiVersion().GetMajor() != 2 || c.GetLowApiVersion().GetMinor() != 0 {
			t.Fatalf("low API version %v: Bazel 4.2.3 (REAPI 2.0) refuses servers whose lowest version is above 2.0", c.GetLowApiVersion())
		}
	}
	e := newEnv(t, Options{})
	_, err := e.caps.GetCapabilities(ctx, &repb.GetCapabilitiesRequest{InstanceName: "a/../b"})
	want(t, err, codes.InvalidArgument, "traversing instance name")
}

func containsZstd(cs []repb.Compressor_Value) bool {
	for _, c := range cs {
		if c == repb.Compressor_ZSTD {
			return true
		}
	}
	return false
}

func TestFindMissingBlobs(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Options{})
	data, _ := blob(t, 100)
	present := e.put(t, data)
	_, absent := blob(t, 100)
	resp, err := e.cas.FindMissingBlobs(ctx, &repb.FindMissingBlobsRequest{BlobDigests: []*repb.Digest{present.Proto(), absent.Proto(), cache.EmptyDigest.Proto()}})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetMissingBlobDigests()) != 1 || resp.GetMissingBlobDigests()[0].GetHash() != absent.Hash {
		t.Fatalf("missing = %v, want only %v (and the empty blob always present)", resp.GetMissingBlobDigests(), absent)
	}
	bad := []struct {
		name string
		req  *repb.FindMissingBlobsRequest
	}{
		{"short hash", &repb.FindMissingBlobsRequest{BlobDigests: []*repb.Digest{{Hash: "abc", SizeBytes: 1}}}},
		{"uppercase hash", &repb.FindMissingBlobsRequest{BlobDigests: []*repb.Digest{{Hash: strings.ToUpper(absent.Hash), SizeBytes: 1}}}},
		{"negative size", &repb.FindMissingBlobsRequest{BlobDigests: []*repb.Digest{{Hash: absent.Hash, SizeBytes: -1}}}},
		{"nil digest", &repb.FindMissingBlobsRequest{BlobDigests: []*repb.Digest{nil}}},
		{"sha1 digest function", &repb.FindMissingBlobsRequest{DigestFunction: repb.DigestFunction_SHA1, BlobDigests: []*repb.Digest{absent.Proto()}}},
		{"blake3 digest function", &repb.FindMissingBlobsRequest{DigestFunction: repb.DigestFunction_BLAKE3}},
		{"traversing instance", &repb.FindMissingBlobsRequest{InstanceName: "../x"}},
		{"absolute instance", &repb.FindMissingBlobsRequest{InstanceName: "/x"}},
		{"reserved instance segment", &repb.FindMissingBlobsRequest{InstanceName: "a/blobs/b"}},
	}
	for _, c := range bad {
		_, err := e.cas.FindMissingBlobs(ctx, c.req)
		want(t, err, codes.InvalidArgument, c.name)
	}
}

func TestBatchUpdateAndRead(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Options{})
	good, gd := blob(t, 1000)
	other, _ := blob(t, 1000)
	enc, _ := zstd.NewWriter(nil)
	zgood, zd := blob(t, 5000)
	resp, err := e.cas.BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{Requests: []*repb.BatchUpdateBlobsRequest_Request{
		{Digest: gd.Proto(), Data: good},
		{Digest: gd.Proto(), Data: other},                                                       // wrong hash
		{Digest: &repb.Digest{Hash: gd.Hash, SizeBytes: 999}, Data: good},                       // wrong size
		{Digest: &repb.Digest{Hash: "zz", SizeBytes: 1}, Data: []byte("x")},                     // malformed
		{Digest: zd.Proto(), Data: enc.EncodeAll(zgood, nil), Compressor: repb.Compressor_ZSTD}, // compressed
		{Digest: zd.Proto(), Data: []byte("not zstd"), Compressor: repb.Compressor_ZSTD},        // corrupt zstd
		{Digest: zd.Proto(), Data: zgood, Compressor: repb.Compressor_DEFLATE},                  // unsupported
	}})
	if err != nil {
		t.Fatal(err)
	}
	wantCodes := []codes.Code{codes.OK, codes.InvalidArgument, codes.InvalidArgument, codes.InvalidArgument, codes.OK, codes.InvalidArgument, codes.InvalidArgument}
	for i, r := range resp.GetResponses() {
		if codes.Code(r.GetStatus().GetCode()) != wantCodes[i] {
			t.Errorf("request %d: code %v (%s), want %v", i, codes.Code(r.GetStatus().GetCode()), r.GetStatus().GetMessage(), wantCodes[i])
		}
	}
	// Over the advertised batch limit: refused as a whole.
	big := make([]*repb.BatchUpdateBlobsRequest_Request, 0)
	for i := 0; i < 5; i++ {
		b, d := blob(t, 1<<20)
		big = append(big, &repb.BatchUpdateBlobsRequest_Request{Digest: d.Proto(), Data: b})
	}
	_, err = e.cas.BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{Requests: big})
	want(t, err, codes.InvalidArgument, "batch over limit")

	_, absent := blob(t, 10)
	rr, err := e.cas.BatchReadBlobs(ctx, &repb.BatchReadBlobsRequest{Digests: []*repb.Digest{gd.Proto(), absent.Proto(), zd.Proto(), cache.EmptyDigest.Proto(), {Hash: "x"}}})
	if err != nil {
		t.Fatal(err)
	}
	got := rr.GetResponses()
	if !bytes.Equal(got[0].GetData(), good) || got[0].GetStatus().GetCode() != 0 {
		t.Fatal("read back good blob")
	}
	if codes.Code(got[1].GetStatus().GetCode()) != codes.NotFound {
		t.Fatalf("absent blob: %v", got[1].GetStatus())
	}
	if !bytes.Equal(got[2].GetData(), zgood) {
		t.Fatal("compressed upload not stored uncompressed")
	}
	if got[3].GetStatus().GetCode() != 0 || len(got[3].GetData()) != 0 {
		t.Fatal("empty blob not present")
	}
	if codes.Code(got[4].GetStatus().GetCode()) != codes.InvalidArgument {
		t.Fatal("malformed digest in batch read")
	}
	var bigDigests []*repb.Digest
	for _, r := range big {
		bigDigests = append(bigDigests, r.Digest)
	}
	_, err = e.cas.BatchReadBlobs(ctx, &repb.BatchReadBlobsRequest{Digests: bigDigests})
	want(t, err, codes.InvalidArgument, "batch read over limit")
	// A negative size must not offset the others (it once let 200 MB through a 4 MiB limit).
	trick := append(append([]*repb.Digest{}, bigDigests...), &repb.Digest{Hash: gd.Hash, SizeBytes: -int64(len(bigDigests)) << 20})
	_, err = e.cas.BatchReadBlobs(ctx, &repb.BatchReadBlobsRequest{Digests: trick})
	want(t, err, codes.InvalidArgument, "batch read with a negative size")
	var trickUp []*repb.BatchUpdateBlobsRequest_Request
	for _, d := range trick {
		trickUp = append(trickUp, &repb.BatchUpdateBlobsRequest_Request{Digest: d})
	}
	_, err = e.cas.BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{Requests: trickUp})
	want(t, err, codes.InvalidArgument, "batch update with a negative size")
	_, err = e.cas.BatchReadBlobs(ctx, &repb.BatchReadBlobsRequest{DigestFunction: repb.DigestFunction_MD5})
	want(t, err, codes.InvalidArgument, "md5")
}

func TestGetTreePaging(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Options{})
	// A root with 25 subdirectories, each holding one (shared) grandchild.
	leaf := &repb.Directory{Files: []*repb.FileNode{{Name: "f", Digest: cache.EmptyDigest.Proto()}}}
	leafD := e.putProto(t, leaf)
	root := &repb.Directory{}
	for i := 0; i < 25; i++ {
		sub := &repb.Directory{Directories: []*repb.DirectoryNode{{Name: "leaf", Digest: leafD.Proto()}},
			Files: []*repb.FileNode{{Name: fmt.Sprintf("n%d", i), Digest: cache.EmptyDigest.Proto()}}}
		root.Directories = append(root.Directories, &repb.DirectoryNode{Name: fmt.Sprintf("d%02d", i), Digest: e.putProto(t, sub).Proto()})
	}
	rootD := e.putProto(t, root)
	reads := &cachetest.CountingStore{BlobStore: e.srv.cas}
	e.srv.cas = reads
	page := func(token string) (dirs []*repb.Directory, next string) {
		st, err := e.cas.GetTree(ctx, &repb.GetTreeRequest{RootDigest: rootD.Proto(), PageSize: 10, PageToken: token})
		if err != nil {
			t.Fatal(err)
		}
		for {
			r, err := st.Recv()
			if err == io.EOF {
				return dirs, next
			}
			if err != nil {
				t.Fatal(err)
			}
			dirs = append(dirs, r.GetDirectories()...)
			if r.GetNextPageToken() != "" {
				next = r.GetNextPageToken()
			}
		}
	}
	var all []*repb.Directory
	var tokens []string
	for token := ""; ; {
		dirs, next := page(token)
		all = append(all, dirs...)
		if next == "" {
			break
		}
		tokens = append(tokens, next)
		token = next
	}
	if len(all) != 27 || len(tokens) != 2 {
		t.Fatalf("got %d directories in %d pages, want 27 (root, 25 children, 1 shared leaf) in 3", len(all), len(tokens)+1)
	}
	if !proto.Equal(all[0], root) {
		t.Fatal("first directory is not the root")
	}
	// Each page goes on from where the last stopped: every directory is read once.
	if n := reads.N.Load(); n != 27 {
		t.Fatalf("paging through 27 directories read %d blobs, want 27", n)
	}
	// A token whose walk is gone (asked again, or after a restart) still gives its page.
	again, next := page(tokens[0])
	if len(again) != 10 || !proto.Equal(again[0], all[10]) || next == "" {
		t.Fatalf("second page asked again: %d directories, next %q; want directories 10-19 again", len(again), next)
	}
	_, absent := blob(t, 10)
	st, _ := e.cas.GetTree(ctx, &repb.GetTreeRequest{RootDigest: absent.Proto()})
	_, err := st.Recv()
	want(t, err, codes.NotFound, "missing root")
	st, _ = e.cas.GetTree(ctx, &repb.GetTreeRequest{RootDigest: rootD.Proto(), PageToken: "!!"})
	_, err = st.Recv()
	want(t, err, codes.InvalidArgument, "bad page token")
}

func (e *env) putProto(t *testing.T, m proto.Message) cache.Digest {
	b, _, err := cache.DigestOfProto(m)
	if err != nil {
		t.Fatal(err)
	}
	return e.put(t, b)
}

func readAll(ctx context.Context, bs bytestream.ByteStreamClient, req *bytestream.ReadRequest) ([]byte, error) {
	st, err := bs.Read(ctx, req)
	if err != nil {
		return nil, err
	}
	var out []byte
	for {
		r, err := st.Recv()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		out = append(out, r.GetData()...)
	}
}

func TestByteStreamRead(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Options{})
	data, _ := blob(t, 3<<20+17)
	d := e.put(t, data)
	name := "blobs/" + d.String()
	got, err := readAll(ctx, e.bs, &bytestream.ReadRequest{ResourceName: name})
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("plain read: %v", err)
	}
	got, err = readAll(ctx, e.bs, &bytestream.ReadRequest{ResourceName: "my/instance/blobs/" + d.String(), ReadOffset: 1000, ReadLimit: 5000})
	if err != nil || !bytes.Equal(got, data[1000:6000]) {
		t.Fatalf("ranged read: %v, %d bytes", err, len(got))
	}
	got, err = readAll(ctx, e.bs, &bytestream.ReadRequest{ResourceName: "blobs/sha256/" + d.String(), ReadOffset: d.Size})
	if err != nil || len(got) != 0 {
		t.Fatalf("read at end: %v, %d bytes", err, len(got))
	}
	z, err := readAll(ctx, e.bs, &bytestream.ReadRequest{ResourceName: "compressed-blobs/zstd/" + d.String(), ReadOffset: 10})
	if err != nil {
		t.Fatal(err)
	}
	dec, _ := zstd.NewReader(nil)
	plain, err := dec.DecodeAll(z, nil)
	if err != nil || !bytes.Equal(plain, data[10:]) {
		t.Fatalf("compressed read: %v", err)
	}
	_, absent := blob(t, 10)
	bad := []struct {
		name string
		req  *bytestream.ReadRequest
		code codes.Code
	}{
		{"absent", &bytestream.ReadRequest{ResourceName: "blobs/" + absent.String()}, codes.NotFound},
		{"negative offset", &bytestream.ReadRequest{ResourceName: name, ReadOffset: -1}, codes.OutOfRange},
		{"offset past end", &bytestream.ReadRequest{ResourceName: name, ReadOffset: d.Size + 1}, codes.OutOfRange},
		{"negative limit", &bytestream.ReadRequest{ResourceName: name, ReadLimit: -1}, codes.InvalidArgument},
		{"compressed with limit", &bytestream.ReadRequest{ResourceName: "compressed-blobs/zstd/" + d.String(), ReadLimit: 5}, codes.InvalidArgument},
		{"traversal", &bytestream.ReadRequest{ResourceName: "../blobs/" + d.String()}, codes.InvalidArgument},
		{"traversal inside", &bytestream.ReadRequest{ResourceName: "a/../../blobs/" + d.String()}, codes.InvalidArgument},
		{"absolute", &bytestream.ReadRequest{ResourceName: "/blobs/" + d.String()}, codes.InvalidArgument},
		{"extra segment", &bytestream.ReadRequest{ResourceName: name + "/extra"}, codes.InvalidArgument},
		{"no size", &bytestream.ReadRequest{ResourceName: "blobs/" + d.Hash}, codes.InvalidArgument},
		{"bad size", &bytestream.ReadRequest{ResourceName: "blobs/" + d.Hash + "/x"}, codes.InvalidArgument},
		{"bad hash", &bytestream.ReadRequest{ResourceName: "blobs/xyz/10"}, codes.InvalidArgument},
		{"other digest function", &bytestream.ReadRequest{ResourceName: "blobs/blake3/" + d.String()}, codes.InvalidArgument},
		{"unknown compressor", &bytestream.ReadRequest{ResourceName: "compressed-blobs/brotli/" + d.String()}, codes.InvalidArgument},
		{"identity compressor", &bytestream.ReadRequest{ResourceName: "compressed-blobs/identity/" + d.String()}, codes.InvalidArgument},
		{"empty", &bytestream.ReadRequest{ResourceName: ""}, codes.InvalidArgument},
		{"uploads form", &bytestream.ReadRequest{ResourceName: "uploads/u/blobs/" + d.String()}, codes.InvalidArgument},
	}
	for _, c := range bad {
		_, err := readAll(ctx, e.bs, c.req)
		want(t, err, c.code, c.name)
	}
}

// TestByteStreamReadCorrupt: a blob damaged on disk ends the read with DATA_LOSS and is gone.
func TestByteStreamReadCorrupt(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Options{})
	data, _ := blob(t, 2<<20)
	d := e.put(t, data)
	p := e.store.BlobPath(d)
	b, _ := readFile(p)
	b[len(b)/2] ^= 1
	writeFile(t, p, b)
	_, err := readAll(ctx, e.bs, &bytestream.ReadRequest{ResourceName: "blobs/" + d.String()})
	want(t, err, codes.DataLoss, "corrupt blob read")
	_, err = readAll(ctx, e.bs, &bytestream.ReadRequest{ResourceName: "blobs/" + d.String()})
	want(t, err, codes.NotFound, "corrupt blob after removal")
}

func write(ctx context.Context, bs bytestream.ByteStreamClient, name string, chunks [][]byte, offset int64, finish bool) (*bytestream.WriteResponse, error) {
	st, err := bs.Write(ctx)
	if err != nil {
		return nil, err
	}
	for i, c := range chunks {
		req := &bytestream.WriteRequest{WriteOffset: offset, Data: c, FinishWrite: finish && i == len(chunks)-1}
		if i == 0 {
			req.ResourceName = name
		}
		if err := st.Send(req); err != nil {
			break // the server ended the stream; CloseAndRecv has its status
		}
		offset += int64(len(c))
	}
	return st.CloseAndRecv()
}

func split(b []byte, n int) [][]byte {
	var out [][]byte
	for len(b) > n {
		out = append(out, b[:n])
		b = b[n:]
	}
	return append(out, b)
}

func TestByteStreamWrite(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Options{})
	data, d := blob(t, 3<<20+5)
	name := "inst/uploads/" + uuid() + "/blobs/" + d.String() + "/meta/data"
	r, err := write(ctx, e.bs, name, split(data, 64<<10), 0, true)
	if err != nil || r.GetCommittedSize() != d.Size {
		t.Fatalf("write: %v, committed %d", err, r.GetCommittedSize())
	}
	if m, _ := e.store.FindMissing(ctx, []cache.Digest{d}); len(m) != 0 {
		t.Fatal("not stored")
	}
	// Writing a present blob ends at once with the full size.
	r, err = write(ctx, e.bs, "uploads/"+uuid()+"/blobs/"+d.String(), [][]byte{data[:10]}, 0, false)
	if err != nil || r.GetCommittedSize() != d.Size {
		t.Fatalf("write of present blob: %v, %d", err, r.GetCommittedSize())
	}
	// Compressed upload.
	zdata, zd := blob(t, 1<<20)
	enc, _ := zstd.NewWriter(nil)
	comp := enc.EncodeAll(zdata, nil)
	r, err = write(ctx, e.bs, "uploads/"+uuid()+"/compressed-blobs/zstd/"+zd.String(), split(comp, 100<<10), 0, true)
	if err != nil || r.GetCommittedSize() != int64(len(comp)) {
		t.Fatalf("compressed write: %v, %d", err, r.GetCommittedSize())
	}
	if got, _ := cache.ReadAll(ctx, e.store, zd, 0); !bytes.Equal(got, zdata) {
		t.Fatal("compressed upload stored wrong bytes")
	}
	// The compressed form of a present blob ends at once with -1.
	r, err = write(ctx, e.bs, "uploads/"+uuid()+"/compressed-blobs/zstd/"+zd.String(), [][]byte{comp[:10]}, 0, false)
	if err != nil || r.GetCommittedSize() != -1 {
		t.Fatalf("compressed write of present blob: %v, %d", err, r.GetCommittedSize())
	}

	other, od := blob(t, 200000)
	wrong, _ := blob(t, 200000)
	up := func() string { return "uploads/" + uuid() + "/blobs/" + od.String() }
	bad := []struct {
		name   string
		res    string
		chunks [][]byte
		off    int64
		finish bool
		code   codes.Code
	}{
		{"wrong hash", up(), split(wrong, 50000), 0, true, codes.InvalidArgument},
		{"ends early with finish", up(), [][]byte{other[:1000]}, 0, true, codes.InvalidArgument},
		{"more bytes than declared", up(), [][]byte{other, []byte("x")}, 0, true, codes.InvalidArgument},
		{"ends without finish_write", up(), [][]byte{other[:1000]}, 0, false, codes.InvalidArgument},
		{"resume unknown upload", up(), [][]byte{other[1000:]}, 1000, true, codes.InvalidArgument},
		{"negative offset", up(), [][]byte{other}, -5, true, codes.InvalidArgument},
		{"read resource form", "blobs/" + od.String(), [][]byte{other}, 0, true, codes.InvalidArgument},
		{"traversal", "../uploads/x/blobs/" + od.String(), [][]byte{other}, 0, true, codes.InvalidArgument},
		{"dotdot uuid", "uploads/../blobs/" + od.String(), [][]byte{other}, 0, true, codes.InvalidArgument},
		{"bad zstd", "uploads/" + uuid() + "/compressed-blobs/zstd/" + od.String(), [][]byte{[]byte("garbage garbage")}, 0, true, codes.InvalidArgument},
		{"zstd of other data", "uploads/" + uuid() + "/compressed-blobs/zstd/" + od.String(), [][]byte{enc.EncodeAll(wrong, nil)}, 0, true, codes.InvalidArgument},
		{"endless zstd frames", "uploads/" + uuid() + "/compressed-blobs/zstd/" + od.String(), split(bytes.Repeat(enc.EncodeAll(nil, nil), 100000), 64<<10), 0, true, codes.InvalidArgument},
		{"unsupported digest fn", "uploads/" + uuid() + "/blobs/md5/" + od.String(), [][]byte{other}, 0, true, codes.InvalidArgument},
	}
	for _, c := range bad {
		_, err := write(ctx, e.bs, c.res, c.chunks, c.off, c.finish)
		want(t, err, c.code, c.name)
		if m, _ := e.store.FindMissing(ctx, []cache.Digest{od}); len(m) != 1 {
			t.Fatalf("%s: a refused write stored the blob", c.name)
		}
	}
	// Endless compressed input is cut off as it arrives, not after it was all taken.
	_, err = write(ctx, e.bs, "uploads/"+uuid()+"/compressed-blobs/zstd/"+od.String(), split(bytes.Repeat(enc.EncodeAll(nil, nil), 100000), 64<<10), 0, true)
	if !strings.Contains(status.Convert(err).Message(), "more compressed bytes") {
		t.Fatalf("endless zstd frames: %v", err)
	}
	// Subsequent request with a wrong offset.
	st, _ := e.bs.Write(ctx)
	st.Send(&bytestream.WriteRequest{ResourceName: up(), Data: other[:100]})
	st.Send(&bytestream.WriteRequest{WriteOffset: 50, Data: other[100:200]})
	_, err = st.CloseAndRecv()
	want(t, err, codes.InvalidArgument, "wrong offset mid-stream")
}

// TestByteStreamResume: an upload whose stream ends without finishing continues on a
// new stream from the committed size reported by QueryWriteStatus.
func TestByteStreamResume(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Options{})
	for _, compressed := range []bool{false, true} {
		data, d := blob(t, 1<<20)
		body := data
		name := "uploads/" + uuid() + "/blobs/" + d.String()
		if compressed {
			enc, _ := zstd.NewWriter(nil)
			body = enc.EncodeAll(data, nil)
			name = "uploads/" + uuid() + "/compressed-blobs/zstd/" + d.String()
		}
		_, err := e.bs.QueryWriteStatus(ctx, &bytestream.QueryWriteStatusRequest{ResourceName: name})
		want(t, err, codes.NotFound, "status before any write")
		cctx, cancel := context.WithCancel(ctx)
		st, _ := e.bs.Write(cctx)
		st.Send(&bytestream.WriteRequest{ResourceName: name, Data: body[:300000]})
		// Wait until the server has committed the first chunk, then break the stream.
		var committed int64
		for committed == 0 {
			q, err := e.bs.QueryWriteStatus(ctx, &bytestream.QueryWriteStatusRequest{ResourceName: name})
			if err == nil {
				committed = q.GetCommittedSize()
			}
		}
		cancel()
		if committed != 300000 {
			t.Fatalf("committed %d, want 300000", committed)
		}
		// Until the server has seen the break, a new stream is refused (ABORTED, which
		// clients retry): resume after it.
		e.srv.bs.waitDetached(t, name)
		r, err := write(ctx, e.bs, name, [][]byte{body[committed:]}, committed, true)
		if err != nil {
			t.Fatalf("resume (compressed=%v): %v", compressed, err)
		}
		if r.GetCommittedSize() != int64(len(body)) {
			t.Fatalf("committed %d, want %d", r.GetCommittedSize(), len(body))
		}
		if got, _ := cache.ReadAll(ctx, e.store, d, 0); !bytes.Equal(got, data) {
			t.Fatal("resumed upload stored wrong bytes")
		}
		q, err := e.bs.QueryWriteStatus(ctx, &bytestream.QueryWriteStatusRequest{ResourceName: name})
		if err != nil || !q.GetComplete() {
			t.Fatalf("status after completion: %v %v", q, err)
		}
	}
}

// TestByteStreamConcurrentSameBlob: many clients upload the same blob at once.
func TestByteStreamConcurrentSameBlob(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Options{})
	data, d := blob(t, 2<<20)
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := write(ctx, e.bs, "uploads/"+uuid()+"/blobs/"+d.String(), split(data, 128<<10), 0, true)
			if err == nil && r.GetCommittedSize() != d.Size {
				err = fmt.Errorf("committed %d", r.GetCommittedSize())
			}
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
	got, err := readAll(ctx, e.bs, &bytestream.ReadRequest{ResourceName: "blobs/" + d.String()})
	if err != nil || !bytes.Equal(got, data) {
		t.Fatal("blob damaged by concurrent uploads")
	}
}

func TestActionCache(t *testing.T) {
	ctx := context.Background()
	_, action := blob(t, 50)
	out, _ := blob(t, 100)
	stdout := []byte("hello from stdout")
	res := func(e *env) *repb.ActionResult {
		od := e.put(t, out)
		sd := e.put(t, stdout)
		return &repb.ActionResult{OutputFiles: []*repb.OutputFile{{Path: "out/a", Digest: od.Proto()}}, StdoutDigest: sd.Proto()}
	}

	e := newEnv(t, Options{})
	_, err := e.ac.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{ActionDigest: action.Proto(), ActionResult: res(e)})
	want(t, err, codes.PermissionDenied, "client write without --allow-client-ac-writes")
	_, err = e.ac.GetActionResult(ctx, &repb.GetActionResultRequest{ActionDigest: action.Proto()})
	want(t, err, codes.NotFound, "miss")

	e = newEnv(t, Options{AllowClientACWrites: true})
	r := res(e)
	if _, err := e.ac.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{InstanceName: "ci", ActionDigest: action.Proto(), ActionResult: r}); err != nil {
		t.Fatal(err)
	}
	got, err := e.ac.GetActionResult(ctx, &repb.GetActionResultRequest{InstanceName: "ci", ActionDigest: action.Proto(), InlineStdout: true, InlineOutputFiles: []string{"out/a"}})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.GetStdoutRaw(), stdout) || !bytes.Equal(got.GetOutputFiles()[0].GetContents(), out) {
		t.Fatal("inline stdout / output file not filled")
	}
	_, err = e.ac.GetActionResult(ctx, &repb.GetActionResultRequest{InstanceName: "other", ActionDigest: action.Proto()})
	want(t, err, codes.NotFound, "other instance")

	// A result referencing a missing blob is refused with the blobs named.
	_, ghost := blob(t, 77)
	bad := &repb.ActionResult{OutputFiles: []*repb.OutputFile{{Path: "x", Digest: ghost.Proto()}}}
	_, err = e.ac.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{ActionDigest: action.Proto(), ActionResult: bad})
	want(t, err, codes.FailedPrecondition, "result with missing blob")
	if !hasMissing(err, ghost) {
		t.Fatalf("no MISSING violation for %v in %v", ghost, err)
	}
	// An entry whose blob disappears later (eviction) is a miss, not a broken hit.
	od := cache.DigestOf(out)
	os.Remove(e.store.BlobPath(od))
	_, err = e.ac.GetActionResult(ctx, &repb.GetActionResultRequest{InstanceName: "ci", ActionDigest: action.Proto()})
	want(t, err, codes.NotFound, "incomplete entry")

	for _, c := range []struct {
		name string
		req  *repb.UpdateActionResultRequest
	}{
		{"no result", &repb.UpdateActionResultRequest{ActionDigest: action.Proto()}},
		{"bad action digest", &repb.UpdateActionResultRequest{ActionDigest: &repb.Digest{Hash: "q"}, ActionResult: &repb.ActionResult{}}},
		{"bad output digest", &repb.UpdateActionResultRequest{ActionDigest: action.Proto(), ActionResult: &repb.ActionResult{OutputFiles: []*repb.OutputFile{{Path: "x", Digest: &repb.Digest{Hash: "1"}}}}}},
		{"bad instance", &repb.UpdateActionResultRequest{InstanceName: "a//b", ActionDigest: action.Proto(), ActionResult: &repb.ActionResult{}}},
	} {
		_, err := e.ac.UpdateActionResult(ctx, c.req)
		want(t, err, codes.InvalidArgument, c.name)
	}
}

func hasMissing(err error, d cache.Digest) bool {
	for _, det := range status.Convert(err).Details() {
		if pf, ok := det.(*errdetails.PreconditionFailure); ok {
			for _, v := range pf.GetViolations() {
				if v.GetType() == "MISSING" && v.GetSubject() == "blobs/"+d.String() {
					return true
				}
			}
		}
	}
	return false
}

func uuid() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

func readFile(p string) ([]byte, error) { return os.ReadFile(p) }

func writeFile(t *testing.T, p string, b []byte) {
	t.Helper()
	os.Chmod(p, 0o644)
	if err := os.WriteFile(p, b, 0o444); err != nil {
		t.Fatal(err)
	}
}

// TestTreeCursorsBounded: kept GetTree walks stay within their count and memory
// budgets, oldest dropped first; a walk too large to keep still gets a working token.
func TestTreeCursorsBounded(t *testing.T) {
	var c treeCursors
	walk := func(n int) *treeWalk { // a walk that visited a root with n-1 subdirectories
		root := &repb.Directory{}
		for i := 1; i < n; i++ {
			root.Directories = append(root.Directories, &repb.DirectoryNode{Name: fmt.Sprint(i), Digest: cache.DigestOf([]byte(fmt.Sprint(i))).Proto()})
		}
		get := func(context.Context, cache.Digest) (*repb.Directory, error) { return root, nil }
		w := &treeWalk{n: 1, walk: cache.NewWalk(cache.Digest{}, get, cache.WalkOptions{Distinct: true})}
		if _, _, err := w.walk.Next(context.Background()); err != nil || w.walk.Seen() != n {
			t.Fatalf("walk saw %d, want %d (%v)", w.walk.Seen(), n, err)
		}
		return w
	}
	var ids []string
	for i := 0; i < 10; i++ {
		_, id, err := parseTreeToken(c.put(walk(maxTreeCursorSeen / 5)))
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	if c.seen > maxTreeCursorSeen || len(c.walks) != 5 {
		t.Fatalf("kept %d walks that saw %d directories; want 5 within %d", len(c.walks), c.seen, maxTreeCursorSeen)
	}
	if c.take(ids[0], cache.Digest{}, 1) != nil || c.take(ids[9], cache.Digest{}, 1) == nil {
		t.Fatal("want the oldest walk dropped and the newest kept")
	}
	tok := c.put(walk(maxTreeCursorSeen/4 + 1))
	if n, _, err := parseTreeToken(tok); err != nil || n != 1 {
		t.Fatalf("token of a walk too large to keep: %q %d %v", tok, n, err)
	}
	for i := 0; i < 3*maxTreeCursors; i++ {
		c.put(walk(1))
	}
	if len(c.walks) > maxTreeCursors {
		t.Fatalf("kept %d walks, want at most %d", len(c.walks), maxTreeCursors)
	}
}
