package reapi

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/limits"
	"github.com/klauspost/compress/zstd"
	"google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// testClientKey is the metadata key by which a unit test names the client a call
// comes from (the real server tells clients apart by certificate or address).
const testClientKey = "kiln-test-client"

func testClientID(ctx context.Context) context.Context {
	if md, ok := metadata.FromIncomingContext(ctx); ok && len(md.Get(testClientKey)) > 0 {
		return WithClientID(ctx, md.Get(testClientKey)[0])
	}
	return ctx
}

func testClientUnary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	return h(testClientID(ctx), req)
}

type idStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s idStream) Context() context.Context { return s.ctx }

func testClientStream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	return h(srv, idStream{ss, testClientID(ss.Context())})
}

func as(ctx context.Context, client string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, testClientKey, client)
}

// windowBomb is the zstd stream of issue 19's first attack: a frame header declaring a
// 64 MiB window (which a decoder allocates) and n RLE blocks of 128 KiB each, a few
// bytes apiece on the wire.
func windowBomb(n int) []byte {
	b := []byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x80}
	for i := 0; i < n; i++ {
		b = append(b, 0x02, 0x00, 0x10, byte(i))
	}
	return b
}

// bombName is an upload the bomb can never complete: its declared size is one more
// than the bomb decompresses to, small enough for the store to take.
func bombName(n int) string {
	d := cache.Digest{Hash: strings.Repeat("ab", 32), Size: int64(n)<<17 + 1}
	return "uploads/" + uuid() + "/compressed-blobs/zstd/" + d.String()
}

// openWrite sends chunks on a new Write stream without finishing it and waits until
// the server has committed them; cancel breaks the stream (an interrupted upload).
func openWrite(t *testing.T, ctx context.Context, e *env, name string, data []byte) (cancel func(), err error) {
	t.Helper()
	cctx, cancel := context.WithCancel(ctx)
	st, err := e.bs.Write(cctx)
	if err != nil {
		cancel()
		return nil, err
	}
	if err := st.Send(&bytestream.WriteRequest{ResourceName: name, Data: data}); err != nil {
		cancel()
		return nil, err
	}
	ended := make(chan error, 1)
	go func() { ended <- st.RecvMsg(new(bytestream.WriteResponse)) }()
	for {
		select {
		case err := <-ended: // refused: the stream's status says why
			cancel()
			return nil, err
		default:
		}
		q, err := e.bs.QueryWriteStatus(ctx, &bytestream.QueryWriteStatusRequest{ResourceName: name})
		if err == nil && q.GetCommittedSize() == int64(len(data)) {
			return cancel, nil
		}
		time.Sleep(time.Millisecond)
	}
}

