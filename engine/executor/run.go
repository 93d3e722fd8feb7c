package executor

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/auth"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// sandboxRun is the innermost stage: it resolves the toolchain, fetches and lays out
// the input tree in a fresh exec root, runs the command in the sandbox and collects
// the outputs, stdout and stderr into the CAS. The exec root is gone when it returns.
type sandboxRun struct{ cfg *ExecutorConfig }

func (r sandboxRun) Execute(ctx context.Context, req Request, a *Action) (*Execution, error) {
	cfg := r.cfg
	md := &repb.ExecutedActionMetadata{Worker: cfg.WorkerName, WorkerStartTimestamp: timestamppb.Now()}
	if !req.Queued.IsZero() {
		md.QueuedTimestamp = timestamppb.New(req.Queued)
	}
	ex := &Execution{Action: a.Action, Command: a.Command}

	// Toolchain first: an unpinned image is refused before any input is fetched.
	tcDigest, err := cfg.Toolchains.Resolve(ctx, a.Platform.ContainerImage)
	if err != nil {
		return nil, err
	}
	ex.Toolchain = tcDigest
	md.InputFetchStartTimestamp = timestamppb.Now()
	rootfs, err := cfg.Toolchains.RootFS(ctx, tcDigest)
	if err != nil {
		return nil, err
	}
	inputRoot, _ := cache.FromProto(a.Action.GetInputRootDigest())
	tree := a.inputs
	if tree == nil {
		if tree, err = fetchTree(ctx, cfg.CAS, inputRoot); err != nil {
			return nil, err
		}
	}
	for _, f := range tree.files {
		ex.Inputs = append(ex.Inputs, ProducedFile{Path: f.path, Digest: f.digest})
	}
	for _, l := range tree.symlinks {
		ex.Inputs = append(ex.Inputs, ProducedFile{Path: l.path, SymlinkTarget: l.target})
	}
	dir, err := newRunDir(cfg.WorkDir)
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	execRoot := filepath.Join(dir, "root")
	if err := os.Mkdir(execRoot, 0o755); err != nil {
		return nil, status.Errorf(codes.Internal, "create exec root: %v", err)
	}
	m := &materializer{cas: cfg.CAS, local: cfg.Local, uid: cfg.UID, gid: cfg.GID}
	if err := m.materialize(ctx, execRoot, tree); err != nil {
		return nil, err
	}
	if err := makeOutputDirs(execRoot, a.Command, cfg.UID, cfg.GID); err != nil {
		return nil, err
	}
	md.InputFetchCompletedTimestamp = timestamppb.Now()

	job := Job{
		RootFS: rootfs, ExecRoot: execRoot, Cwd: a.Command.GetWorkingDirectory(),
		Args: a.Command.GetArguments(), Env: envList(a.Command),
		Stdout: filepath.Join(dir, "stdout"), Stderr: filepath.Join(dir, "stderr"),
		Timeout: a.Timeout, Variation: req.Variation,
	}
	md.ExecutionStartTimestamp = timestamppb.Now()
	jr, err := cfg.Sandbox.Run(ctx, job)
	md.ExecutionCompletedTimestamp = timestamppb.Now()
	if err != nil {
		return nil, err
	}
	ex.Job = jr

	md.OutputUploadStartTimestamp = timestamppb.Now()
	res := &repb.ActionResult{ExitCode: int32(jr.ExitCode)}
	root, err := os.Open(execRoot)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "open exec root: %v", err)
	}
	col := &collector{cas: cfg.CAS, local: cfg.Local, root: root}
	err = col.collect(ctx, a.Command.GetWorkingDirectory(), a.Command, res)
	root.Close()
	if err != nil {
		return nil, err
	}
	for _, s := range []struct {
		file string
		dst  **repb.Digest
	}{{job.Stdout, &res.StdoutDigest}, {job.Stderr, &res.StderrDigest}} {
		d, err := storeLog(ctx, col, s.file)
		if err != nil {
			return nil, err
		}
		*s.dst = d.Proto()
	}
	md.OutputUploadCompletedTimestamp = timestamppb.Now()
	md.VirtualExecutionDuration = durationpb.New(jr.Wall)
	if req.RequestedBy != "" {
		auth.RecordRequester(md, req.RequestedBy)
	}
	res.ExecutionMetadata = md
	ex.Result = res
	ex.Produced = col.produced

	switch {
	case jr.TimedOut:
		ex.Status = status.Errorf(codes.DeadlineExceeded, "action timed out after %v and was killed", a.Timeout)
	case jr.OOMKilled:
		ex.Notes = append(ex.Notes, "killed: out of memory")
		ex.Message = "the action ran out of memory and was killed"
	case jr.Signal != "":
		ex.Message = "the action was killed by signal " + jr.Signal
	}
	if jr.StdoutTruncated || jr.StderrTruncated {
		ex.Message = strings.TrimSpace(ex.Message + " (stdout or stderr was truncated at the sandbox's cap)")
	}
	return ex, nil
}

