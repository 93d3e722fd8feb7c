package test

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/test/harness"
	"google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// sharedBucket starts a real S3 server with one bucket, gives this test process (and so
// the kiln processes it starts) its credentials, and returns the --storage URL of
// prefix in the bucket. End-to-end tests only: skipped with -short.
func sharedBucket(t *testing.T, prefix string) (*harness.S3, string) {
	t.Helper()
	if testing.Short() {
		t.Skip("e2e")
	}
	s3 := harness.StartS3(t, "kiln-cache")
	s3.Setenv(t)
	return s3, s3.URL("kiln-cache", prefix)
}

// storageServer starts `kiln serve` as a cache-only server on shared storage.
func storageServer(t *testing.T, url string, extra ...string) *harness.Server {
	t.Helper()
	return harness.StartServer(t, append([]string{"--no-execution", "--allow-client-ac-writes", "--storage", url}, extra...)...)
}

// TestSharedStorageBazel: two servers on two data dirs share one bucket. Bazel builds
// through A; after `bazel clean` every action is a cache hit through B. A blob deleted
// from the bucket behind kiln's back then makes its action a miss on a third server:
// Bazel runs that action again and the build still succeeds.
func TestSharedStorageBazel(t *testing.T) {
	s3, url := sharedBucket(t, "team")
	a, b := storageServer(t, url), storageServer(t, url)
	bz := harness.NewBazel(t, "examples/bazel-hello")
	build := func(srv *harness.Server) map[string]int {
		t.Helper()
		out, err := bz.Run(t, "build", "--remote_cache=grpc://"+srv.Addr, "--spawn_strategy=local", "//...")
		if err != nil {
			t.Fatalf("build: %v\n%s", err, out)
		}
		return harness.Processes(out)
	}
	first := build(a)
	ran := first["total"] - first["internal"]
	if ran < 5 || first["remote cache hit"] != 0 {
		t.Fatalf("first build: %v", first)
	}
	bz.Run(t, "clean")
	if second := build(b); second["remote cache hit"] != ran {
		t.Fatalf("through B: %v, want all %d processes as remote cache hits", second, ran)
	}
	// Nothing reached B's data dir but what it served: its local tier was filled from
	// the bucket, verified.
	if n := b.Metric(t, "kiln_action_cache_lookups_total", `result="hit"`); int(n) != ran {
		t.Fatalf("B counted %v hits, want %d", n, ran)
	}
	hello, err := os.ReadFile(filepath.Join(bz.Workspace, "bazel-bin/app/hello"))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(hello)
	h := hex.EncodeToString(sum[:])
	if err := os.Remove(filepath.Join(s3.Dir, "kiln-cache", "team", "cas", h[:2], h)); err != nil {
		t.Fatalf("the linked binary is not in the bucket: %v", err)
	}
	c := storageServer(t, url)
	bz.Run(t, "clean")
	third := build(c)
	if third["remote cache hit"] != ran-1 {
		t.Fatalf("after deleting the binary's blob: %v, want %d hits (the link action a miss)", third, ran-1)
	}
	out, err := exec.Command(filepath.Join(bz.Workspace, "bazel-bin/app/hello")).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "hello, kiln") {
		t.Fatalf("binary after the rebuilt link: %v %q", err, out)
	}
}

func dial(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(8<<20)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func randomBytes(t *testing.T, n int) ([]byte, *repb.Digest) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return b, &repb.Digest{Hash: hex.EncodeToString(sum[:]), SizeBytes: int64(n)}
}

// bsWrite uploads data with ByteStream in 1 MiB messages.
func bsWrite(ctx context.Context, conn *grpc.ClientConn, data []byte, d *repb.Digest) error {
	st, err := bytestream.NewByteStreamClient(conn).Write(ctx)
	if err != nil {
		return err
	}
	name := fmt.Sprintf("uploads/%x/blobs/%s/%d", time.Now().UnixNano(), d.Hash, d.SizeBytes)
	for off := 0; ; off += 1 << 20 {
		end := min(off+1<<20, len(data))
		req := &bytestream.WriteRequest{WriteOffset: int64(off), Data: data[off:end], FinishWrite: end == len(data)}
		if off == 0 {
			req.ResourceName = name
		}
		if err := st.Send(req); err != nil {
			break // the server's status comes from CloseAndRecv
		}
		if end == len(data) {
			break
		}
	}
	_, err = st.CloseAndRecv()
	return err
}

