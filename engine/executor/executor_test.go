package executor_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/executor"
	"github.com/kilnbuild/kiln/engine/executor/executortest"
	"github.com/kilnbuild/kiln/internal/dirplace"
	"github.com/kilnbuild/kiln/internal/dirplace/dirplacetest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

// run answers Execute for action d as a client sees it: an invalid action is an error,
// a cached one its result, anything else the response of one execution.
func run(t *testing.T, e *executortest.Env, d cache.Digest) (*repb.ExecuteResponse, error) {
	t.Helper()
	ctx := context.Background()
	a, err := e.Exec.LoadAction(ctx, d)
	if err != nil {
		return nil, err
	}
	if r, err := e.Exec.CachedResult(ctx, "", d); err == nil {
		return &repb.ExecuteResponse{Result: r, CachedResult: true}, nil
	}
	ex, err := e.Exec.Execute(ctx, executor.Request{ActionDigest: d, Queued: time.Now()}, a)
	if err != nil {
		return &repb.ExecuteResponse{Status: status.Convert(err).Proto()}, nil
	}
	return ex.Response(), nil
}

func TestExecuteCollectsOutputs(t *testing.T) {
	e := executortest.NewEnv(t, nil)
	src := e.PutBytes(t, []byte("input data"))
	root := e.Put(t, &repb.Directory{
		Files:       []*repb.FileNode{{Name: "in.txt", Digest: src.Proto()}},
		Directories: []*repb.DirectoryNode{{Name: "sub", Digest: e.Put(t, &repb.Directory{}).Proto()}},
	})
	cmd := &repb.Command{
		Arguments:         []string{"cat", "in.txt", "out/copy", "mkdir", "out/d/e", "write", "out/d/e/f", "F", "symlink", "e/f", "out/d/link", "symlink", "../in.txt", "out/rel"},
		OutputFiles:       []string{"out/copy", "out/missing", "out/rel"},
		OutputDirectories: []string{"out/d"},
	}
	resp, err := run(t, e, e.Action(t, cmd, root, nil))
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
	if err := cache.ReadProto(context.Background(), e.CAS, td, tree, 0); err != nil {
		t.Fatal(err)
	}
	if len(tree.GetRoot().GetDirectories()) != 1 || len(tree.GetRoot().GetSymlinks()) != 1 || len(tree.GetChildren()) != 1 {
		t.Fatalf("tree %v", tree)
	}
	// The stored input blob was hardlinked, never written: it still verifies.
	if got, err := cache.ReadAll(context.Background(), e.CAS, src, 0); err != nil || string(got) != "input data" {
		t.Fatalf("input blob after the action: %q %v", got, err)
	}
	md := r.GetExecutionMetadata()
	if md.GetWorkerStartTimestamp() == nil || md.GetOutputUploadCompletedTimestamp() == nil || md.GetQueuedTimestamp() == nil {
		t.Fatalf("metadata incomplete: %v", md)
	}
	// Second Execute: a cache hit, no run.
	runs := e.Sandbox.Runs.Load()
	resp2, _ := run(t, e, e.Action(t, cmd, root, nil))
	if !resp2.GetCachedResult() || e.Sandbox.Runs.Load() != runs {
		t.Fatal("second execute was not served from the action cache")
	}
}

