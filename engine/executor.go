package engine

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/auth"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Sandbox runs one command in an isolated, ephemeral container; package sandbox
// implements it. A command that fails is a JobResult, not an error.
type Sandbox interface {
	Run(ctx context.Context, job Job) (JobResult, error)
}

// Job is one sandboxed run of an action's command.
type Job struct {
	RootFS   string // toolchain root filesystem, mounted read-only
	ExecRoot string // host directory mounted read-write at the sandbox's exec-root path
	Cwd      string // working directory, relative to the exec root
	Args     []string
	Env      []string // exactly the Command's environment, in order
	Stdout   string   // host file for stdout
	Stderr   string   // host file for stderr
	Timeout  time.Duration
	// Variation, when set, changes what the sandbox may vary without changing what a
	// deterministic action produces (kiln verify); nil means the fixed defaults.
	Variation *Variation
}

// Variation is a set of changes to the sandbox a deterministic action must not notice.
type Variation struct {
	Hostname     string
	UID, GID     int
	ExecRootPath string // in-sandbox path of the exec root
	CPUs         string // cpuset, e.g. "0" or "0-1"
	ASLR         bool   // false: personality(ADDR_NO_RANDOMIZE)
	ReverseEnv   bool   // pass the environment in reverse order
	TimeOffset   time.Duration
	Name         string // short description for reports
}

// JobResult is what a sandboxed run did.
type JobResult struct {
	ExitCode        int
	Signal          string
	TimedOut        bool
	OOMKilled       bool
	StdoutTruncated bool
	StderrTruncated bool
	PolicyDigest    string // digest of the sandbox policy (seccomp profile, namespaces, limits)
	Policy          []byte // the policy document PolicyDigest names
	Wall, User, Sys time.Duration
	MaxRSS          int64
}

// Toolchains resolves `container-image` references to pinned toolchain roots;
// package toolchains implements it.
type Toolchains interface {
	// Resolve maps a reference ("" for the default toolchain) to a manifest digest;
	// an unpinned tag is FAILED_PRECONDITION.
	Resolve(ctx context.Context, ref string) (digest string, err error)
	// RootFS returns the read-only root filesystem of a resolved toolchain.
	RootFS(ctx context.Context, digest string) (dir string, err error)
}

// Attester signs a record of each executed action (package engine/attest, through
// linkAttester) and references the signature from rec.Result.
type Attester interface {
	Attest(ctx context.Context, rec *Record) error
}

// Record is everything an attestation says about one execution.
type Record struct {
	Instance      string
	ActionDigest  cache.Digest
	CommandDigest cache.Digest
	InputRoot     cache.Digest
	Toolchain     string         // manifest digest
	Inputs        []ProducedFile // every input file and symlink, by path from the input root
	Outputs       []ProducedFile // every output file and symlink, by path from the working dir
	Argv          []string
	Env           []string
	Platform      []*repb.Platform_Property
	Result        *repb.ActionResult
	PolicyDigest  cache.Digest // the sandbox policy document, stored in the CAS
	Notes         []string     // e.g. the outcome of a determinism check
	RequestedBy   string       // the identity that asked for the run (Request.Owner)
}

// ExecutorConfig configures an Executor.
type ExecutorConfig struct {
	CAS        cache.BlobStore
	AC         cache.ActionCache
	Sandbox    Sandbox
	Toolchains Toolchains
	Attester   Attester // nil: no links
	// WorkDir holds exec roots; it must be on the CAS's filesystem for hardlinks.
	WorkDir string
	// UID and GID own the exec root's directories: the sandbox user.
	UID, GID       int
	DefaultTimeout time.Duration
	MaxTimeout     time.Duration
	WorkerName     string
	Logger         *slog.Logger
	// IgnoreUnknownPlatformProperties accepts properties kiln does not know instead of
	// refusing the action.
	IgnoreUnknownPlatformProperties bool
	// Quarantined, if set, reports whether a blob (by hex digest) must not be handed
	// out: an execution that produces one fails and is not cached.
	Quarantined func(hash string) bool
}

