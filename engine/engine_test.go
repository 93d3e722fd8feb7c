package engine

import (
	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/disk"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
)

// fakeSandbox interprets a tiny command language on the host exec root, so the
// engine's own logic (trees, outputs, scheduling) is tested without containers.
// The real sandbox is exercised by the end-to-end tests.
type fakeSandbox struct {
	runs    atomic.Int64
	release chan struct{} // if set, "block" waits on it
	started chan string   // if set, receives each run's first argument
}

func (f *fakeSandbox) Run(ctx context.Context, j Job) (JobResult, error) {
	f.runs.Add(1)
	if f.started != nil {
		f.started <- strings.Join(j.Args, " ")
	}
	cwd := filepath.Join(j.ExecRoot, j.Cwd)
	res := JobResult{PolicyDigest: "sha256:fake"}
	os.WriteFile(j.Stdout, []byte("out:"+strings.Join(j.Args, " ")), 0o644)
	for i := 0; i < len(j.Args); i++ {
		switch j.Args[i] {
		case "write": // write PATH CONTENT
			p := filepath.Join(cwd, j.Args[i+1])
			if err := os.WriteFile(p, []byte(j.Args[i+2]), 0o644); err != nil {
				return res, err
			}
			i += 2
		case "mkdir":
			os.MkdirAll(filepath.Join(cwd, j.Args[i+1]), 0o755)
			i++
		case "symlink": // symlink TARGET PATH
			os.Symlink(j.Args[i+1], filepath.Join(cwd, j.Args[i+2]))
			i += 2
		case "rm":
			os.RemoveAll(filepath.Join(cwd, j.Args[i+1]))
			i++
		case "exit":
			res.ExitCode, _ = strconv.Atoi(j.Args[i+1])
			i++
		case "block":
			select {
			case <-f.release:
			case <-ctx.Done():
				res.ExitCode, res.Signal = 137, "KILL"
				return res, nil
			}
		case "timeout":
			res.TimedOut, res.ExitCode = true, 137
		case "cat": // cat SRC DST: copy an input to an output
			b, err := os.ReadFile(filepath.Join(cwd, j.Args[i+1]))
			if err != nil {
				res.ExitCode = 1
				return res, nil
			}
			os.WriteFile(filepath.Join(cwd, j.Args[i+2]), b, 0o644)
			i += 2
		case "echo":
		default:
			return res, fmt.Errorf("fake sandbox: unknown word %q", j.Args[i])
		}
	}
	return res, nil
}

type fakeToolchains struct{}

func (fakeToolchains) Resolve(_ context.Context, ref string) (string, error) {
	if ref == "unpinned:latest" {
		return "", status.Error(codes.FailedPrecondition, "unpinned")
	}
	return "sha256:" + strings.Repeat("0", 64), nil
}
func (fakeToolchains) RootFS(context.Context, string) (string, error) { return "/", nil }

type testEnv struct {
	store *disk.Store
	cas   cache.BlobStore
	ac    cache.ActionCache
	exec  *Executor
	sched *Scheduler
	sb    *fakeSandbox
}