// TestOutputsThroughPlantedSymlinks: an action that replaces its output directory or
// working tree with symlinks to host paths gets nothing of the host collected.
func TestOutputsThroughPlantedSymlinks(t *testing.T) {
	e := executortest.NewEnv(t, nil)
	secret := filepath.Join(t.TempDir(), "secret")
	os.WriteFile(secret, []byte("host secret"), 0o600)
	root := e.Put(t, &repb.Directory{})
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
		resp, err := run(t, e, e.Action(t, c.cmd, root, nil))
		if err != nil {
			t.Fatal(err)
		}
		if resp.GetStatus().GetCode() == 0 {
			for _, f := range resp.GetResult().GetOutputFiles() {
				b, _ := cache.ReadAll(context.Background(), e.CAS, mustDigest(f.GetDigest()), 0)
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
	e := executortest.NewEnv(t, nil)
	blob := e.PutBytes(t, []byte("x"))
	f := func(n string) *repb.FileNode { return &repb.FileNode{Name: n, Digest: blob.Proto()} }
	empty := e.Put(t, &repb.Directory{})
	// A DAG that doubles at every level: 25 blobs claim 2^24 nodes.
	level := e.Put(t, &repb.Directory{Files: []*repb.FileNode{f("leaf")}})
	for i := 0; i < 24; i++ {
		level = e.Put(t, &repb.Directory{Directories: []*repb.DirectoryNode{{Name: "a", Digest: level.Proto()}, {Name: "b", Digest: level.Proto()}}})
	}
	deep := empty
	for i := 0; i < executor.MaxTreeDepth+2; i++ {
		deep = e.Put(t, &repb.Directory{Directories: []*repb.DirectoryNode{{Name: "d", Digest: deep.Proto()}}})
	}
	cases := []struct {
		name string
		root cache.Digest
	}{
		{"dotdot name", e.Put(t, &repb.Directory{Files: []*repb.FileNode{f("..")}})},
		{"dot name", e.Put(t, &repb.Directory{Directories: []*repb.DirectoryNode{{Name: ".", Digest: empty.Proto()}}})},
		{"slash in name", e.Put(t, &repb.Directory{Files: []*repb.FileNode{f("a/b")}})},
		{"empty name", e.Put(t, &repb.Directory{Files: []*repb.FileNode{f("")}})},
		{"unsorted", e.Put(t, &repb.Directory{Files: []*repb.FileNode{f("b"), f("a")}})},
		{"duplicate", e.Put(t, &repb.Directory{Files: []*repb.FileNode{f("a"), f("a")}})},
		{"file and dir same name", e.Put(t, &repb.Directory{Files: []*repb.FileNode{f("a")}, Directories: []*repb.DirectoryNode{{Name: "a", Digest: empty.Proto()}}})},
		{"absolute symlink", e.Put(t, &repb.Directory{Symlinks: []*repb.SymlinkNode{{Name: "l", Target: "/etc/passwd"}}})},
		{"symlink escaping", e.Put(t, &repb.Directory{Symlinks: []*repb.SymlinkNode{{Name: "l", Target: "../x"}}})},
		{"symlink escaping via chain", e.Put(t, &repb.Directory{
			Directories: []*repb.DirectoryNode{{Name: "d", Digest: e.Put(t, &repb.Directory{Symlinks: []*repb.SymlinkNode{{Name: "up", Target: ".."}}}).Proto()}},
			Symlinks:    []*repb.SymlinkNode{{Name: "l", Target: "d/up/d/up/.."}}})},
		{"symlink loop", e.Put(t, &repb.Directory{Symlinks: []*repb.SymlinkNode{{Name: "a", Target: "b"}, {Name: "b", Target: "a"}}})},
		{"self loop", e.Put(t, &repb.Directory{Symlinks: []*repb.SymlinkNode{{Name: "a", Target: "a/x"}}})},
		{"bad file digest", e.Put(t, &repb.Directory{Files: []*repb.FileNode{{Name: "a", Digest: &repb.Digest{Hash: "nope"}}}})},
		{"16M-node claim", level},
		{"too deep", deep},
	}
	for _, c := range cases {
		runs := e.Sandbox.Runs.Load()
		resp, err := run(t, e, e.Action(t, &repb.Command{Arguments: []string{"echo"}}, c.root, nil))
		code := status.Code(err)
		if err == nil {
			code = codes.Code(resp.GetStatus().GetCode())
		}
		if code != codes.InvalidArgument {
			t.Errorf("%s: got %v (%v %v), want INVALID_ARGUMENT", c.name, code, err, resp.GetStatus())
		}
		if e.Sandbox.Runs.Load() != runs {
			t.Errorf("%s: the action ran", c.name)
		}
	}
}

// TestMissingInputs: absent blobs are FAILED_PRECONDITION naming each one.
func TestMissingInputs(t *testing.T) {
	e := executortest.NewEnv(t, nil)
	ghost := cache.DigestOf([]byte("never uploaded"))
	ghostDir := cache.DigestOf([]byte("not a directory either"))
	root := e.Put(t, &repb.Directory{Files: []*repb.FileNode{{Name: "a", Digest: ghost.Proto()}},
		Directories: []*repb.DirectoryNode{{Name: "d", Digest: ghostDir.Proto()}}})
	resp, err := run(t, e, e.Action(t, &repb.Command{Arguments: []string{"echo"}}, root, nil))
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
	_, err = e.Exec.LoadAction(context.Background(), cache.DigestOf([]byte("no such action")))
	if len(cache.MissingFromError(err)) != 1 {
		t.Fatalf("missing action: %v", err)
	}
}

func TestCommandValidation(t *testing.T) {
	e := executortest.NewEnv(t, nil)
	root := e.Put(t, &repb.Directory{})
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
		_, err := e.Exec.LoadAction(context.Background(), e.Action(t, c.cmd, root, c.mod))
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: got %v, want INVALID_ARGUMENT", c.name, err)
		}
	}
	// An unpinned toolchain is FAILED_PRECONDITION from the resolver, before inputs.
	d := e.Action(t, &repb.Command{Arguments: []string{"echo"}}, root, func(a *repb.Action) {
		a.Platform = &repb.Platform{Properties: []*repb.Platform_Property{{Name: "container-image", Value: "unpinned:latest"}}}
	})
	resp, err := run(t, e, d)
	if err != nil || codes.Code(resp.GetStatus().GetCode()) != codes.FailedPrecondition {
		t.Fatalf("unpinned toolchain: %v %v", err, resp.GetStatus())
	}
}

