// Package executortest holds fakes for tests of what runs actions: a sandbox that
// interprets a tiny command language on the host exec root, a toolchain resolver, and
// an executor over a disk store wired with them. The real sandbox is exercised by the
// end-to-end tests.
package executortest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/disk"
	"github.com/kilnbuild/kiln/engine/executor"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// Sandbox runs a command's words on the host exec root: write PATH CONTENT, mkdir
// PATH, symlink TARGET PATH, rm PATH, exit N, block (until Release or cancellation),
// timeout, truncate (stdout hit the cap), cat SRC DST, echo.
type Sandbox struct {
	Runs    atomic.Int64
	Release chan struct{}      // if set, "block" waits on it
	Started chan string        // if set, receives each run's arguments
	Inspect func(executor.Job) // if set, called first in each run
}

// Run implements executor.Sandbox.
func (f *Sandbox) Run(ctx context.Context, j executor.Job) (executor.JobResult, error) {
	f.Runs.Add(1)
	if f.Inspect != nil {
		f.Inspect(j)
	}
	if f.Started != nil {
		f.Started <- strings.Join(j.Args, " ")
	}
	cwd := filepath.Join(j.ExecRoot, j.Cwd)
	res := executor.JobResult{PolicyDigest: "sha256:fake"}
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
			case <-f.Release:
			case <-ctx.Done():
				res.ExitCode, res.Signal = 137, "KILL"
				return res, nil
			}
		case "timeout":
			res.TimedOut, res.ExitCode = true, 137
		case "truncate": // stdout hit the sandbox's cap
			res.StdoutTruncated = true
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

// Toolchains resolves every reference to one digest and "/" as its root; the tag
// "unpinned:latest" is FAILED_PRECONDITION.
type Toolchains struct{}

// Resolve implements executor.Toolchains.
func (Toolchains) Resolve(_ context.Context, ref string) (string, error) {
	if ref == "unpinned:latest" {
		return "", status.Error(codes.FailedPrecondition, "unpinned")
	}
	return "sha256:" + strings.Repeat("0", 64), nil
}

// RootFS implements executor.Toolchains.
func (Toolchains) RootFS(context.Context, string) (string, error) { return "/", nil }

// Env is an executor over a fresh disk store, running the fake Sandbox as the user
// running the test.
type Env struct {
	Store   *disk.Store
	CAS     cache.BlobStore
	AC      cache.ActionCache
	Exec    *executor.Executor
	Sandbox *Sandbox
	Config  executor.ExecutorConfig // as the executor was made
}

// NewEnv makes an Env; mod, if set, changes the executor's configuration first.
func NewEnv(t testing.TB, mod func(*executor.ExecutorConfig)) *Env {
	t.Helper()
	dir := t.TempDir()
	store, err := disk.Open(context.Background(), filepath.Join(dir, "store"), disk.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	cas := cache.WithEmptyBlob(store)
	e := &Env{Store: store, CAS: cas, AC: cache.WithCompletenessCheck(store.ActionCache(), cas), Sandbox: &Sandbox{}}
	e.Config = executor.ExecutorConfig{CAS: cas, Local: store, AC: e.AC, Sandbox: e.Sandbox, Toolchains: Toolchains{},
		WorkDir: filepath.Join(dir, "exec"), UID: os.Getuid(), GID: os.Getgid(), MaxTimeout: time.Hour}
	if mod != nil {
		mod(&e.Config)
	}
	if e.Exec, err = executor.NewExecutor(e.Config); err != nil {
		t.Fatal(err)
	}
	return e
}

// Put stores m and returns its digest.
func (e *Env) Put(t testing.TB, m proto.Message) cache.Digest {
	t.Helper()
	d, err := cache.PutProto(context.Background(), e.CAS, m)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// PutBytes stores b and returns its digest.
func (e *Env) PutBytes(t testing.TB, b []byte) cache.Digest {
	t.Helper()
	d, err := cache.PutBytes(context.Background(), e.CAS, b)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// Action stores an Action with the given command and input root; mod may change it.
func (e *Env) Action(t testing.TB, cmd *repb.Command, root cache.Digest, mod func(*repb.Action)) cache.Digest {
	t.Helper()
	a := &repb.Action{CommandDigest: e.Put(t, cmd).Proto(), InputRootDigest: root.Proto()}
	if mod != nil {
		mod(a)
	}
	return e.Put(t, a)
}

// Run loads and executes action d as a build (its result cached if it may be).
func (e *Env) Run(t testing.TB, d cache.Digest) (*executor.Execution, error) {
	t.Helper()
	ctx := context.Background()
	a, err := e.Exec.LoadAction(ctx, d)
	if err != nil {
		return nil, err
	}
	return e.Exec.Execute(ctx, executor.Request{ActionDigest: d, Queued: time.Now()}, a)
}