// TestCompressedUploadsBounded (issue 19, case 1): zstd frames with 64 MiB windows,
// left open or interrupted, hold no more than the client's share of the memory budget:
// the client's own interrupted uploads are dropped to make room, a stream closed without
// finish_write is dropped at once, and another client's uploads go on.
func TestCompressedUploadsBounded(t *testing.T) {
	ctx := context.Background()
	mem := limits.NewBudget(1<<30, 200<<20)
	e := newEnv(t, Options{Memory: mem})
	bomb := windowBomb(8)
	attacker := as(ctx, "attacker")
	// A stream closed without finish_write keeps nothing.
	_, err := write(attacker, e.bs, bombName(8), [][]byte{bomb}, 0, false)
	want(t, err, codes.InvalidArgument, "closed without finish_write")
	if used, n := mem.Used(""), e.srv.bs.slots.InUse(""); used != 0 || n != 0 {
		t.Fatalf("a stream closed without finish_write left %d bytes and %d upload slots held", used, n)
	}

	// Interrupted uploads: each pins a 64 MiB window until dropped.
	for i := 0; i < 12; i++ {
		name := bombName(8)
		cancel, err := openWrite(t, attacker, e, name, bomb)
		if err != nil {
			t.Fatalf("interrupted bomb %d: %v", i, err)
		}
		cancel()
		e.srv.bs.waitDetached(t, name)
		if used := mem.Used("attacker"); used > mem.PerClient() {
			t.Fatalf("attacker holds %d bytes, over its share %d", used, mem.PerClient())
		}
	}
	if n := e.srv.bs.slots.InUse("attacker"); n > 3 {
		t.Fatalf("%d interrupted 64 MiB-window uploads kept; the client's 200 MiB share holds at most 3 (older ones must be dropped)", n)
	}
	// Uploads left open (attached) cannot be dropped: beyond the share they are refused.
	var cancels []func()
	refused := 0
	for i := 0; i < 6; i++ {
		cancel, err := openWrite(t, attacker, e, bombName(8), bomb)
		if err != nil {
			want(t, err, codes.ResourceExhausted, "bomb beyond the client's share")
			refused++
			continue
		}
		cancels = append(cancels, cancel)
	}
	if refused == 0 {
		t.Fatal("six open 64 MiB-window uploads fit in a 200 MiB share")
	}
	// Another client is served meanwhile.
	data, d := blob(t, 1<<20)
	enc, _ := zstd.NewWriter(nil)
	comp := enc.EncodeAll(data, nil)
	if _, err := write(as(ctx, "honest"), e.bs, "uploads/"+uuid()+"/compressed-blobs/zstd/"+d.String(), [][]byte{comp}, 0, true); err != nil {
		t.Fatalf("honest compressed upload during the attack: %v", err)
	}
	for _, c := range cancels {
		c()
	}
	deadline := time.Now().Add(10 * time.Second)
	for e.srv.bs.reclaimAll(); mem.Used("") != 0 && time.Now().Before(deadline); e.srv.bs.reclaimAll() {
		time.Sleep(10 * time.Millisecond) // the cancellations reach the server
	}
	if used, n := mem.Used(""), e.srv.bs.slots.InUse(""); used != 0 || n != 0 {
		t.Fatalf("after the attack %d bytes and %d upload slots are still held", used, n)
	}
}

// waitDetached waits until no stream writes the upload name (a cancelled stream's end
// reaches the server).
func (b *byteStream) waitDetached(t *testing.T, name string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		b.mu.Lock()
		u := b.uploads[name]
		attached := u != nil && u.attached
		b.mu.Unlock()
		if !attached {
			return
		}
	}
	t.Fatalf("upload %s still attached 10 s after its stream was cancelled", name)
}

// reclaimAll drops every interrupted upload (tests).
func (b *byteStream) reclaimAll() {
	for b.reclaim("") {
	}
}

// TestUploadSlotsPerClient (issue 19, case 3): a client at its limit of uploads in
// progress is refused, another client is not; a client's own interrupted uploads make
// room for its new ones; streams closed without finish_write hold no slot.
func TestUploadSlotsPerClient(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Options{ClientUploads: 8, MaxUploads: 64})
	attacker := as(ctx, "attacker")
	// The attack: thousands of one-byte Writes closed without finish_write.
	var wg sync.WaitGroup
	for i := 0; i < 32; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 32; j++ {
				write(attacker, e.bs, "uploads/"+uuid()+"/blobs/"+strings.Repeat("cd", 32)+"/100", [][]byte{{1}}, 0, false)
			}
		}()
	}
	wg.Wait()
	if n := e.srv.bs.slots.InUse(""); n != 0 {
		t.Fatalf("%d slots held by streams closed without finish_write", n)
	}
	// Open streams: the ninth is refused, for this client only.
	var cancels []func()
	defer func() {
		for _, c := range cancels {
			c()
		}
	}()
	var names []string
	for i := 0; i < 8; i++ {
		names = append(names, "uploads/"+uuid()+"/blobs/"+strings.Repeat("cd", 32)+"/100")
		cancel, err := openWrite(t, attacker, e, names[i], []byte{1})
		if err != nil {
			t.Fatal(err)
		}
		cancels = append(cancels, cancel)
	}
	_, err := openWrite(t, attacker, e, "uploads/"+uuid()+"/blobs/"+strings.Repeat("cd", 32)+"/100", []byte{1})
	want(t, err, codes.ResourceExhausted, "ninth upload of a client limited to eight")
	data, d := blob(t, 300000)
	if _, err := write(as(ctx, "honest"), e.bs, "uploads/"+uuid()+"/blobs/"+d.String(), split(data, 100000), 0, true); err != nil {
		t.Fatalf("another client's upload: %v", err)
	}
	// Interrupted, the attacker's uploads give way to its next ones.
	for i, c := range cancels {
		c()
		e.srv.bs.waitDetached(t, names[i])
	}
	cancels = nil
	data2, d2 := blob(t, 1000)
	if _, err := write(attacker, e.bs, "uploads/"+uuid()+"/blobs/"+d2.String(), [][]byte{data2}, 0, true); err != nil {
		t.Fatalf("a client's interrupted uploads did not make room for its next: %v", err)
	}
}

