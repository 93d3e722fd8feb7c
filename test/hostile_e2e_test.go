package test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/bazelbuild/remote-apis-sdks/go/pkg/command"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/outerr"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/test/harness"
	"github.com/kilnbuild/kiln/test/hostile"
	"github.com/klauspost/compress/zstd"
	"google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Issue 19: a hostile client cannot take kiln serve's memory, disk or slots from the
// others. The attacker connects from 127.0.0.2 and the honest client from 127.0.0.1:
// two clients, as the server tells them apart.

func dialFrom(t *testing.T, addr, from string) *grpc.ClientConn {
	t.Helper()
	c, err := hostile.Dial(addr, from)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func randomBlob(t *testing.T, n int) ([]byte, *repb.Digest) {
	t.Helper()
	b := make([]byte, n)
	rand.Read(b)
	h := sha256.Sum256(b)
	return b, &repb.Digest{Hash: hex.EncodeToString(h[:]), SizeBytes: int64(n)}
}

// honestWrite uploads data in 1 MiB messages (compressed with zstd if zstd) and
// reads it back.
func honestWrite(ctx context.Context, conn *grpc.ClientConn, data []byte, d *repb.Digest, compressed bool) error {
	bs := bytestream.NewByteStreamClient(conn)
	body, kind := data, "blobs"
	if compressed {
		enc, _ := zstd.NewWriter(nil)
		body, kind = enc.EncodeAll(data, nil), "compressed-blobs/zstd"
	}
	st, err := bs.Write(ctx)
	if err != nil {
		return err
	}
	name := fmt.Sprintf("uploads/%s/%s/%s/%d", hostile.UUID(), kind, d.GetHash(), d.GetSizeBytes())
	for off := 0; off < len(body); off += 1 << 20 {
		end := min(off+1<<20, len(body))
		req := &bytestream.WriteRequest{WriteOffset: int64(off), Data: body[off:end], FinishWrite: end == len(body)}
		if off == 0 {
			req.ResourceName = name
		}
		if err := st.Send(req); err != nil {
			break
		}
	}
	if _, err := st.CloseAndRecv(); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	rd, err := bs.Read(ctx, &bytestream.ReadRequest{ResourceName: fmt.Sprintf("blobs/%s/%d", d.GetHash(), d.GetSizeBytes())})
	if err != nil {
		return err
	}
	var got []byte
	for {
		r, err := rd.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("read back: %w", err)
		}
		got = append(got, r.GetData()...)
	}
	if !bytes.Equal(got, data) {
		return fmt.Errorf("read back %d bytes, not the %d written", len(got), len(data))
	}
	return nil
}

// TestHostileCompressedUploads (case 1): zstd frames declaring 64 MiB windows, left
// open or interrupted, cannot take the server's memory past its budget (before: 66 MB of
// RSS each, held for 5 minutes), and another client's uploads go on meanwhile.
func TestHostileCompressedUploads(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	const budget = 512 << 20
	srv := harness.StartServer(t, "--no-execution", "--max-memory", "512MiB")
	base := srv.PeakRSS(t)
	attacker := dialFrom(t, srv.Addr, "127.0.0.2")
	honest := dialFrom(t, srv.Addr, "127.0.0.1")
	ctx := harness.Context(t, 5*time.Minute)

	actx, stop := context.WithCancel(ctx)
	var held, interrupted, closed hostile.Codes
	done := make(chan struct{})
	go func() {
		defer close(done)
		go hostile.Bombs(actx, attacker, 16, 16, 512, "hold", &held)
		hostile.Bombs(actx, attacker, 24, 4, 512, "cancel", &interrupted)
		hostile.Bombs(actx, attacker, 8, 4, 512, "close", &closed)
	}()
	for i := 0; i < 3; i++ {
		data, d := randomBlob(t, 4<<20)
		if err := honestWrite(ctx, honest, data, d, i%2 == 0); err != nil {
			t.Fatalf("honest upload %d during the attack: %v", i, err)
		}
	}
	<-done
	stop()
	peak := srv.PeakRSS(t)
	t.Logf("RSS at start %d MiB, peak %d MiB; held bombs: %v; interrupted: %v; closed without finish_write: %v",
		base>>20, peak>>20, &held, &interrupted, &closed)
	// 48 bombs would pin 3 GiB; the budget is 512 MiB, of which the attacker may hold a quarter.
	if peak > base+budget+256<<20 {
		t.Fatalf("peak RSS %d MiB: more than the 512 MiB budget over the %d MiB the server started with", peak>>20, base>>20)
	}
	if held.Get(codes.ResourceExhausted) == 0 {
		t.Fatalf("16 held 64 MiB-window uploads were all accepted: %v", &held)
	}
	if srv.Metric(t, "kiln_limit_refusals_total", `limit="client_memory"`) == 0 {
		t.Fatal("no refusal counted for the client's memory share")
	}
}