func TestFailuresAreNotCached(t *testing.T) {
	e := executortest.NewEnv(t, nil)
	root := e.Put(t, &repb.Directory{})
	for _, c := range []struct {
		name string
		cmd  *repb.Command
		mod  func(*repb.Action)
		code codes.Code
	}{
		{"non-zero exit", &repb.Command{Arguments: []string{"exit", "3"}}, nil, codes.OK},
		{"timeout", &repb.Command{Arguments: []string{"timeout"}}, nil, codes.DeadlineExceeded},
		{"do_not_cache", &repb.Command{Arguments: []string{"echo"}}, func(a *repb.Action) { a.DoNotCache = true }, codes.OK},
		{"stdout truncated at the cap", &repb.Command{Arguments: []string{"truncate"}}, nil, codes.OK},
	} {
		d := e.Action(t, c.cmd, root, c.mod)
		resp, err := run(t, e, d)
		if err != nil || codes.Code(resp.GetStatus().GetCode()) != c.code {
			t.Fatalf("%s: %v %v", c.name, err, resp.GetStatus())
		}
		if _, err := e.AC.Get(context.Background(), cache.ActionKey{Action: d}); status.Code(err) != codes.NotFound {
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
			report, err := cache.ReadAll(context.Background(), e.CAS, ld, 0)
			if err != nil || !lf.GetHumanReadable() || !strings.Contains(string(report), "exit code   "+fmt.Sprint(resp.GetResult().GetExitCode())) {
				t.Fatalf("%s: report %q %v", c.name, report, err)
			}
			if c.name == "timeout" && !strings.Contains(string(report), "timed out") {
				t.Fatalf("timeout report does not say so: %q", report)
			}
		}
	}
}

// TestOutputStatusCodes (issue 19, case 7): outputs of the wrong type, and absolute
// output symlinks while Capabilities says DISALLOWED, are FAILED_PRECONDITION, as the
// REAPI spec says; nothing is cached.
func TestOutputStatusCodes(t *testing.T) {
	e := executortest.NewEnv(t, nil)
	root := e.Put(t, &repb.Directory{})
	for _, c := range []struct {
		name string
		cmd  *repb.Command
	}{
		{"output_files naming a directory", &repb.Command{Arguments: []string{"mkdir", "d"}, OutputFiles: []string{"d"}}},
		{"output_directories naming a file", &repb.Command{Arguments: []string{"rm", "f", "write", "f", "x"}, OutputDirectories: []string{"f"}}},
		{"absolute output symlink", &repb.Command{Arguments: []string{"symlink", "/etc/passwd", "l"}, OutputPaths: []string{"l"}}},
		{"absolute symlink in an output directory", &repb.Command{Arguments: []string{"mkdir", "d", "symlink", "/etc", "d/l"}, OutputDirectories: []string{"d"}}},
	} {
		d := e.Action(t, c.cmd, root, nil)
		resp, err := run(t, e, d)
		if err != nil {
			t.Fatal(err)
		}
		if got := codes.Code(resp.GetStatus().GetCode()); got != codes.FailedPrecondition {
			t.Errorf("%s: %v (%s), want FAILED_PRECONDITION", c.name, got, resp.GetStatus().GetMessage())
		}
		if _, err := e.AC.Get(context.Background(), cache.ActionKey{Action: d}); status.Code(err) != codes.NotFound {
			t.Errorf("%s: result was cached", c.name)
		}
	}
}

// countingCAS counts reads and writes of blobs through the CAS.
type countingCAS struct {
	cache.BlobStore
	gets, puts atomic.Int64
}

func (c *countingCAS) Get(ctx context.Context, d cache.Digest, off int64) (io.ReadCloser, error) {
	c.gets.Add(1)
	return c.BlobStore.Get(ctx, d, off)
}

func (c *countingCAS) Put(ctx context.Context, d cache.Digest, r io.Reader) error {
	c.puts.Add(1)
	return c.BlobStore.Put(ctx, d, r)
}