// Executor runs actions: fetch, materialize, sandbox, collect, attest, cache.
type Executor struct {
	cfg ExecutorConfig
	log *slog.Logger
}

// NewExecutor returns an Executor; WorkDir is created if needed.
func NewExecutor(cfg ExecutorConfig) (*Executor, error) {
	if cfg.DefaultTimeout == 0 {
		cfg.DefaultTimeout = 15 * time.Minute
	}
	if cfg.MaxTimeout == 0 {
		cfg.MaxTimeout = time.Hour
	}
	if cfg.WorkerName == "" {
		h, _ := os.Hostname()
		cfg.WorkerName = "kiln@" + h
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(cfg.WorkDir, 0o711); err != nil {
		return nil, fmt.Errorf("create work dir: %w", err)
	}
	return &Executor{cfg: cfg, log: cfg.Logger}, nil
}

// Request is one action to execute.
type Request struct {
	Instance        string
	ActionDigest    cache.Digest
	SkipCacheLookup bool
	// NoCache neither reads nor writes the action cache (verify, rebuild).
	NoCache   bool
	Variation *Variation
	// Queued is when the request entered the queue, for the result's metadata.
	Queued time.Time
	// Owner is the identity of the client that asked (package engine/auth's string
	// form; "" for an anonymous caller): only it may wait on, cancel or delete the
	// operation, and the action-cache entry and the link record it.
	Owner string
	// Notes are recorded in the action's link (e.g. a determinism check's outcome).
	Notes []string
	// CompareOnly marks a run made to compare its products, never to serve them (kiln
	// rebuild): it may reproduce a quarantined artifact, which is what it checks.
	CompareOnly bool
	// Check, when set, sees the collected execution before it is attested and cached
	// (kiln-verify): its notes go into the link; cacheable false keeps the result out
	// of the action cache. It may set the Execution's Message.
	Check func(ctx context.Context, ex *Execution) (notes []string, cacheable bool, err error)
}

// Execution is the outcome of a Request.
type Execution struct {
	Result   *repb.ActionResult
	Cached   bool
	Status   error  // for ExecuteResponse.status: nil, or why the result is partial
	Message  string // for ExecuteResponse.message
	Produced []ProducedFile
	Action   *repb.Action
	Command  *repb.Command
	Job      JobResult
	// Attest is the time signing and recording the link took on the action's path.
	Attest time.Duration
	// ServerLogs, for ExecuteResponse.server_logs: "kiln-sandbox", a human-readable
	// account of how the sandbox ended, for actions that failed.
	ServerLogs map[string]*repb.LogFile
}

// Action is a parsed, validated action.
type Action struct {
	Digest    cache.Digest
	Action    *repb.Action
	Command   *repb.Command
	CmdDigest cache.Digest
	Platform  Platform
	Timeout   time.Duration
}

// LoadAction reads and validates an action and its command. Absent blobs are
// FAILED_PRECONDITION with MISSING violations, invalid ones INVALID_ARGUMENT.
func (e *Executor) LoadAction(ctx context.Context, d cache.Digest) (*Action, error) {
	a := &Action{Digest: d, Action: &repb.Action{}, Command: &repb.Command{}}
	if err := readMessage(ctx, e.cfg.CAS, d, a.Action, "action"); err != nil {
		return nil, err
	}
	cd, err := cache.FromProto(a.Action.GetCommandDigest())
	if err != nil {
		return nil, cache.PrefixError(err, "action %s: command_digest", d)
	}
	if _, err := cache.FromProto(a.Action.GetInputRootDigest()); err != nil {
		return nil, cache.PrefixError(err, "action %s: input_root_digest", d)
	}
	a.CmdDigest = cd
	if err := readMessage(ctx, e.cfg.CAS, cd, a.Command, "command"); err != nil {
		return nil, err
	}
	if err := validateCommand(a.Command); err != nil {
		return nil, cache.PrefixError(err, "action %s: command", d)
	}
	plat := a.Action.GetPlatform()
	if plat == nil {
		plat = a.Command.GetPlatform() // REAPI 2.0 clients put it on the Command
	}
	a.Platform, err = parsePlatform(plat, e.cfg.IgnoreUnknownPlatformProperties)
	if err != nil {
		return nil, cache.PrefixError(err, "action %s", d)
	}
	a.Timeout = e.cfg.DefaultTimeout
	if t := a.Action.GetTimeout(); t != nil {
		if err := t.CheckValid(); err != nil || t.AsDuration() < 0 {
			return nil, status.Errorf(codes.InvalidArgument, "action %s: bad timeout", d)
		}
		if t.AsDuration() > e.cfg.MaxTimeout {
			return nil, status.Errorf(codes.InvalidArgument, "action %s: timeout %v is over the server's maximum %v", d, t.AsDuration(), e.cfg.MaxTimeout)
		}
		if t.AsDuration() > 0 {
			a.Timeout = t.AsDuration()
		}
	}
	return a, nil
}

func readMessage(ctx context.Context, cas cache.BlobStore, d cache.Digest, m proto.Message, what string) error {
	err := cache.ReadProto(ctx, cas, d, m, maxDirectorySize)
	switch status.Code(err) {
	case codes.OK:
		return nil
	case codes.NotFound, codes.DataLoss:
		return cache.MissingBlobsError(what+" blob is not in the CAS", []cache.Digest{d})
	}
	return cache.PrefixError(err, "%s %s", what, d)
}

// validateCommand checks the parts of a Command kiln relies on.
func validateCommand(c *repb.Command) error {
	if len(c.GetArguments()) == 0 || c.GetArguments()[0] == "" {
		return status.Error(codes.InvalidArgument, "no arguments")
	}
	for i, v := range c.GetEnvironmentVariables() {
		n := v.GetName()
		if n == "" || strings.ContainsAny(n, "=\x00") || strings.ContainsRune(v.GetValue(), 0) {
			return status.Errorf(codes.InvalidArgument, "bad environment variable %q", n)
		}
		if i > 0 && c.GetEnvironmentVariables()[i-1].GetName() >= n {
			return status.Errorf(codes.InvalidArgument, "environment variables not sorted by name or not unique at %q", n)
		}
	}
	if err := validRelPath(c.GetWorkingDirectory(), true); err != nil {
		return status.Errorf(codes.InvalidArgument, "working_directory %q: %v", c.GetWorkingDirectory(), err)
	}
	seen := map[string]bool{}
	for _, list := range [][]string{c.GetOutputPaths(), c.GetOutputFiles(), c.GetOutputDirectories()} {
		for _, p := range list {
			if err := validRelPath(p, false); err != nil {
				return status.Errorf(codes.InvalidArgument, "output path %q: %v", p, err)
			}
			if seen[p] {
				return status.Errorf(codes.InvalidArgument, "output path %q declared twice", p)
			}
			seen[p] = true
		}
	}
	return nil
}

// validRelPath accepts clean relative slash paths that stay inside their root.
func validRelPath(p string, emptyOK bool) error {
	switch {
	case p == "":
		if emptyOK {
			return nil
		}
		return fmt.Errorf("empty")
	case strings.HasPrefix(p, "/"):
		return fmt.Errorf("absolute")
	case strings.ContainsRune(p, 0):
		return fmt.Errorf("contains NUL")
	case path.Clean(p) != p || p == ".":
		return fmt.Errorf("not a clean relative path")
	case p == ".." || strings.HasPrefix(p, "../"):
		return fmt.Errorf("leaves the exec root")
	}
	return nil
}

// CachedResult returns the action cache's result for an action, NOT_FOUND if none.
func (e *Executor) CachedResult(ctx context.Context, instance string, d cache.Digest) (*repb.ActionResult, error) {
	return e.cfg.AC.Get(ctx, cache.ActionKey{Instance: instance, Action: d})
}

// Execute runs a loaded action in a fresh sandbox and stores its result.
func (e *Executor) Execute(ctx context.Context, req Request, a *Action) (*Execution, error) {
	md := &repb.ExecutedActionMetadata{Worker: e.cfg.WorkerName, WorkerStartTimestamp: timestamppb.Now()}
	if !req.Queued.IsZero() {
		md.QueuedTimestamp = timestamppb.New(req.Queued)
	}
	ex := &Execution{Action: a.Action, Command: a.Command}

	// Toolchain first: an unpinned image is refused before any input is fetched.
	tcDigest, err := e.cfg.Toolchains.Resolve(ctx, a.Platform.ContainerImage)
	if err != nil {
		return nil, err
	}
	md.InputFetchStartTimestamp = timestamppb.Now()
	rootfs, err := e.cfg.Toolchains.RootFS(ctx, tcDigest)
	if err != nil {
		return nil, err
	}
	inputRoot, _ := cache.FromProto(a.Action.GetInputRootDigest())
	tree, err := fetchTree(ctx, e.cfg.CAS, inputRoot)
	if err != nil {
		return nil, err
	}
	dir, err := e.newRunDir()
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	execRoot := filepath.Join(dir, "root")
	if err := os.Mkdir(execRoot, 0o755); err != nil {
		return nil, status.Errorf(codes.Internal, "create exec root: %v", err)
	}
	m := &materializer{cas: e.cfg.CAS, uid: e.cfg.UID, gid: e.cfg.GID}
	if err := m.materialize(ctx, execRoot, tree); err != nil {
		return nil, err
	}
	if err := e.makeOutputDirs(execRoot, a.Command); err != nil {
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
	jr, err := e.cfg.Sandbox.Run(ctx, job)
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
	col := &collector{cas: e.cfg.CAS, root: root}
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
	if req.Owner != "" {
		auth.RecordRequester(md, req.Owner)
	}
	res.ExecutionMetadata = md
	ex.Result = res
	ex.Produced = col.produced

	var notes []string
	switch {
	case jr.TimedOut:
		ex.Status = status.Errorf(codes.DeadlineExceeded, "action timed out after %v and was killed", a.Timeout)
	case jr.OOMKilled:
		notes = append(notes, "killed: out of memory")
		ex.Message = "the action ran out of memory and was killed"
	case jr.Signal != "":
		ex.Message = "the action was killed by signal " + jr.Signal
	}
	if jr.StdoutTruncated || jr.StderrTruncated {
		ex.Message = strings.TrimSpace(ex.Message + " (stdout or stderr was truncated at the sandbox's cap)")
	}

	checked := true
	if req.Check != nil {
		more, ok, err := req.Check(ctx, ex)
		if err != nil {
			return nil, err
		}
		notes, checked = append(notes, more...), ok
	}

	md.WorkerCompletedTimestamp = timestamppb.Now()
	if e.cfg.Attester != nil && req.Variation == nil { // a variation run is a check, not a build
		rec := &Record{
			Instance: req.Instance, ActionDigest: a.Digest, CommandDigest: a.CmdDigest, InputRoot: inputRoot,
			Toolchain: tcDigest, Argv: a.Command.GetArguments(), Env: job.Env,
			Outputs: col.produced, Result: res, Notes: append(notes, req.Notes...), RequestedBy: req.Owner,
		}
		if len(jr.Policy) > 0 {
			if rec.PolicyDigest, err = cache.PutBytes(ctx, e.cfg.CAS, jr.Policy); err != nil {
				return nil, err
			}
		}
		for _, f := range tree.files {
			rec.Inputs = append(rec.Inputs, ProducedFile{Path: f.path, Digest: f.digest})
		}
		for _, l := range tree.symlinks {
			rec.Inputs = append(rec.Inputs, ProducedFile{Path: l.path, SymlinkTarget: l.target})
		}
		if p := a.Action.GetPlatform(); p != nil {
			rec.Platform = p.GetProperties()
		} else {
			rec.Platform = a.Command.GetPlatform().GetProperties()
		}
		start := time.Now()
		if err := e.cfg.Attester.Attest(ctx, rec); err != nil {
			return nil, cache.PrefixError(err, "attest action %s", a.Digest)
		}
		ex.Attest = time.Since(start)
	}

	if q := e.cfg.Quarantined; q != nil && !req.CompareOnly && req.Variation == nil {
		for _, f := range col.produced {
			if f.SymlinkTarget == "" && q(f.Digest.Hash) {
				return nil, status.Errorf(codes.FailedPrecondition, "action %s produced %s (sha256:%s), which is quarantined; see `kiln quarantine ls`", a.Digest, f.Path, f.Digest.Hash)
			}
		}
	}
	if jr.ExitCode != 0 || jr.TimedOut || jr.OOMKilled || jr.Signal != "" {
		if len(jr.Policy) > 0 { // the report names it (the attester stores it too)
			if _, err := cache.PutBytes(ctx, e.cfg.CAS, jr.Policy); err != nil {
				return nil, err
			}
		}
		d, err := cache.PutBytes(ctx, e.cfg.CAS, sandboxReport(a, tcDigest, jr, e.cfg.WorkerName))
		if err != nil {
			return nil, cache.PrefixError(err, "store the sandbox report of %s", a.Digest)
		}
		ex.ServerLogs = map[string]*repb.LogFile{"kiln-sandbox": {Digest: d.Proto(), HumanReadable: true}}
	}
	cacheable := checked && jr.ExitCode == 0 && !jr.TimedOut && !a.Action.GetDoNotCache() && !req.NoCache
	if cacheable {
		if err := e.cfg.AC.Put(ctx, cache.ActionKey{Instance: req.Instance, Action: a.Digest}, res); err != nil {
			e.log.Warn("action cache write failed", "action", a.Digest.String(), "err", err)
		}
	}
	return ex, nil
}

// sandboxReport says, for people, how an action's sandbox ended: what a failed
// action's client finds in ExecuteResponse.server_logs["kiln-sandbox"].
func sandboxReport(a *Action, toolchain string, jr JobResult, worker string) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "kiln sandbox report\naction      %s\ntoolchain   %s\nworker      %s\n", a.Digest, toolchain, worker)
	fmt.Fprintf(&b, "exit code   %d\n", jr.ExitCode)
	if jr.Signal != "" {
		fmt.Fprintf(&b, "signal      %s\n", jr.Signal)
	}
	if jr.TimedOut {
		fmt.Fprintf(&b, "timed out   after %v (killed)\n", a.Timeout)
	}
	if jr.OOMKilled {
		b.WriteString("memory      out of memory (killed by the OOM killer at the sandbox's limit)\n")
	}
	fmt.Fprintf(&b, "time        wall %v, user %v, system %v\nmax RSS     %d KiB\n", jr.Wall, jr.User, jr.Sys, jr.MaxRSS/1024)
	if jr.StdoutTruncated || jr.StderrTruncated {
		fmt.Fprintf(&b, "truncated   stdout %t, stderr %t (at the sandbox's cap)\n", jr.StdoutTruncated, jr.StderrTruncated)
	}
	if len(jr.Policy) > 0 {
		fmt.Fprintf(&b, "policy      %s (namespaces, seccomp profile, limits: blob %s in the CAS)\n", jr.PolicyDigest, cache.DigestOf(jr.Policy))
	}
	return []byte(b.String())
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

// newRunDir makes a fresh private directory for one run.
func (e *Executor) newRunDir() (string, error) {
	var b [8]byte
	rand.Read(b[:])
	dir := filepath.Join(e.cfg.WorkDir, hex.EncodeToString(b[:]))
	if err := os.Mkdir(dir, 0o711); err != nil {
		return "", status.Errorf(codes.Internal, "create run dir: %v", err)
	}
	return dir, nil
}

// makeOutputDirs creates the working directory and the parents of every declared
// output, owned by the sandbox user, as REAPI asks of servers. Output directories
// themselves are created too for 2.0 clients (Bazel expects them to exist).
func (e *Executor) makeOutputDirs(execRoot string, c *repb.Command) error {
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
		if err := e.mkdirAllOwned(execRoot, d); err != nil {
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
// owned by the sandbox user.
func (e *Executor) mkdirAllOwned(root, rel string) error {
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
		if err := os.Lchown(cur, e.cfg.UID, e.cfg.GID); err != nil {
			return status.Errorf(codes.Internal, "chown %q: %v", rel, err)
		}
	}
	return nil
}