// TestHostileUploadSlots (case 3): thousands of one-byte uploads closed without
// finish_write, or interrupted, or held open, take no slot from another client (before:
// every client's ByteStream.Write failed with RESOURCE_EXHAUSTED for 5 minutes).
func TestHostileUploadSlots(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	srv := harness.StartServer(t, "--no-execution", "--client-max-uploads", "256")
	attacker := dialFrom(t, srv.Addr, "127.0.0.2")
	honest := dialFrom(t, srv.Addr, "127.0.0.1")
	ctx := harness.Context(t, 5*time.Minute)
	var closed, interrupted, held hostile.Codes
	hostile.UnfinishedWrites(ctx, attacker, 4096, 64, "close", &closed)
	hostile.UnfinishedWrites(ctx, attacker, 1024, 64, "cancel", &interrupted)
	hctx, stop := context.WithCancel(ctx)
	defer stop()
	go hostile.UnfinishedWrites(hctx, attacker, 300, 300, "hold", &held)
	deadline := time.Now().Add(time.Minute)
	for held.Get(codes.ResourceExhausted) < 300-256 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("closed without finish_write: %v; interrupted: %v; held: %v", &closed, &interrupted, &held)
	if held.Get(codes.ResourceExhausted) < 300-256 {
		t.Fatalf("a client limited to 256 uploads held 300 open: %v", &held)
	}
	// The attacker is at its limit; the honest client is not.
	data, d := randomBlob(t, 8<<20)
	if err := honestWrite(ctx, honest, data, d, false); err != nil {
		t.Fatalf("another client's upload while the attacker is at its limit: %v", err)
	}
}

// TestHostileDiskBounds (cases 4 and 5): with --max-size 64MiB a frame declaring 2^62
// bytes is refused at once (before: 8 GiB written), a blob larger than the bound is
// RESOURCE_EXHAUSTED (before: OK, then NOT_FOUND), interrupted uploads cannot fill the
// temp area past the bound nor keep another client's upload out, and a blob that fits
// (one client may have uploads of up to half the bound in progress) is kept.
func TestHostileDiskBounds(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	srv := harness.StartServer(t, "--no-execution", "--max-size", "64MiB")
	conn := dialFrom(t, srv.Addr, "127.0.0.1")
	attacker := dialFrom(t, srv.Addr, "127.0.0.2")
	ctx := harness.Context(t, 5*time.Minute)
	start := time.Now()
	err := hostile.HugeDeclared(ctx, conn, 2048)
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("frame declaring 2^62 bytes: %v, want RESOURCE_EXHAUSTED", err)
	}
	t.Logf("2^62-byte declaration refused in %v: %v", time.Since(start), err)
	if n := srv.TempBytes(t); n > 0 {
		t.Fatalf("%d bytes left in the store's temp area", n)
	}
	big, bd := randomBlob(t, 80<<20)
	if err := honestWrite(ctx, conn, big, bd, false); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("80 MiB blob into a 64 MiB store: %v, want RESOURCE_EXHAUSTED (not OK, then NOT_FOUND)", err)
	}
	// Interrupted compressed uploads of 16 MiB each: their temp files count in the bound.
	var c hostile.Codes
	hostile.Bombs(ctx, attacker, 8, 8, 128, "cancel", &c)
	if size, temp := srv.Metric(t, "kiln_store_size_bytes"), srv.Metric(t, "kiln_store_temp_bytes"); size+temp > 64<<20 {
		t.Fatalf("store %v + temp %v bytes over the 64 MiB bound (%v)", size, temp, &c)
	}
	if n := srv.TempBytes(t); n > 64<<20 {
		t.Fatalf("%d bytes in the store's temp area, over the 64 MiB bound", n)
	}
	fits, fd := randomBlob(t, 30<<20)
	if err := honestWrite(ctx, conn, fits, fd, true); err != nil {
		t.Fatalf("30 MiB blob into a 64 MiB store after the attack: %v", err)
	}
}