// TestDeclaredSizeRefusedAtOnce (issue 19, cases 4 and 5): a frame declaring 2^62
// bytes, or a blob larger than --max-size, is refused with RESOURCE_EXHAUSTED before
// anything is written; a blob that fits is kept.
func TestDeclaredSizeRefusedAtOnce(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	store := openBounded(t, dir, 8<<20)
	cas := cache.WithEmptyBlob(store)
	e := newEnvOn(t, store, cas, Options{})
	huge := cache.Digest{Hash: strings.Repeat("ef", 32), Size: 1 << 62}
	_, err := write(ctx, e.bs, "uploads/"+uuid()+"/compressed-blobs/zstd/"+huge.String(), [][]byte{windowBomb(2048)}, 0, true)
	want(t, err, codes.ResourceExhausted, "frame declaring 2^62 bytes")
	big, bd := blob(t, 9<<20)
	_, err = write(ctx, e.bs, "uploads/"+uuid()+"/blobs/"+bd.String(), split(big, 1<<20), 0, true)
	want(t, err, codes.ResourceExhausted, "blob larger than --max-size")
	ents, _ := os.ReadDir(filepath.Join(dir, "tmp"))
	for _, en := range ents {
		if !strings.HasSuffix(en.Name(), ".owner") {
			t.Fatalf("temp file %s left behind", en.Name())
		}
	}
	fits, fd := blob(t, 8<<20-1000)
	if _, err := write(ctx, e.bs, "uploads/"+uuid()+"/blobs/"+fd.String(), split(fits, 1<<20), 0, true); err != nil {
		t.Fatal(err)
	}
	got, err := readAll(ctx, e.bs, &bytestream.ReadRequest{ResourceName: "blobs/" + fd.String()})
	if err != nil || !bytes.Equal(got, fits) {
		t.Fatalf("a blob the store accepted is gone: %v", err)
	}
}

// TestByteStreamLeniency (issue 19, case 8): what the docs say is refused, is.
func TestByteStreamLeniency(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Options{})
	data, d := blob(t, 100)
	for _, c := range []struct{ what, name string }{
		{"NUL in instance", "in\x00st/uploads/" + uuid() + "/blobs/" + d.String()},
		{".. in metadata", "uploads/" + uuid() + "/blobs/" + d.String() + "/meta/../../x"},
		{"empty metadata segment", "uploads/" + uuid() + "/blobs/" + d.String() + "/"},
		{"size with sign", "uploads/" + uuid() + "/blobs/" + d.Hash + "/+100"},
		{"size with leading zero", "uploads/" + uuid() + "/blobs/" + d.Hash + "/0100"},
	} {
		_, err := write(ctx, e.bs, c.name, [][]byte{data}, 0, true)
		want(t, err, codes.InvalidArgument, c.what)
	}
	_, err := readAll(ctx, e.bs, &bytestream.ReadRequest{ResourceName: "in\x00st/blobs/" + d.String()})
	want(t, err, codes.InvalidArgument, "NUL in a read's instance")
	// A message after finish_write is an error, and nothing is stored.
	st, _ := e.bs.Write(ctx)
	st.Send(&bytestream.WriteRequest{ResourceName: "uploads/" + uuid() + "/blobs/" + d.String(), Data: data, FinishWrite: true})
	st.Send(&bytestream.WriteRequest{WriteOffset: 100})
	_, err = st.CloseAndRecv()
	want(t, err, codes.InvalidArgument, "message after finish_write")
	if m, _ := e.store.FindMissing(ctx, []cache.Digest{d}); len(m) != 1 {
		t.Fatal("a Write with a message after finish_write stored its blob")
	}
	// GetTree: a negative page size.
	root := e.putProto(t, &repb.Directory{})
	gt, _ := e.cas.GetTree(ctx, &repb.GetTreeRequest{RootDigest: root.Proto(), PageSize: -1})
	_, err = gt.Recv()
	want(t, err, codes.InvalidArgument, "page_size -1")
}