// bsRead downloads blob d with ByteStream and checks it is data.
func bsRead(ctx context.Context, conn *grpc.ClientConn, d *repb.Digest) ([]byte, error) {
	st, err := bytestream.NewByteStreamClient(conn).Read(ctx, &bytestream.ReadRequest{ResourceName: fmt.Sprintf("blobs/%s/%d", d.Hash, d.SizeBytes)})
	if err != nil {
		return nil, err
	}
	var out []byte
	for {
		resp, err := st.Recv()
		if err != nil {
			if status.Code(err) == codes.OK || err.Error() == "EOF" {
				break
			}
			return out, err
		}
		out = append(out, resp.GetData()...)
	}
	sum := sha256.Sum256(out)
	if hex.EncodeToString(sum[:]) != d.Hash {
		return out, fmt.Errorf("read %d bytes that do not hash to %s", len(out), d.Hash)
	}
	return out, nil
}

func findMissing(ctx context.Context, conn *grpc.ClientConn, ds ...*repb.Digest) ([]*repb.Digest, error) {
	resp, err := repb.NewContentAddressableStorageClient(conn).FindMissingBlobs(ctx, &repb.FindMissingBlobsRequest{BlobDigests: ds})
	return resp.GetMissingBlobDigests(), err
}

// TestSharedStorageSmallLocalTier: with a 1 MiB local tier, 64 MiB blobs are uploaded
// (multipart), then served verified through the writer and through another server,
// and the local tier stays within its bound.
func TestSharedStorageSmallLocalTier(t *testing.T) {
	_, url := sharedBucket(t, "")
	a := storageServer(t, url, "--max-size", "1MiB")
	b := storageServer(t, url, "--max-size", "1MiB")
	ctx := harness.Context(t, 5*time.Minute)
	var blobs [][]byte
	var ds []*repb.Digest
	for i := 0; i < 3; i++ {
		data, d := randomBytes(t, 64<<20)
		if err := bsWrite(ctx, dial(t, a.Addr), data, d); err != nil {
			t.Fatalf("upload 64 MiB: %v", err)
		}
		blobs, ds = append(blobs, data), append(ds, d)
	}
	for _, srv := range []*harness.Server{a, b} {
		conn := dial(t, srv.Addr)
		if m, err := findMissing(ctx, conn, ds...); err != nil || len(m) != 0 {
			t.Fatalf("find-missing: %v %v", m, err)
		}
		for i, d := range ds {
			got, err := bsRead(ctx, conn, d)
			if err != nil || len(got) != len(blobs[i]) {
				t.Fatalf("read 64 MiB blob back: %v", err)
			}
		}
		if n := srv.Metric(t, "kiln_store_size_bytes"); n > 1<<20 {
			t.Fatalf("local tier holds %v bytes, over its 1 MiB bound", n)
		}
	}
}