// TestHostileLeniency (case 8): what docs/serve.md says is refused, the real server
// refuses.
func TestHostileLeniency(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	srv := harness.StartServer(t, "--no-execution", "--allow-client-ac-writes")
	conn := dialFrom(t, srv.Addr, "")
	ctx := harness.Context(t, 2*time.Minute)
	bs := bytestream.NewByteStreamClient(conn)
	data, d := randomBlob(t, 100)
	blob := fmt.Sprintf("%s/%d", d.GetHash(), d.GetSizeBytes())
	for _, c := range []struct{ what, name string }{
		{"NUL in the instance name", "in\x00st/uploads/" + hostile.UUID() + "/blobs/" + blob},
		{"'..' after the size", "uploads/" + hostile.UUID() + "/blobs/" + blob + "/../../x"},
		{"size +100", "uploads/" + hostile.UUID() + "/blobs/" + d.GetHash() + "/+100"},
		{"size 0100", "uploads/" + hostile.UUID() + "/blobs/" + d.GetHash() + "/0100"},
	} {
		st, _ := bs.Write(ctx)
		st.Send(&bytestream.WriteRequest{ResourceName: c.name, Data: data, FinishWrite: true})
		if _, err := st.CloseAndRecv(); status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v, want INVALID_ARGUMENT", c.what, err)
		}
	}
	rd, _ := bs.Read(ctx, &bytestream.ReadRequest{ResourceName: "in\x00st/blobs/" + blob})
	if _, err := rd.Recv(); status.Code(err) != codes.InvalidArgument {
		t.Errorf("read with NUL in the instance name: %v", err)
	}
	st, _ := bs.Write(ctx)
	st.Send(&bytestream.WriteRequest{ResourceName: "uploads/" + hostile.UUID() + "/blobs/" + blob, Data: data, FinishWrite: true})
	st.Send(&bytestream.WriteRequest{WriteOffset: 100, Data: []byte("more")})
	if _, err := st.CloseAndRecv(); status.Code(err) != codes.InvalidArgument {
		t.Errorf("a message after finish_write: %v, want INVALID_ARGUMENT", err)
	}
	cas := repb.NewContentAddressableStorageClient(conn)
	dirs, err := hostile.Store(ctx, conn, []byte{}) // the empty Directory
	if err != nil {
		t.Fatal(err)
	}
	gt, _ := cas.GetTree(ctx, &repb.GetTreeRequest{RootDigest: dirs[0], PageSize: -1})
	if _, err := gt.Recv(); status.Code(err) != codes.InvalidArgument {
		t.Errorf("GetTree page_size -1: %v, want INVALID_ARGUMENT", err)
	}
	out, err := hostile.Store(ctx, conn, []byte("root:x:0:0::/root:/bin/sh\n"), []byte("an action"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = repb.NewActionCacheClient(conn).UpdateActionResult(ctx, &repb.UpdateActionResultRequest{ActionDigest: out[1],
		ActionResult: &repb.ActionResult{OutputFiles: []*repb.OutputFile{{Path: "../../etc/passwd", Digest: out[0]}}}})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("UpdateActionResult with output ../../etc/passwd: %v, want INVALID_ARGUMENT", err)
	}
	if t.Failed() {
		t.Log(strings.TrimSpace(srv.Log()))
	}
}