func newTestEnv(t *testing.T, conc int) *testEnv {
	t.Helper()
	dir := t.TempDir()
	store, err := disk.Open(context.Background(), filepath.Join(dir, "store"), disk.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	cas := cache.WithEmptyBlob(store)
	ac := cache.WithCompletenessCheck(store.ActionCache(), cas)
	sb := &fakeSandbox{}
	ex, err := NewExecutor(ExecutorConfig{CAS: localStore{cas, store, store}, AC: ac, Sandbox: sb, Toolchains: fakeToolchains{},
		WorkDir: filepath.Join(dir, "exec"), UID: os.Getuid(), GID: os.Getgid(), MaxTimeout: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	return &testEnv{store: store, cas: cas, ac: ac, exec: ex, sb: sb,
		sched: NewScheduler(ex, SchedulerConfig{Concurrency: conc, MaxQueue: 4, CancelGrace: 50 * time.Millisecond})}
}

func (e *testEnv) put(t *testing.T, m proto.Message) cache.Digest {
	t.Helper()
	d, err := cache.PutProto(context.Background(), e.cas, m)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func (e *testEnv) putBytes(t *testing.T, b []byte) cache.Digest {
	t.Helper()
	d, err := cache.PutBytes(context.Background(), e.cas, b)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// action stores an Action with the given command and input root.
func (e *testEnv) action(t *testing.T, cmd *repb.Command, root cache.Digest, mod func(*repb.Action)) cache.Digest {
	t.Helper()
	a := &repb.Action{CommandDigest: e.put(t, cmd).Proto(), InputRootDigest: root.Proto()}
	if mod != nil {
		mod(a)
	}
	return e.put(t, a)
}

func (e *testEnv) run(t *testing.T, d cache.Digest) (*repb.ExecuteResponse, error) {
	t.Helper()
	w, err := e.sched.Submit(context.Background(), Request{ActionDigest: d})
	if err != nil {
		return nil, err
	}
	defer w.Close()
	return w.Response(context.Background())
}

func TestExecuteCollectsOutputs(t *testing.T) {
	e := newTestEnv(t, 2)
	src := e.putBytes(t, []byte("input data"))
	root := e.put(t, &repb.Directory{
		Files:       []*repb.FileNode{{Name: "in.txt", Digest: src.Proto()}},
		Directories: []*repb.DirectoryNode{{Name: "sub", Digest: e.put(t, &repb.Directory{}).Proto()}},
	})
	cmd := &repb.Command{
		Arguments:         []string{"cat", "in.txt", "out/copy", "mkdir", "out/d/e", "write", "out/d/e/f", "F", "symlink", "e/f", "out/d/link", "symlink", "../in.txt", "out/rel"},
		OutputFiles:       []string{"out/copy", "out/missing", "out/rel"},
		OutputDirectories: []string{"out/d"},
	}
	resp, err := e.run(t, e.action(t, cmd, root, nil))
	if err != nil || resp.GetStatus().GetCode() != 0 {
		t.Fatalf("execute: %v %v", err, resp.GetStatus())
	}
	r := resp.GetResult()
	if len(r.GetOutputFiles()) != 1 || r.GetOutputFiles()[0].GetPath() != "out/copy" || r.GetOutputFiles()[0].GetDigest().GetHash() != src.Hash {
		t.Fatalf("output files %v", r.GetOutputFiles())
	}
	if len(r.GetOutputFileSymlinks()) != 1 || r.GetOutputFileSymlinks()[0].GetTarget() != "../in.txt" {
		t.Fatalf("output file symlinks %v", r.GetOutputFileSymlinks())
	}
	if len(r.GetOutputDirectories()) != 1 {
		t.Fatalf("output dirs %v", r.GetOutputDirectories())
	}
	tree := &repb.Tree{}
	td, _ := cache.FromProto(r.GetOutputDirectories()[0].GetTreeDigest())
	if err := cache.ReadProto(context.Background(), e.cas, td, tree, 0); err != nil {
		t.Fatal(err)
	}
	if len(tree.GetRoot().GetDirectories()) != 1 || len(tree.GetRoot().GetSymlinks()) != 1 || len(tree.GetChildren()) != 1 {
		t.Fatalf("tree %v", tree)
	}
	// The stored input blob was hardlinked, never written: it still verifies.
	if got, err := cache.ReadAll(context.Background(), e.cas, src, 0); err != nil || string(got) != "input data" {
		t.Fatalf("input blob after the action: %q %v", got, err)
	}
	md := r.GetExecutionMetadata()
	if md.GetWorkerStartTimestamp() == nil || md.GetOutputUploadCompletedTimestamp() == nil || md.GetQueuedTimestamp() == nil {
		t.Fatalf("metadata incomplete: %v", md)
	}
	// Second Execute: a cache hit, no run.
	runs := e.sb.runs.Load()
	resp2, _ := e.run(t, e.action(t, cmd, root, nil))
	if !resp2.GetCachedResult() || e.sb.runs.Load() != runs {
		t.Fatal("second execute was not served from the action cache")
	}
}

// TestOutputsThroughPlantedSymlinks: an action that replaces its output directory or
// working tree with symlinks to host paths gets nothing of the host collected.
func TestOutputsThroughPlantedSymlinks(t *testing.T) {
	e := newTestEnv(t, 1)
	secret := filepath.Join(t.TempDir(), "secret")
	os.WriteFile(secret, []byte("host secret"), 0o600)
	root := e.put(t, &repb.Directory{})
	cases := []struct {
		name string
		cmd  *repb.Command
	}{
		{"parent replaced by absolute symlink", &repb.Command{Arguments: []string{"rm", "out", "symlink", filepath.Dir(secret), "out"}, OutputFiles: []string{"out/secret"}}},
		{"output dir is a symlink to host", &repb.Command{Arguments: []string{"rm", "out", "symlink", filepath.Dir(secret), "out"}, OutputDirectories: []string{"out"}}},
		{"output file symlink to host", &repb.Command{Arguments: []string{"symlink", secret, "f"}, OutputFiles: []string{"f"}}},
		{"symlink escaping via ..", &repb.Command{Arguments: []string{"symlink", "../../../../../../" + secret, "f"}, OutputPaths: []string{"f"}}},
		{"symlink inside output dir", &repb.Command{Arguments: []string{"mkdir", "d", "symlink", secret, "d/x"}, OutputDirectories: []string{"d"}}},
		// Lexically o/s stays inside (o + 10 b + 11 ..); through o/b -> . it climbs 10 up.
		{"chained symlinks climbing out", &repb.Command{Arguments: []string{"mkdir", "o", "symlink", ".", "o/b", "symlink", strings.Repeat("b/", 10) + strings.Repeat("../", 11) + "etc", "o/s"}, OutputDirectories: []string{"o"}}},
	}
	for _, c := range cases {
		resp, err := e.run(t, e.action(t, c.cmd, root, nil))
		if err != nil {
			t.Fatal(err)
		}
		if resp.GetStatus().GetCode() == 0 {
			for _, f := range resp.GetResult().GetOutputFiles() {
				b, _ := cache.ReadAll(context.Background(), e.cas, mustDigest(f.GetDigest()), 0)
				if strings.Contains(string(b), "host secret") {
					t.Fatalf("%s: host file collected as output", c.name)
				}
			}
			if len(resp.GetResult().GetOutputDirectories()) > 0 {
				t.Fatalf("%s: an output directory reaching outside was collected", c.name)
			}
		}
		if _, err := os.Stat(secret); err != nil {
			t.Fatalf("%s: host file moved or removed: %v", c.name, err)
		}
	}
}

func mustDigest(p *repb.Digest) cache.Digest { d, _ := cache.FromProto(p); return d }

// TestHostileTrees: malformed input trees are INVALID_ARGUMENT before anything runs.
func TestHostileTrees(t *testing.T) {
	e := newTestEnv(t, 1)
	blob := e.putBytes(t, []byte("x"))
	f := func(n string) *repb.FileNode { return &repb.FileNode{Name: n, Digest: blob.Proto()} }
	empty := e.put(t, &repb.Directory{})
	// A DAG that doubles at every level: 25 blobs claim 2^24 nodes.
	level := e.put(t, &repb.Directory{Files: []*repb.FileNode{f("leaf")}})
	for i := 0; i < 24; i++ {
		level = e.put(t, &repb.Directory{Directories: []*repb.DirectoryNode{{Name: "a", Digest: level.Proto()}, {Name: "b", Digest: level.Proto()}}})
	}
	deep := empty
	for i := 0; i < maxTreeDepth+2; i++ {
		deep = e.put(t, &repb.Directory{Directories: []*repb.DirectoryNode{{Name: "d", Digest: deep.Proto()}}})
	}
	cases := []struct {
		name string
		root cache.Digest
	}{
		{"dotdot name", e.put(t, &repb.Directory{Files: []*repb.FileNode{f("..")}})},
		{"dot name", e.put(t, &repb.Directory{Directories: []*repb.DirectoryNode{{Name: ".", Digest: empty.Proto()}}})},
		{"slash in name", e.put(t, &repb.Directory{Files: []*repb.FileNode{f("a/b")}})},
		{"empty name", e.put(t, &repb.Directory{Files: []*repb.FileNode{f("")}})},
		{"unsorted", e.put(t, &repb.Directory{Files: []*repb.FileNode{f("b"), f("a")}})},
		{"duplicate", e.put(t, &repb.Directory{Files: []*repb.FileNode{f("a"), f("a")}})},
		{"file and dir same name", e.put(t, &repb.Directory{Files: []*repb.FileNode{f("a")}, Directories: []*repb.DirectoryNode{{Name: "a", Digest: empty.Proto()}}})},
		{"absolute symlink", e.put(t, &repb.Directory{Symlinks: []*repb.SymlinkNode{{Name: "l", Target: "/etc/passwd"}}})},
		{"symlink escaping", e.put(t, &repb.Directory{Symlinks: []*repb.SymlinkNode{{Name: "l", Target: "../x"}}})},
		{"symlink escaping via chain", e.put(t, &repb.Directory{
			Directories: []*repb.DirectoryNode{{Name: "d", Digest: e.put(t, &repb.Directory{Symlinks: []*repb.SymlinkNode{{Name: "up", Target: ".."}}}).Proto()}},
			Symlinks:    []*repb.SymlinkNode{{Name: "l", Target: "d/up/d/up/.."}}})},
		{"symlink loop", e.put(t, &repb.Directory{Symlinks: []*repb.SymlinkNode{{Name: "a", Target: "b"}, {Name: "b", Target: "a"}}})},
		{"self loop", e.put(t, &repb.Directory{Symlinks: []*repb.SymlinkNode{{Name: "a", Target: "a/x"}}})},
		{"bad file digest", e.put(t, &repb.Directory{Files: []*repb.FileNode{{Name: "a", Digest: &repb.Digest{Hash: "nope"}}}})},
		{"16M-node claim", level},
		{"too deep", deep},
	}
	for _, c := range cases {
		runs := e.sb.runs.Load()
		resp, err := e.run(t, e.action(t, &repb.Command{Arguments: []string{"echo"}}, c.root, nil))
		code := status.Code(err)
		if err == nil {
			code = codes.Code(resp.GetStatus().GetCode())
		}
		if code != codes.InvalidArgument {
			t.Errorf("%s: got %v (%v %v), want INVALID_ARGUMENT", c.name, code, err, resp.GetStatus())
		}
		if e.sb.runs.Load() != runs {
			t.Errorf("%s: the action ran", c.name)
		}
	}
}

// TestMissingInputs: absent blobs are FAILED_PRECONDITION naming each one.
func TestMissingInputs(t *testing.T) {
	e := newTestEnv(t, 1)
	ghost := cache.DigestOf([]byte("never uploaded"))
	ghostDir := cache.DigestOf([]byte("not a directory either"))
	root := e.put(t, &repb.Directory{Files: []*repb.FileNode{{Name: "a", Digest: ghost.Proto()}},
		Directories: []*repb.DirectoryNode{{Name: "d", Digest: ghostDir.Proto()}}})
	resp, err := e.run(t, e.action(t, &repb.Command{Arguments: []string{"echo"}}, root, nil))
	if err != nil {
		t.Fatal(err)
	}
	err = status.ErrorProto(resp.GetStatus())
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("got %v", err)
	}
	missing := cache.MissingFromError(err)
	if len(missing) != 2 {
		t.Fatalf("missing %v, want the file and the directory", missing)
	}
	_, err = e.sched.Submit(context.Background(), Request{ActionDigest: cache.DigestOf([]byte("no such action"))})
	if len(cache.MissingFromError(err)) != 1 {
		t.Fatalf("missing action: %v", err)
	}
}

func TestCommandValidation(t *testing.T) {
	e := newTestEnv(t, 1)
	root := e.put(t, &repb.Directory{})
	env := func(kv ...string) []*repb.Command_EnvironmentVariable {
		var out []*repb.Command_EnvironmentVariable
		for i := 0; i < len(kv); i += 2 {
			out = append(out, &repb.Command_EnvironmentVariable{Name: kv[i], Value: kv[i+1]})
		}
		return out
	}
	cases := []struct {
		name string
		cmd  *repb.Command
		mod  func(*repb.Action)
	}{
		{"no args", &repb.Command{}, nil},
		{"absolute output", &repb.Command{Arguments: []string{"echo"}, OutputFiles: []string{"/etc/x"}}, nil},
		{"traversing output", &repb.Command{Arguments: []string{"echo"}, OutputPaths: []string{"../x"}}, nil},
		{"unclean output", &repb.Command{Arguments: []string{"echo"}, OutputFiles: []string{"a//b"}}, nil},
		{"duplicate output", &repb.Command{Arguments: []string{"echo"}, OutputFiles: []string{"a"}, OutputDirectories: []string{"a"}}, nil},
		{"traversing cwd", &repb.Command{Arguments: []string{"echo"}, WorkingDirectory: "../x"}, nil},
		{"unsorted env", &repb.Command{Arguments: []string{"echo"}, EnvironmentVariables: env("B", "1", "A", "2")}, nil},
		{"bad env name", &repb.Command{Arguments: []string{"echo"}, EnvironmentVariables: env("A=B", "1")}, nil},
		{"unknown platform property", &repb.Command{Arguments: []string{"echo"}}, func(a *repb.Action) {
			a.Platform = &repb.Platform{Properties: []*repb.Platform_Property{{Name: "gpu", Value: "yes"}}}
		}},
		{"timeout over max", &repb.Command{Arguments: []string{"echo"}}, func(a *repb.Action) { a.Timeout = durationpb.New(2 * time.Hour) }},
	}
	for _, c := range cases {
		_, err := e.sched.Submit(context.Background(), Request{ActionDigest: e.action(t, c.cmd, root, c.mod)})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: got %v, want INVALID_ARGUMENT", c.name, err)
		}
	}
	// An unpinned toolchain is FAILED_PRECONDITION from the resolver, before inputs.
	d := e.action(t, &repb.Command{Arguments: []string{"echo"}}, root, func(a *repb.Action) {
		a.Platform = &repb.Platform{Properties: []*repb.Platform_Property{{Name: "container-image", Value: "unpinned:latest"}}}
	})
	resp, err := e.run(t, d)
	if err != nil || codes.Code(resp.GetStatus().GetCode()) != codes.FailedPrecondition {
		t.Fatalf("unpinned toolchain: %v %v", err, resp.GetStatus())
	}
}

func TestFailuresAreNotCached(t *testing.T) {
	e := newTestEnv(t, 1)
	root := e.put(t, &repb.Directory{})
	for _, c := range []struct {
		name string
		cmd  *repb.Command
		mod  func(*repb.Action)
		code codes.Code
	}{
		{"non-zero exit", &repb.Command{Arguments: []string{"exit", "3"}}, nil, codes.OK},
		{"timeout", &repb.Command{Arguments: []string{"timeout"}}, nil, codes.DeadlineExceeded},
		{"do_not_cache", &repb.Command{Arguments: []string{"echo"}}, func(a *repb.Action) { a.DoNotCache = true }, codes.OK},
	} {
		d := e.action(t, c.cmd, root, c.mod)
		resp, err := e.run(t, d)
		if err != nil || codes.Code(resp.GetStatus().GetCode()) != c.code {
			t.Fatalf("%s: %v %v", c.name, err, resp.GetStatus())
		}
		if _, err := e.ac.Get(context.Background(), cache.ActionKey{Action: d}); status.Code(err) != codes.NotFound {
			t.Fatalf("%s: result was cached", c.name)
		}
		// A failed action's client gets a readable account of the sandbox's end.
		lf := resp.GetServerLogs()["kiln-sandbox"]
		failed := resp.GetResult().GetExitCode() != 0
		if failed != (lf != nil) {
			t.Fatalf("%s: exit %d, server logs %v", c.name, resp.GetResult().GetExitCode(), resp.GetServerLogs())
		}
		if lf != nil {
			ld, _ := cache.FromProto(lf.GetDigest())
			report, err := cache.ReadAll(context.Background(), e.cas, ld, 0)
			if err != nil || !lf.GetHumanReadable() || !strings.Contains(string(report), "exit code   "+fmt.Sprint(resp.GetResult().GetExitCode())) {
				t.Fatalf("%s: report %q %v", c.name, report, err)
			}
			if c.name == "timeout" && !strings.Contains(string(report), "timed out") {
				t.Fatalf("timeout report does not say so: %q", report)
			}
		}
	}
}

// TestMergeAndCancel: identical actions in flight run once; an execution whose every
// client leaves is cancelled; a full queue pushes back.
func TestMergeAndCancel(t *testing.T) {
	e := newTestEnv(t, 1)
	e.sb.release = make(chan struct{})
	e.sb.started = make(chan string, 16)
	root := e.put(t, &repb.Directory{})
	d := e.action(t, &repb.Command{Arguments: []string{"block", "write", "o", "x"}, OutputFiles: []string{"o"}}, root, nil)
	var ws []*Watch
	for i := 0; i < 5; i++ {
		w, err := e.sched.Submit(context.Background(), Request{ActionDigest: d})
		if err != nil {
			t.Fatal(err)
		}
		ws = append(ws, w)
	}
	<-e.sb.started
	close(e.sb.release)
	var wg sync.WaitGroup
	for _, w := range ws {
		wg.Add(1)
		go func(w *Watch) {
			defer wg.Done()
			defer w.Close()
			resp, err := w.Response(context.Background())
			if err != nil || len(resp.GetResult().GetOutputFiles()) != 1 {
				t.Errorf("merged waiter: %v %v", err, resp)
			}
		}(w)
	}
	wg.Wait()
	if n := e.sb.runs.Load(); n != 1 {
		t.Fatalf("5 identical actions ran %d times", n)
	}

	// Cancellation: one client, it leaves, the running action is killed.
	e.sb.release = make(chan struct{})
	d2 := e.action(t, &repb.Command{Arguments: []string{"block", "echo", "2"}}, root, nil)
	w, err := e.sched.Submit(context.Background(), Request{ActionDigest: d2})
	if err != nil {
		t.Fatal(err)
	}
	<-e.sb.started
	w2, _ := e.sched.Wait(w.Name(), "")
	w.Close()
	w2.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		e.sched.mu.Lock()
		done := e.sched.ops[w.Name()].exec.resp != nil
		e.sched.mu.Unlock()
		if done {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("execution not cancelled after every client left")
		}
		time.Sleep(10 * time.Millisecond)
	}

	// Backpressure: one running, MaxQueue (4) waiting, the next is refused.
	e.sb.release = make(chan struct{})
	var held []*Watch
	defer func() { // let every run finish before the test's directories go
		close(e.sb.release)
		for _, w := range held {
			w.Response(context.Background())
			w.Close()
		}
	}()
	for i := 0; i < 5; i++ {
		w, err := e.sched.Submit(context.Background(), Request{ActionDigest: e.action(t, &repb.Command{Arguments: []string{"block", "echo", fmt.Sprint("q", i)}}, root, nil)})
		if err != nil {
			t.Fatalf("submit %d: %v", i, err)
		}
		held = append(held, w)
		if i == 0 {
			<-e.sb.started
		}
	}
	_, err = e.sched.Submit(context.Background(), Request{ActionDigest: e.action(t, &repb.Command{Arguments: []string{"echo", "overflow"}}, root, nil)})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("queue over its bound: %v, want RESOURCE_EXHAUSTED", err)
	}
}

// TestCancelOperationMerged: clients merged into one run each get their own
// operation; one client's CancelOperation ends its own wait only, the run goes on for
// the others, and it is cancelled when the last one cancels.
func TestCancelOperationMerged(t *testing.T) {
	e := newTestEnv(t, 1)
	e.sb.release = make(chan struct{})
	e.sb.started = make(chan string, 16)
	root := e.put(t, &repb.Directory{})
	d := e.action(t, &repb.Command{Arguments: []string{"block", "write", "o", "x"}, OutputFiles: []string{"o"}}, root, nil)
	a, err := e.sched.Submit(context.Background(), Request{ActionDigest: d})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	<-e.sb.started
	b, err := e.sched.Submit(context.Background(), Request{ActionDigest: d})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if a.Name() == b.Name() {
		t.Fatalf("merged clients share the operation name %s: one could cancel the other's", a.Name())
	}
	// A second watch on b's operation (WaitExecution) follows b's cancellation too.
	b2, err := e.sched.Wait(b.Name(), "")
	if err != nil {
		t.Fatal(err)
	}
	defer b2.Close()
	srv := &executionServer{s: e.sched}
	if _, err := srv.CancelOperation(context.Background(), &longrunningpb.CancelOperationRequest{Name: b.Name()}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, w := range []*Watch{b, b2} {
		resp, err := w.Response(ctx)
		if err != nil || codes.Code(resp.GetStatus().GetCode()) != codes.Canceled {
			t.Fatalf("the cancelled operation answered %v %v, want CANCELLED", resp, err)
		}
	}
	op, err := srv.GetOperation(context.Background(), &longrunningpb.GetOperationRequest{Name: a.Name()})
	if err != nil || op.GetDone() {
		t.Fatalf("the other client's operation after one cancel: %v %v, want still running", op, err)
	}
	close(e.sb.release)
	resp, err := a.Response(ctx)
	if err != nil || resp.GetStatus().GetCode() != 0 || len(resp.GetResult().GetOutputFiles()) != 1 {
		t.Fatalf("the client that did not cancel got %v %v, want the run's outputs", resp, err)
	}
	if n := e.sb.runs.Load(); n != 1 {
		t.Fatalf("the merged action ran %d times", n)
	}
	// Cancelling a finished operation does nothing; an unknown one is NOT_FOUND.
	if _, err := srv.CancelOperation(context.Background(), &longrunningpb.CancelOperationRequest{Name: a.Name()}); err != nil {
		t.Fatalf("cancel of a finished operation: %v", err)
	}
	if resp, _ := a.Response(ctx); resp.GetStatus().GetCode() != 0 {
		t.Fatalf("a finished operation changed on cancel: %v", resp)
	}
	if _, err := srv.CancelOperation(context.Background(), &longrunningpb.CancelOperationRequest{Name: "operations/nope"}); status.Code(err) != codes.NotFound {
		t.Fatalf("cancel of an unknown operation: %v, want NOT_FOUND", err)
	}

	// The last client to cancel cancels the run: the blocked action is killed.
	e.sb.release = make(chan struct{})
	defer close(e.sb.release)
	d2 := e.action(t, &repb.Command{Arguments: []string{"block", "echo", "2"}}, root, nil)
	c, err := e.sched.Submit(context.Background(), Request{ActionDigest: d2})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	<-e.sb.started
	if _, err := srv.CancelOperation(context.Background(), &longrunningpb.CancelOperationRequest{Name: c.Name()}); err != nil {
		t.Fatal(err)
	}
	for {
		e.sched.mu.Lock()
		resp := e.sched.ops[c.Name()].exec.resp
		e.sched.mu.Unlock()
		if resp != nil {
			// The fake's "block" answers its ctx ending with a kill.
			if codes.Code(resp.GetStatus().GetCode()) != codes.Canceled && resp.GetResult().GetExitCode() != 137 {
				t.Fatalf("run of a cancelled sole client ended with %v, want it killed or CANCELLED", resp)
			}
			break
		}
		if ctx.Err() != nil {
			t.Fatal("the run was not cancelled when its only client cancelled")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestOperationRetention: a finished operation answers WaitExecution for Retain, then
// is forgotten (NOT_FOUND).
func TestOperationRetention(t *testing.T) {
	e := newTestEnv(t, 1)
	e.sched = NewScheduler(e.sched.exec, SchedulerConfig{Concurrency: 1, Retain: 200 * time.Millisecond})
	root := e.put(t, &repb.Directory{})
	run := func(word string) string {
		w, err := e.sched.Submit(context.Background(), Request{ActionDigest: e.action(t, &repb.Command{Arguments: []string{"echo", word}}, root, nil)})
		if err != nil {
			t.Fatal(err)
		}
		defer w.Close()
		if _, err := w.Response(context.Background()); err != nil {
			t.Fatal(err)
		}
		return w.Name()
	}
	first := run("a")
	if w, err := e.sched.Wait(first, ""); err != nil {
		t.Fatalf("finished operation within its retention: %v", err)
	} else {
		w.Close()
	}
	time.Sleep(300 * time.Millisecond)
	run("b") // finishing another operation forgets the expired ones
	if _, err := e.sched.Wait(first, ""); status.Code(err) != codes.NotFound {
		t.Fatalf("operation past its retention: %v, want NOT_FOUND", err)
	}
}

// TestOperationOwner: an operation answers only the client that started it; to
// another it is NOT_FOUND, as if it did not exist.
func TestOperationOwner(t *testing.T) {
	e := newTestEnv(t, 1)
	e.sb.release = make(chan struct{})
	root := e.put(t, &repb.Directory{})
	d := e.action(t, &repb.Command{Arguments: []string{"block", "echo", "owned"}}, root, nil)
	w, err := e.sched.Submit(context.Background(), Request{ActionDigest: d, Owner: "ci-a"})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { // let the run finish before the test's directories go
		close(e.sb.release)
		w.Response(context.Background())
		w.Close()
	}()
	if _, err := e.sched.Wait(w.Name(), "ci-b"); status.Code(err) != codes.NotFound {
		t.Errorf("WaitExecution by another client: %v, want NOT_FOUND", err)
	}
	if _, err := e.sched.Get(w.Name(), "ci-b"); status.Code(err) != codes.NotFound {
		t.Errorf("GetOperation by another client: %v, want NOT_FOUND", err)
	}
	if err := e.sched.Cancel(w.Name(), "ci-b"); status.Code(err) != codes.NotFound {
		t.Errorf("CancelOperation by another client: %v, want NOT_FOUND", err)
	}
	if err := e.sched.Delete(w.Name(), "ci-b"); status.Code(err) != codes.NotFound {
		t.Errorf("DeleteOperation by another client: %v, want NOT_FOUND", err)
	}
	if op, err := e.sched.Get(w.Name(), "ci-a"); err != nil || op.GetDone() {
		t.Fatalf("the owner's GetOperation: %v %v, want it running", op, err)
	}
	w2, err := e.sched.Wait(w.Name(), "ci-a")
	if err != nil {
		t.Fatalf("the owner's WaitExecution: %v", err)
	}
	w2.Close()
}

// TestCancelGrace: a client whose stream dropped (its only watch closed) and that comes
// back with WaitExecution within the grace period finds its execution still running and
// gets the result; nothing ran twice.
func TestCancelGrace(t *testing.T) {
	e := newTestEnv(t, 1)
	e.sched = NewScheduler(e.sched.exec, SchedulerConfig{Concurrency: 1, CancelGrace: time.Hour})
	e.sb.release = make(chan struct{})
	e.sb.started = make(chan string, 4)
	root := e.put(t, &repb.Directory{})
	d := e.action(t, &repb.Command{Arguments: []string{"block", "write", "o", "x"}, OutputFiles: []string{"o"}}, root, nil)
	w, err := e.sched.Submit(context.Background(), Request{ActionDigest: d})
	if err != nil {
		t.Fatal(err)
	}
	<-e.sb.started
	w.Close() // the stream dropped
	back, err := e.sched.Wait(w.Name(), "")
	if err != nil {
		t.Fatalf("WaitExecution after the stream dropped: %v", err)
	}
	defer back.Close()
	close(e.sb.release)
	resp, err := back.Response(context.Background())
	if err != nil || resp.GetStatus().GetCode() != 0 || len(resp.GetResult().GetOutputFiles()) != 1 {
		t.Fatalf("the client that came back got %v %v, want the run's result", resp, err)
	}
	if n := e.sb.runs.Load(); n != 1 {
		t.Fatalf("ran %d times", n)
	}
}

// TestCachedRetention: operations answered from the action cache are kept a minute,
// others for Retain.
func TestCachedRetention(t *testing.T) {
	s := &Scheduler{cfg: SchedulerConfig{Retain: 10 * time.Minute}}
	cached := &operation{exec: &execution{resp: &repb.ExecuteResponse{CachedResult: true}}}
	ran := &operation{exec: &execution{resp: &repb.ExecuteResponse{}}}
	if got := s.retention(cached); got != cachedRetain {
		t.Errorf("cached: %v, want %v", got, cachedRetain)
	}
	if got := s.retention(ran); got != 10*time.Minute {
		t.Errorf("executed: %v, want 10m", got)
	}
}
