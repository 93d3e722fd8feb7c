// Package executor runs one action: it loads and validates the Action and Command,
// materializes the input tree into a fresh exec root, runs the command in a sandbox,
// collects the outputs into the CAS, signs a link and writes the action cache.
package executor

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/limits"
	"github.com/kilnbuild/kiln/engine/reapi"
	"github.com/kilnbuild/kiln/internal/dirplace"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
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
	RequestedBy   string       // the identity that asked for the run (Request.RequestedBy)
}

// ExecutorConfig configures an Executor.
type ExecutorConfig struct {
	CAS cache.BlobStore
	// Local is the CAS's files on this machine: read-only inputs are hardlinked from it
	// and outputs adopted into it instead of copied. nil: every byte goes through CAS.
	Local      cache.LocalFiles
	AC         cache.ActionCache
	Sandbox    Sandbox
	Toolchains Toolchains
	Attester   Attester // nil: no links
	// WorkDir holds exec roots; it must be on Local's filesystem for hardlinks.
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
	// RequireCacheWrite fails an execution whose action-cache write failed (UNAVAILABLE,
	// so a cluster worker retries it) instead of logging the failure and answering.
	RequireCacheWrite bool
	// Quarantined, if set, reports whether a blob (by hex digest) must not be handed
	// out: an execution that produces one fails and is not cached.
	Quarantined func(hash string) bool
	// ActionURL, if set, is the web page of an action; a failed action's report and
	// message name it.
	ActionURL func(cache.Digest) string
}

// Executor runs actions: fetch, materialize, sandbox, collect (sandboxRun), then
// check, attest, quarantine, report and cache (stages.go).
type Executor struct {
	cfg   ExecutorConfig
	log   *slog.Logger
	stage stage
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
	// Each run's directory in a block group of its own choosing: the inodes an action
	// makes and frees are then not all in one group, which every later file there
	// (the store's blobs, the next exec roots) would pay for (package dirplace).
	if err := dirplace.Spread(cfg.WorkDir); err != nil {
		cfg.Logger.Debug("executor: no placement hint", "dir", cfg.WorkDir, "err", err)
	}
	e := &Executor{cfg: cfg, log: cfg.Logger}
	e.stage = stages(&e.cfg, e.log)
	return e, nil
}

// CAS is the store the executor reads inputs from and writes outputs to.
func (e *Executor) CAS() cache.BlobStore { return e.cfg.CAS }

// Request is one execution of an action (the action cache is looked up before, by
// whoever decides to execute).
type Request struct {
	Instance     string
	ActionDigest cache.Digest
	// NoCache keeps the result out of the action cache (verify, rebuild).
	NoCache   bool
	Variation *Variation
	// Queued is when the request entered the queue, for the result's metadata.
	Queued time.Time
	// RequestedBy is the identity of the client whose Execute caused the run
	// (package engine/auth's string form; "" when unknown): the result's metadata
	// and the link record it.
	RequestedBy string
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
	// Toolchain is the manifest digest of the toolchain the action ran on.
	Toolchain string
	// Inputs lists every input file and symlink, by path from the input root.
	Inputs []ProducedFile
	// Notes are recorded in the action's link (an out-of-memory kill, a determinism
	// check's outcome).
	Notes []string
	// Uncacheable keeps the result out of the action cache (a failed determinism check).
	Uncacheable bool
	// Attest is the time signing and recording the link took on the action's path.
	Attest time.Duration
	// ServerLogs, for ExecuteResponse.server_logs: "kiln-sandbox", a human-readable
	// account of how the sandbox ended, for actions that failed.
	ServerLogs map[string]*repb.LogFile
}

// Response is the ExecuteResponse that reports ex to the client (not CachedResult:
// an execution ran).
func (ex *Execution) Response() *repb.ExecuteResponse {
	st := &rpcstatus.Status{}
	if ex.Status != nil {
		st = status.Convert(ex.Status).Proto()
	}
	return &repb.ExecuteResponse{Result: ex.Result, Status: st, Message: ex.Message, ServerLogs: ex.ServerLogs}
}

// Action is a parsed, validated action.
type Action struct {
	Digest    cache.Digest
	Action    *repb.Action
	Command   *repb.Command
	CmdDigest cache.Digest
	Platform  Platform
	Timeout   time.Duration
	// inputs is the input tree, read and validated before the action was queued
	// (FetchInputs); nil: Execute reads it.
	inputs *inputTree
}

// FetchInputs reads and validates a's input tree now, charging what it holds to mem
// (nil: to nothing), so that Execute does not read it again: the scheduler validates
// a tree before the execution waits for a slot, so one the executor would refuse
// never takes one.
func (e *Executor) FetchInputs(ctx context.Context, a *Action, mem *limits.Charge) error {
	root, _ := cache.FromProto(a.Action.GetInputRootDigest()) // validated by LoadAction
	t, err := fetchTreeCharged(ctx, e.cfg.CAS, root, mem)
	if err != nil {
		return err
	}
	a.inputs = t
	return nil
}

// AdmitInputs reads and validates a's input tree (FetchInputs) as client's work, what
// it holds charged to client's share of mem (either may be nil: not bounded). The
// caller releases the returned charge when it lets go of a's inputs.
func (e *Executor) AdmitInputs(ctx context.Context, client string, a *Action, mem *limits.Budget, work *limits.Work) (*limits.Charge, error) {
	charge, err := mem.Charge(client, "the input tree of an execution", 0)
	if err != nil {
		return nil, err
	}
	release, err := work.Acquire(ctx, client)
	if err == nil {
		err = e.FetchInputs(ctx, a, charge)
		release()
	}
	if err != nil {
		charge.Release()
		return nil, err
	}
	return charge, nil
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
		return nil, grpcerr.Wrap(err, "action %s: command_digest", d)
	}
	if _, err := cache.FromProto(a.Action.GetInputRootDigest()); err != nil {
		return nil, grpcerr.Wrap(err, "action %s: input_root_digest", d)
	}
	a.CmdDigest = cd
	if err := readMessage(ctx, e.cfg.CAS, cd, a.Command, "command"); err != nil {
		return nil, err
	}
	if err := validateCommand(a.Command); err != nil {
		return nil, grpcerr.Wrap(err, "action %s: command", d)
	}
	plat := a.Action.GetPlatform()
	if plat == nil {
		plat = a.Command.GetPlatform() // REAPI 2.0 clients put it on the Command
	}
	a.Platform, err = parsePlatform(plat, e.cfg.IgnoreUnknownPlatformProperties)
	if err != nil {
		return nil, grpcerr.Wrap(err, "action %s", d)
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
	return grpcerr.Wrap(err, "%s %s", what, d)
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
func validRelPath(p string, emptyOK bool) error { return reapi.CheckRelPath(p, emptyOK) }

// CachedResult returns the action cache's result for an action, NOT_FOUND if none.
func (e *Executor) CachedResult(ctx context.Context, instance string, d cache.Digest) (*repb.ActionResult, error) {
	return e.cfg.AC.Get(ctx, cache.ActionKey{Instance: instance, Action: d})
}

// Execute runs a loaded action in a fresh sandbox, through every stage.
func (e *Executor) Execute(ctx context.Context, req Request, a *Action) (*Execution, error) {
	return e.stage.Execute(ctx, req, a)
}