// TestTruncatedStdoutNotCached (case 8): an action whose stdout hit the sandbox's
// 64 MiB cap is returned, never cached: what was cut off is not what it wrote.
func TestTruncatedStdoutNotCached(t *testing.T) {
	srv, bb := busyboxServer(t)
	c := rexecClient(t, srv.Addr)
	cmd := &command.Command{
		Args:        []string{"/bin/sh", "-c", "head -c 70000000 /dev/zero"},
		ExecRoot:    t.TempDir(),
		InputSpec:   &command.InputSpec{},
		Platform:    map[string]string{"container-image": "docker://kiln/busybox@" + bb},
		Identifiers: &command.Identifiers{ToolName: "kiln-e2e"},
	}
	for i := 0; i < 2; i++ {
		oe := outerr.NewRecordingOutErr()
		res, _ := c.Run(context.Background(), cmd, command.DefaultExecutionOptions(), oe)
		if res.Err != nil || res.ExitCode != 0 {
			t.Fatalf("run %d: %+v", i, res)
		}
		if res.Status == command.CacheHitResultStatus {
			t.Fatalf("run %d: a result with a truncated stdout was cached", i)
		}
		if n := len(oe.Stdout()); n != 64<<20 {
			t.Fatalf("run %d: stdout of %d bytes, want the 64 MiB cap", i, n)
		}
	}
}

// TestHostileGetTree (case 2): concurrent GetTree calls on a 700,000-entry directory
// (55 MB) cannot take the server's memory past its budget (before: N=20 took 6.9 GB),
// and another client's GetTree is answered meanwhile.
func TestHostileGetTree(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	const budget = 2 << 30
	srv := harness.StartServer(t, "--no-execution", "--max-memory", "2GiB")
	attacker := dialFrom(t, srv.Addr, "127.0.0.2")
	honest := dialFrom(t, srv.Addr, "127.0.0.1")
	ctx := harness.Context(t, 10*time.Minute)
	roots, err := hostile.Upload(ctx, attacker, hostile.BigDirectory(700_000))
	if err != nil {
		t.Fatal(err)
	}
	small, err := hostile.Upload(ctx, honest, &repb.Directory{})
	if err != nil {
		t.Fatal(err)
	}
	base := srv.PeakRSS(t)
	var c hostile.Codes
	done := make(chan struct{})
	go func() { defer close(done); hostile.GetTrees(ctx, attacker, roots[0], 20, 20, &c) }()
	var h hostile.Codes
	hostile.GetTrees(ctx, honest, small[0], 5, 1, &h)
	<-done
	peak := srv.PeakRSS(t)
	t.Logf("RSS before %d MiB, peak %d MiB; attacker's walks: %v; honest: %v", base>>20, peak>>20, &c, &h)
	if h.Get(codes.OK) != 5 {
		t.Fatalf("another client's GetTree during the attack: %v", &h)
	}
	if c.Get(codes.OK) == 0 {
		t.Fatalf("no walk of the big directory was served at all: %v", &c)
	}
	if peak > base+budget+512<<20 {
		t.Fatalf("peak RSS %d MiB: more than the 2 GiB budget over the %d MiB before the walks (20 concurrent walks took 6.9 GB before issue 19)", peak>>20, base>>20)
	}
}