// TestLocalFilesOrCopies: with the store's LocalFiles the executor hardlinks a
// read-only input (the action sees the blob's own inode) and adopts an output without
// writing its bytes through the CAS; without them (nil), it copies both ways.
func TestLocalFilesOrCopies(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("an adopted output is made root-owned first: needs root")
	}
	for _, local := range []bool{true, false} {
		var cas *countingCAS
		e := executortest.NewEnv(t, func(c *executor.ExecutorConfig) {
			cas = &countingCAS{BlobStore: c.CAS}
			c.CAS = cas
			if !local {
				c.Local = nil
			}
		})
		in := e.PutBytes(t, []byte("input bytes"))
		root := e.Put(t, &repb.Directory{Files: []*repb.FileNode{{Name: "in.txt", Digest: in.Proto()}}})
		linked := false
		e.Sandbox.Inspect = func(j executor.Job) {
			a, errA := os.Stat(filepath.Join(j.ExecRoot, "in.txt"))
			b, errB := os.Stat(e.Store.BlobPath(in))
			linked = errA == nil && errB == nil && os.SameFile(a, b)
		}
		d := e.Action(t, &repb.Command{Arguments: []string{"write", "out", "output bytes"}, OutputFiles: []string{"out"}}, root, nil)
		gets, puts := cas.gets.Load(), cas.puts.Load()
		resp, err := run(t, e, d)
		if err != nil || resp.GetStatus().GetCode() != 0 || len(resp.GetResult().GetOutputFiles()) != 1 {
			t.Fatalf("local %v: %v %v", local, err, resp)
		}
		if linked != local {
			t.Errorf("local files %v: input hardlinked from the store = %v", local, linked)
		}
		// Reads: the Action, Command and input root directory, plus the input when copied.
		if got, want := cas.gets.Load()-gets, int64(3); local && got != want || !local && got != want+1 {
			t.Errorf("local files %v: %d blob reads through the CAS", local, got)
		}
		// Writes: none when adopted; stdout and the output when copied.
		out, _ := cache.FromProto(resp.GetResult().GetOutputFiles()[0].GetDigest())
		if got, err := cache.ReadAll(context.Background(), e.CAS, out, 0); err != nil || string(got) != "output bytes" {
			t.Fatalf("local files %v: output %q %v", local, got, err)
		}
		if got := cas.puts.Load() - puts; local && got != 0 || !local && got != 2 {
			t.Errorf("local files %v: %d blob writes through the CAS", local, got)
		}
	}
}

// TestQuarantinedProduct: a build that produces a quarantined blob fails and is not
// cached; a run made only to compare products (kiln rebuild) may reproduce it.
func TestQuarantinedProduct(t *testing.T) {
	bad := cache.DigestOf([]byte("tampered"))
	e := executortest.NewEnv(t, func(c *executor.ExecutorConfig) {
		c.Quarantined = func(hash string) bool { return hash == bad.Hash }
	})
	d := e.Action(t, &repb.Command{Arguments: []string{"write", "out", "tampered"}, OutputFiles: []string{"out"}}, e.Put(t, &repb.Directory{}), nil)
	resp, err := run(t, e, d)
	if err != nil || codes.Code(resp.GetStatus().GetCode()) != codes.FailedPrecondition || !strings.Contains(resp.GetStatus().GetMessage(), "quarantined") {
		t.Fatalf("build of a quarantined product: %v %v", resp.GetStatus(), err)
	}
	if _, err := e.AC.Get(context.Background(), cache.ActionKey{Action: d}); status.Code(err) != codes.NotFound {
		t.Fatalf("a quarantined product was cached: %v", err)
	}
	a, err := e.Exec.LoadAction(context.Background(), d)
	if err != nil {
		t.Fatal(err)
	}
	ex, err := e.Exec.Execute(context.Background(), executor.Request{ActionDigest: d, NoCache: true, CompareOnly: true}, a)
	if err != nil || len(ex.Produced) != 1 || ex.Produced[0].Digest != bad {
		t.Fatalf("compare-only run: %v %v", ex, err)
	}
}

// TestWorkDirSpreadsRunDirs: on ext2/3/4 the executor asks for each run's directory
// to be placed in a block group of its own choosing (chattr +T on the work dir).
func TestWorkDirSpreadsRunDirs(t *testing.T) {
	e := executortest.NewEnv(t, nil)
	dirplacetest.SkipUnlessExt(t, e.Config.WorkDir)
	if m, err := dirplace.Marked(e.Config.WorkDir); err != nil || !m {
		t.Fatalf("work dir: marked %v, %v", m, err)
	}
}