// storeLog stores a captured stdout or stderr file.
func storeLog(ctx context.Context, col *collector, p string) (cache.Digest, error) {
	f, err := os.Open(p)
	if os.IsNotExist(err) {
		return cache.EmptyDigest, nil
	}
	if err != nil {
		return cache.Digest{}, status.Errorf(codes.Internal, "open %s: %v", p, err)
	}
	defer f.Close()
	return col.storeFile(ctx, f)
}

// envList renders the Command's environment as NAME=VALUE, in the Command's order.
func envList(c *repb.Command) []string {
	env := make([]string, 0, len(c.GetEnvironmentVariables()))
	for _, v := range c.GetEnvironmentVariables() {
		env = append(env, v.GetName()+"="+v.GetValue())
	}
	return env
}

// newRunDir makes a fresh private directory for one run under workDir.
func newRunDir(workDir string) (string, error) {
	var b [8]byte
	rand.Read(b[:])
	dir := filepath.Join(workDir, hex.EncodeToString(b[:]))
	if err := os.Mkdir(dir, 0o711); err != nil {
		return "", status.Errorf(codes.Internal, "create run dir: %v", err)
	}
	return dir, nil
}

// makeOutputDirs creates the working directory and the parents of every declared
// output, owned by the sandbox user (uid, gid), as REAPI asks of servers. Output
// directories themselves are created too for 2.0 clients (Bazel expects them to exist).
func makeOutputDirs(execRoot string, c *repb.Command, uid, gid int) error {
	cwd := c.GetWorkingDirectory()
	var dirs []string
	dirs = append(dirs, cwd)
	for _, p := range append(append([]string{}, c.GetOutputFiles()...), c.GetOutputPaths()...) {
		dirs = append(dirs, path.Dir(path.Join(cwd, p)))
	}
	for _, p := range c.GetOutputDirectories() {
		dirs = append(dirs, path.Dir(path.Join(cwd, p)))
	}
	sort.Strings(dirs)
	for _, d := range dirs {
		if err := mkdirAllOwned(execRoot, d, uid, gid); err != nil {
			return err
		}
	}
	// Entries were added: put every directory's mtime back (deepest first).
	for i := len(dirs) - 1; i >= 0; i-- {
		for d := dirs[i]; d != "" && d != "."; d = path.Dir(d) {
			setTimes(filepath.Join(execRoot, filepath.FromSlash(d)), false)
		}
	}
	return setTimes(execRoot, false)
}

// mkdirAllOwned creates rel under root (no symlinks followed), each new directory
// owned by uid and gid.
func mkdirAllOwned(root, rel string, uid, gid int) error {
	if rel == "" || rel == "." {
		return nil
	}
	cur := root
	for _, part := range strings.Split(rel, "/") {
		cur = filepath.Join(cur, part)
		info, err := os.Lstat(cur)
		if err == nil {
			if !info.IsDir() {
				return status.Errorf(codes.InvalidArgument, "cannot create output directory %q: an input is in the way", rel)
			}
			continue
		}
		if err := os.Mkdir(cur, 0o755); err != nil {
			return status.Errorf(codes.Internal, "create %q: %v", rel, err)
		}
		if err := os.Lchown(cur, uid, gid); err != nil {
			return status.Errorf(codes.Internal, "chown %q: %v", rel, err)
		}
	}
	return nil
}