// TestSharedStorageServerKilled: the S3 server is killed (SIGKILL) while kiln uploads a
// 64 MiB blob to it in parts. The client gets UNAVAILABLE naming the endpoint; no
// object, partial or whole, is visible; after a restart the same upload succeeds.
func TestSharedStorageServerKilled(t *testing.T) {
	s3, url := sharedBucket(t, "k")
	srv := storageServer(t, url)
	ctx := harness.Context(t, 5*time.Minute)
	conn := dial(t, srv.Addr)
	data, d := randomBytes(t, 64<<20)
	parts := filepath.Join(s3.Dir, "kiln-cache", ".sgwtmp", "multipart")
	killed := make(chan bool, 1)
	go func() {
		deadline := time.Now().Add(2 * time.Minute)
		for time.Now().Before(deadline) {
			n := 0
			filepath.WalkDir(parts, func(_ string, e fs.DirEntry, err error) error {
				if err == nil && !e.IsDir() {
					n++
				}
				return nil
			})
			if n > 0 {
				s3.Kill()
				killed <- true
				return
			}
			time.Sleep(time.Millisecond)
		}
		killed <- false
	}()
	err := bsWrite(ctx, conn, data, d)
	if !<-killed {
		t.Fatal("the upload never reached the S3 server's multipart parts")
	}
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), s3.Endpoint) {
		t.Fatalf("upload while the S3 server died: %v, want UNAVAILABLE naming %s", err, s3.Endpoint)
	}
	if _, err := findMissing(ctx, conn, d); status.Code(err) != codes.Unavailable {
		t.Fatalf("find-missing with the server down: %v, want UNAVAILABLE", err)
	}
	s3.Start(t)
	if m, err := findMissing(ctx, conn, d); err != nil || len(m) != 1 {
		t.Fatalf("after restart: missing %v, %v; the interrupted blob must not be visible", m, err)
	}
	if _, err := os.Stat(filepath.Join(s3.Dir, "kiln-cache", "k", "cas", d.Hash[:2], d.Hash)); !os.IsNotExist(err) {
		t.Fatalf("an object exists for the interrupted upload: %v", err)
	}
	if _, err := bsRead(ctx, conn, d); status.Code(err) != codes.NotFound {
		t.Fatalf("read of the interrupted blob: %v, want NOT_FOUND", err)
	}
	if err := bsWrite(ctx, conn, data, d); err != nil {
		t.Fatalf("upload after restart: %v", err)
	}
	if _, err := bsRead(ctx, conn, d); err != nil {
		t.Fatal(err)
	}
}

// TestSharedStorageStartErrors: wrong credentials, a missing bucket and an unreachable
// endpoint stop `kiln serve` (and `kiln exec`) at once with one line on stderr.
func TestSharedStorageStartErrors(t *testing.T) {
	s3 := harness.StartS3(t, "kiln-cache")
	s3.Setenv(t)
	down := "http://127.0.0.1:1"
	cases := []struct {
		name, url, env, want string
	}{
		{"wrong secret", s3.URL("kiln-cache", ""), "AWS_SECRET_ACCESS_KEY=wrong", "refused kiln's AWS credentials"},
		{"unknown key", s3.URL("kiln-cache", ""), "AWS_ACCESS_KEY_ID=nobody", "refused kiln's AWS credentials"},
		{"missing bucket", s3.URL("no-such-bucket", ""), "", "the bucket does not exist"},
		{"unreachable", strings.Replace(s3.URL("kiln-cache", ""), "endpoint=", "endpoint="+strings.ReplaceAll(down, ":", "%3A")+"&x=", 1), "", ""},
		{"credentials in the URL", "s3://key:secret@kiln-cache/?endpoint=" + s3.Endpoint, "", "credentials do not belong in the URL"},
		{"bad URL", "s3://kiln-cache/?endpoint=" + s3.Endpoint + "&colour=blue", "", "unknown parameter"},
	}
	for _, c := range cases {
		if c.name == "unreachable" {
			c.url = "s3://kiln-cache/?endpoint=" + down + "&region=us-east-1&path-style=true"
			c.want = "unreachable"
		}
		for _, args := range [][]string{
			{"serve", "--data", t.TempDir(), "--listen", "127.0.0.1:0", "--http-listen", "", "--no-execution", "--storage", c.url},
			{"exec", "--data", t.TempDir(), "--storage", c.url, "--", "true"},
		} {
			cmd := exec.Command(harness.KilnBin(t), args...)
			if c.env != "" {
				cmd.Env = append(os.Environ(), c.env)
			}
			out, err := cmd.CombinedOutput()
			lines := strings.Split(strings.TrimSpace(string(out)), "\n")
			if err == nil || len(lines) != 1 || !strings.Contains(lines[0], c.want) {
				t.Errorf("%s: kiln %s: err=%v, want one line containing %q:\n%s", c.name, args[0], err, c.want, out)
			}
			if strings.Contains(string(out), s3.Secret) {
				t.Errorf("%s: the secret appears in the output", c.name)
			}
		}
	}
}