// TestClientResultPaths (issue 19, case 8): under --allow-client-ac-writes, results
// whose outputs would land outside the working directory are refused.
func TestClientResultPaths(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Options{AllowClientACWrites: true})
	_, action := blob(t, 50)
	out := e.put(t, []byte("root::0:0"))
	escaping := &repb.Directory{Files: []*repb.FileNode{{Name: "../../x", Digest: out.Proto()}}}
	treeD := e.putProto(t, &repb.Tree{Root: escaping})
	for _, c := range []struct {
		what string
		r    *repb.ActionResult
	}{
		{"climbing output file", &repb.ActionResult{OutputFiles: []*repb.OutputFile{{Path: "../../etc/passwd", Digest: out.Proto()}}}},
		{"absolute output file", &repb.ActionResult{OutputFiles: []*repb.OutputFile{{Path: "/etc/passwd", Digest: out.Proto()}}}},
		{"unclean output file", &repb.ActionResult{OutputFiles: []*repb.OutputFile{{Path: "a/./b", Digest: out.Proto()}}}},
		{"path used twice", &repb.ActionResult{OutputFiles: []*repb.OutputFile{{Path: "a", Digest: out.Proto()}, {Path: "a", Digest: out.Proto()}}}},
		{"climbing output directory", &repb.ActionResult{OutputDirectories: []*repb.OutputDirectory{{Path: "..", TreeDigest: treeD.Proto()}}}},
		{"absolute symlink", &repb.ActionResult{OutputSymlinks: []*repb.OutputSymlink{{Path: "l", Target: "/etc/passwd"}}}},
		{"climbing symlink", &repb.ActionResult{OutputFileSymlinks: []*repb.OutputSymlink{{Path: "a/l", Target: "../../etc/passwd"}}}},
		{"tree entry climbing", &repb.ActionResult{OutputDirectories: []*repb.OutputDirectory{{Path: "d", TreeDigest: treeD.Proto()}}}},
	} {
		_, err := e.ac.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{ActionDigest: action.Proto(), ActionResult: c.r})
		want(t, err, codes.InvalidArgument, c.what)
	}
	_, err := e.ac.GetActionResult(ctx, &repb.GetActionResultRequest{ActionDigest: action.Proto()})
	want(t, err, codes.NotFound, "nothing was stored")
	ok := &repb.ActionResult{OutputFiles: []*repb.OutputFile{{Path: "bazel-out/a/passwd", Digest: out.Proto()}},
		OutputSymlinks: []*repb.OutputSymlink{{Path: "bazel-out/a/l", Target: "../b/x"}}}
	if _, err := e.ac.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{ActionDigest: action.Proto(), ActionResult: ok}); err != nil {
		t.Fatalf("a sound result: %v", err)
	}
}