// TestHostileExecute (case 6): 100 Executes of an input root of 21 Directory blobs
// claiming 2^20 directories are refused before they take an execution slot (before:
// about 0.6 s of CPU each inside one, and an honest echo waited 34-46 s); an honest
// action runs meanwhile.
func TestHostileExecute(t *testing.T) {
	srv, bb := busyboxServer(t)
	attacker := dialFrom(t, srv.Addr, "127.0.0.2")
	ctx := harness.Context(t, 10*time.Minute)
	actions, err := hostile.HostileActions(ctx, attacker, 100, 20)
	if err != nil {
		t.Fatal(err)
	}
	var c hostile.Codes
	done := make(chan struct{})
	go func() { defer close(done); hostile.ExecuteAll(ctx, attacker, actions, 100, &c) }()
	rc := rexecClient(t, srv.Addr)
	cmd := &command.Command{
		Args: []string{"/bin/sh", "-c", "echo honest"}, ExecRoot: t.TempDir(), InputSpec: &command.InputSpec{},
		Platform:    map[string]string{"container-image": "docker://kiln/busybox@" + bb},
		Identifiers: &command.Identifiers{ToolName: "kiln-e2e"},
	}
	oe := outerr.NewRecordingOutErr()
	res, _ := rc.Run(ctx, cmd, command.DefaultExecutionOptions(), oe)
	if res.Err != nil || res.ExitCode != 0 || strings.TrimSpace(string(oe.Stdout())) != "honest" {
		t.Fatalf("honest action during the attack: %+v %q", res, oe.Stdout())
	}
	<-done
	t.Logf("hostile executes: %v", &c)
	if c.Get(codes.InvalidArgument) != 100 {
		t.Fatalf("hostile executes: %v, want 100 INVALID_ARGUMENT", &c)
	}
	// None of them was ever an execution: each was refused before it was queued.
	if n := srv.Metric(t, "kiln_executions_total", `outcome="error"`); n != 0 {
		t.Fatalf("%v hostile executions were queued and failed inside an execution slot", n)
	}
}

// TestOutputStatusCodesE2E (case 7): outputs of the wrong type and absolute output
// symlinks (Capabilities: DISALLOWED) are FAILED_PRECONDITION, as REAPI says.
func TestOutputStatusCodesE2E(t *testing.T) {
	srv, _ := busyboxServer(t)
	conn := dialFrom(t, srv.Addr, "")
	ctx := harness.Context(t, 5*time.Minute)
	root, err := hostile.Upload(ctx, conn, &repb.Directory{})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		cmd  *repb.Command
	}{
		{"output_files naming a directory", &repb.Command{Arguments: []string{"/bin/sh", "-c", "mkdir -p d"}, OutputFiles: []string{"d"}}},
		{"output_directories naming a file", &repb.Command{Arguments: []string{"/bin/sh", "-c", "rmdir f; echo x > f"}, OutputDirectories: []string{"f"}}},
		{"absolute output symlink", &repb.Command{Arguments: []string{"/bin/sh", "-c", "ln -s /etc/passwd l"}, OutputPaths: []string{"l"}}},
	} {
		a, err := hostile.Action(ctx, conn, c.cmd, root[0])
		if err != nil {
			t.Fatal(err)
		}
		resp, err := hostile.Execute(ctx, conn, a, true)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if got := codes.Code(resp.GetStatus().GetCode()); got != codes.FailedPrecondition {
			t.Errorf("%s: %v (%s), want FAILED_PRECONDITION", c.name, got, resp.GetStatus().GetMessage())
		}
	}
}

// TestHostileCallFlood: a client sending calls faster than --client-max-calls waits its
// turn, beyond 256 waiting calls is refused, and another client's calls are answered
// meanwhile.
func TestHostileCallFlood(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	srv := harness.StartServer(t, "--no-execution", "--client-max-calls", "20")
	attacker := repb.NewContentAddressableStorageClient(dialFrom(t, srv.Addr, "127.0.0.2"))
	honest := repb.NewContentAddressableStorageClient(dialFrom(t, srv.Addr, "127.0.0.1"))
	ctx := harness.Context(t, 5*time.Minute)
	fctx, stop := context.WithCancel(ctx)
	var flood hostile.Codes
	done := make(chan struct{})
	go func() {
		defer close(done)
		hostile.Each(fctx, 2000, 400, func() {
			_, err := attacker.FindMissingBlobs(fctx, &repb.FindMissingBlobsRequest{})
			flood.Add(err)
		})
	}()
	for deadline := time.Now().Add(time.Minute); flood.Get(codes.ResourceExhausted) == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("400 concurrent calls of a client limited to 20 per second: none refused (%v)", &flood)
		}
	}
	for i := 0; i < 20; i++ {
		if _, err := honest.FindMissingBlobs(ctx, &repb.FindMissingBlobsRequest{}); err != nil {
			t.Fatalf("another client's call during the flood: %v", err)
		}
	}
	stop()
	<-done
	t.Logf("flood: %v", &flood)
}