// TestSharedStorageConcurrentClients: 8 clients on two servers upload one shared
// 8 MiB blob and blobs of their own at the same time; every blob is then served,
// verified, by both servers.
func TestSharedStorageConcurrentClients(t *testing.T) {
	_, url := sharedBucket(t, "c")
	srvs := []*harness.Server{storageServer(t, url), storageServer(t, url)}
	ctx := harness.Context(t, 5*time.Minute)
	shared, sd := randomBytes(t, 8<<20)
	type blob struct {
		data []byte
		d    *repb.Digest
	}
	all := []blob{{shared, sd}}
	for i := 0; i < 8; i++ {
		b, d := randomBytes(t, 1<<20+i*4096)
		all = append(all, blob{b, d})
	}
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn := dial(t, srvs[i%2].Addr)
			errs <- bsWrite(ctx, conn, shared, sd)
			errs <- bsWrite(ctx, conn, all[i+1].data, all[i+1].d)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, srv := range srvs {
		conn := dial(t, srv.Addr)
		for _, b := range all {
			if _, err := bsRead(ctx, conn, b.d); err != nil {
				t.Fatalf("read back: %v", err)
			}
		}
	}
}

// TestSharedStorageExec: `kiln exec --storage` on one data dir runs an action (its
// input materialized from the tiered store) and stores result, outputs and signed link
// in the bucket; the same action on another data dir is then a cache hit with the
// same output, and the link envelope is kept under the bucket's attest/ prefix.
func TestSharedStorageExec(t *testing.T) {
	s3, url := sharedBucket(t, "x")
	harness.RequireRoot(t)
	in := filepath.Join(t.TempDir(), "in")
	os.MkdirAll(in, 0o755)
	os.WriteFile(filepath.Join(in, "words"), []byte("pear\napple\nfig\n"), 0o644)
	run := func(data string) (execJSON, []byte) {
		t.Helper()
		bb := harness.RecipeToolchain(t, data, "busybox")
		out := t.TempDir()
		res := harness.Run(t, "exec", "--data", data, "--storage", url, "--toolchain", "docker://kiln/busybox@"+bb,
			"--input", in, "--output", "sorted", "--out", out, "--json", "--", "/bin/sh", "-c", "sort words > sorted")
		if res.Code != 0 {
			t.Fatalf("kiln exec --storage: exit %d: %s", res.Code, res.Stderr)
		}
		var j execJSON
		if err := json.Unmarshal([]byte(res.Stdout), &j); err != nil {
			t.Fatalf("%v\n%s", err, res.Stdout)
		}
		b, err := os.ReadFile(filepath.Join(out, "sorted"))
		if err != nil {
			t.Fatal(err)
		}
		return j, b
	}
	first, out1 := run(t.TempDir())
	if first.Cached || string(out1) != "apple\nfig\npear\n" {
		t.Fatalf("first run: cached=%v output %q", first.Cached, out1)
	}
	second, out2 := run(t.TempDir())
	if !second.Cached || second.Action != first.Action || string(out2) != string(out1) {
		t.Fatalf("second data dir: cached=%v action %s (first %s), output %q", second.Cached, second.Action, first.Action, out2)
	}
	n := 0
	filepath.WalkDir(filepath.Join(s3.Dir, "kiln-cache", "x", "attest"), func(_ string, e fs.DirEntry, err error) error {
		if err == nil && !e.IsDir() {
			n++
		}
		return nil
	})
	if n != 1 {
		t.Fatalf("%d objects under the bucket's attest/ prefix, want the one signed link (inputs and outputs stay under the CAS's lifecycle)", n)
	}
}