// TestWindowGuard: the guard finds every frame's window across skippable frames,
// checksums and arbitrary chunking, and refuses windows over its bound at the header.
func TestWindowGuard(t *testing.T) {
	data, _ := blob(t, 9<<20)
	var stream []byte
	for _, w := range []int{1 << 10, 1 << 20, 1 << 23} {
		enc, _ := zstd.NewWriter(nil, zstd.WithWindowSize(w), zstd.WithEncoderCRC(true))
		stream = append(stream, 0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 'a', 'b', 'c') // a skippable frame
		var buf bytes.Buffer
		zw, _ := zstd.NewWriter(&buf, zstd.WithWindowSize(w))
		zw.Write(data[:w+1000])
		zw.Close()
		stream = append(stream, buf.Bytes()...)
		stream = append(stream, enc.EncodeAll(data[:100], nil)...)
	}
	for _, chunk := range []int{1, 7, 1 << 16} {
		var costs []int64
		g := newWindowGuard(&chunkReader{b: stream, n: chunk}, cache.Digest{}, maxZstdWindow, func(c int64) error { costs = append(costs, c); return nil })
		dec, _ := zstd.NewReader(g, zstd.WithDecoderConcurrency(1))
		n, err := io.Copy(io.Discard, dec)
		dec.Close()
		if err != nil || n != int64(3*100+(1<<10)+(1<<20)+(1<<23)+3000) {
			t.Fatalf("chunk %d: decoded %d bytes: %v", chunk, n, err)
		}
		if last := costs[len(costs)-1]; last != zstdWindowCost(1<<23) || g.state == gDone {
			t.Fatalf("chunk %d: charged %v, want the largest window's cost %d last, the stream understood", chunk, costs, zstdWindowCost(1<<23))
		}
	}
	g := newWindowGuard(bytes.NewReader(windowBomb(1)), cache.Digest{}, 32<<20, func(int64) error { return nil })
	if _, err := io.Copy(io.Discard, g); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("64 MiB window against a 32 MiB bound: %v", err)
	}
	g = newWindowGuard(bytes.NewReader(windowBomb(1)), cache.Digest{}, maxZstdWindow, func(int64) error { return status.Error(codes.ResourceExhausted, "no") })
	if _, err := io.Copy(io.Discard, g); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("window the budget refuses: %v", err)
	}
}

type chunkReader struct {
	b []byte
	n int
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if len(c.b) == 0 {
		return 0, io.EOF
	}
	k := copy(p[:min(len(p), c.n)], c.b)
	c.b = c.b[k:]
	return k, nil
}

// bigDirectory is a Directory of n FileNodes (about 80 bytes each).
func bigDirectory(n int) *repb.Directory {
	dir := &repb.Directory{}
	for i := 0; i < n; i++ {
		dir.Files = append(dir.Files, &repb.FileNode{Name: fmt.Sprintf("f%08d", i), Digest: cache.EmptyDigest.Proto()})
	}
	return dir
}

// TestGetTreeBounded (issue 19, case 2): concurrent GetTree calls of one client are
// bounded in number and in memory (a walk is charged for what it reads and keeps, and
// refused beyond the client's share); another client's GetTree is served meanwhile,
// and everything is given back when the calls end.
func TestGetTreeBounded(t *testing.T) {
	ctx := context.Background()
	mem := limits.NewBudget(512<<20, 128<<20)
	e := newEnv(t, Options{Memory: mem, ClientTrees: 3})
	big := e.putProto(t, bigDirectory(100_000)) // 8 MB: 46 MiB charged while it is held
	mid := e.putProto(t, bigDirectory(10_000))
	small := e.putProto(t, &repb.Directory{Directories: []*repb.DirectoryNode{{Name: "d", Digest: e.putProto(t, &repb.Directory{}).Proto()}}})
	gate := &gateStore{BlobStore: e.srv.cas, hold: map[cache.Digest]bool{big: true, mid: true}, release: make(chan struct{})}
	e.srv.cas = gate
	attacker := as(ctx, "attacker")
	walk := func(ctx context.Context, root cache.Digest) error {
		st, err := e.cas.GetTree(ctx, &repb.GetTreeRequest{RootDigest: root.Proto()})
		for err == nil {
			_, err = st.Recv()
		}
		if err == io.EOF {
			return nil
		}
		return err
	}
	results := make(chan error, 3)
	waitCharged := func(n int64) {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); mem.Used("attacker") < n; time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%d bytes charged, want %d", mem.Used("attacker"), n)
			}
		}
	}
	for i := 0; i < 2; i++ {
		go func() { results <- walk(attacker, big) }()
	}
	waitCharged(2 * treeReadCost * big.Size)
	// A third walk of the big root is admitted but does not fit the 128 MiB share.
	err := walk(attacker, big)
	want(t, err, codes.ResourceExhausted, "a third 46 MiB walk in a 128 MiB share")
	if !strings.Contains(status.Convert(err).Message(), "share") {
		t.Fatalf("refusal does not name the memory share: %v", err)
	}
	// A small one fits, and takes the client's third and last slot.
	go func() { results <- walk(attacker, mid) }()
	waitCharged(2*treeReadCost*big.Size + treeReadCost*mid.Size)
	err = walk(attacker, small)
	want(t, err, codes.ResourceExhausted, "a fourth walk of a client limited to three")
	if !strings.Contains(status.Convert(err).Message(), "GetTree calls") {
		t.Fatalf("refusal does not name the limit on walks: %v", err)
	}
	// Another client is served meanwhile.
	if err := walk(as(ctx, "honest"), small); err != nil {
		t.Fatalf("another client's GetTree during the attack: %v", err)
	}
	close(gate.release)
	for i := 0; i < 3; i++ {
		if err := <-results; err != nil {
			t.Fatalf("an admitted walk: %v", err)
		}
	}
	if used, n := mem.Used(""), e.srv.treeSlots.InUse(""); used != 0 || n != 0 {
		t.Fatalf("after the walks %d bytes and %d walk slots are still held", used, n)
	}
}

// gateStore holds reads of some blobs until release is closed (after they were charged).
type gateStore struct {
	cache.BlobStore
	hold    map[cache.Digest]bool
	release chan struct{}
}

func (g *gateStore) Get(ctx context.Context, d cache.Digest, off int64) (io.ReadCloser, error) {
	if g.hold[d] {
		<-g.release
	}
	return g.BlobStore.Get(ctx, d, off)
}

// TestCallLimitRecordsPresence: a client's call in progress (a ByteStream upload not
// finished) makes it present to the per-client CPU rate, through CallLimit; when the
// call ends it no longer is.
func TestCallLimitRecordsPresence(t *testing.T) {
	work := limits.NewWork(1, false)
	e := newEnv(t, Options{Work: work}, CallLimit(nil, work)...)
	if work.Alone("a") {
		t.Fatal("a client without a call was present")
	}
	st, err := e.bs.Write(as(context.Background(), "a"))
	if err != nil {
		t.Fatal(err)
	}
	data := []byte("0123456789")
	d := cache.DigestOf(data)
	if err := st.Send(&bytestream.WriteRequest{ResourceName: "uploads/" + uuid() + "/blobs/" + d.Hash + "/10", Data: data[:5]}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); !work.Alone("a"); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the client's upload in progress did not make it present")
		}
	}
	if err := st.Send(&bytestream.WriteRequest{WriteOffset: 5, Data: data[5:], FinishWrite: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.CloseAndRecv(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); work.Alone("a"); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the client was still at work after its call ended")
		}
	}
}

// TestReclaimWhileWaitingForWork: an interrupted upload whose data waits for its
// client's CPU token (held elsewhere, say by the upload that needs room) is dropped at
// once when reclaimed, not when the token comes free: no deadlock between the two.
func TestReclaimWhileWaitingForWork(t *testing.T) {
	ctx := context.Background()
	work := limits.NewWork(1, false)
	e := newEnv(t, Options{Work: work})
	release, err := work.Acquire(ctx, "attacker")
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	name := "uploads/" + uuid() + "/blobs/" + strings.Repeat("ab", 32) + "/1000"
	cctx, cancel := context.WithCancel(as(ctx, "attacker"))
	st, _ := e.bs.Write(cctx)
	st.Send(&bytestream.WriteRequest{ResourceName: name, Data: make([]byte, 100)})
	// The Put has taken the data (the pipe write returned) and waits for the token.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		q, err := e.bs.QueryWriteStatus(ctx, &bytestream.QueryWriteStatusRequest{ResourceName: name})
		if err == nil && q.GetCommittedSize() == 100 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the upload's data was never taken")
		}
	}
	cancel()
	e.srv.bs.waitDetached(t, name)
	done := make(chan bool)
	go func() { done <- e.srv.bs.reclaim("attacker") }()
	select {
	case ok := <-done:
		if !ok {
			t.Fatal("nothing to reclaim")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("reclaiming an upload that waits for its client's work token hangs")
	}
}
