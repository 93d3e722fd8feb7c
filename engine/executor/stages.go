package executor

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// stage runs a loaded action, or one step of running it around the stage inside it:
// the executor is sandboxRun wrapped in checking, attesting, quarantining, reporting
// and caching, in that order, each adding its step on the way out (as Buildbarn's
// pkg/builder composes build executors).
type stage interface {
	Execute(ctx context.Context, req Request, a *Action) (*Execution, error)
}

// stages composes the executor's stages from cfg, innermost first.
func stages(cfg *ExecutorConfig, log *slog.Logger) stage {
	var s stage = sandboxRun{cfg}
	s = checking{s}
	if cfg.Attester != nil {
		s = attesting{s, cfg.Attester, cfg.CAS}
	}
	if cfg.Quarantined != nil {
		s = quarantining{s, cfg.Quarantined}
	}
	s = reporting{s, cfg.CAS, cfg.WorkerName, cfg.ActionURL}
	return caching{s, cfg.AC, log, cfg.RequireCacheWrite}
}

// checking runs the request's Check (a determinism check, kiln-verify) on a collected
// execution: its notes go into the link, and a failed check keeps the result out of
// the action cache. The worker's work ends here; signing is timed apart (Attest).
type checking struct{ next stage }

func (c checking) Execute(ctx context.Context, req Request, a *Action) (*Execution, error) {
	ex, err := c.next.Execute(ctx, req, a)
	if err != nil {
		return nil, err
	}
	if req.Check != nil {
		notes, ok, err := req.Check(ctx, ex)
		if err != nil {
			return nil, err
		}
		ex.Notes, ex.Uncacheable = append(ex.Notes, notes...), ex.Uncacheable || !ok
	}
	ex.Result.GetExecutionMetadata().WorkerCompletedTimestamp = timestamppb.Now()
	return ex, nil
}

// attesting signs a link for every build (not for a variation run, which is a check)
// and references it from the result, so a cached result keeps its link.
type attesting struct {
	next     stage
	attester Attester
	cas      cache.BlobStore // where the sandbox policy document is kept
}

func (s attesting) Execute(ctx context.Context, req Request, a *Action) (*Execution, error) {
	ex, err := s.next.Execute(ctx, req, a)
	if err != nil || req.Variation != nil {
		return ex, err
	}
	inputRoot, _ := cache.FromProto(a.Action.GetInputRootDigest())
	rec := &Record{
		Instance: req.Instance, ActionDigest: a.Digest, CommandDigest: a.CmdDigest, InputRoot: inputRoot,
		Toolchain: ex.Toolchain, Inputs: ex.Inputs, Argv: a.Command.GetArguments(), Env: envList(a.Command),
		Outputs: ex.Produced, Result: ex.Result, Notes: append(ex.Notes, req.Notes...), RequestedBy: req.RequestedBy,
	}
	if len(ex.Job.Policy) > 0 {
		if rec.PolicyDigest, err = cache.PutBytes(ctx, s.cas, ex.Job.Policy); err != nil {
			return nil, err
		}
	}
	if p := a.Action.GetPlatform(); p != nil {
		rec.Platform = p.GetProperties()
	} else {
		rec.Platform = a.Command.GetPlatform().GetProperties()
	}
	start := time.Now()
	if err := s.attester.Attest(ctx, rec); err != nil {
		return nil, grpcerr.Wrap(err, "attest action %s", a.Digest)
	}
	ex.Attest = time.Since(start)
	return ex, nil
}

// quarantining fails a build that produced a quarantined blob, so it is neither served
// nor cached; a run made only to compare (kiln rebuild) or a variation may produce one.
type quarantining struct {
	next        stage
	quarantined func(hash string) bool
}

func (q quarantining) Execute(ctx context.Context, req Request, a *Action) (*Execution, error) {
	ex, err := q.next.Execute(ctx, req, a)
	if err != nil || req.CompareOnly || req.Variation != nil {
		return ex, err
	}
	for _, f := range ex.Produced {
		if f.SymlinkTarget == "" && q.quarantined(f.Digest.Hash) {
			return nil, status.Errorf(codes.FailedPrecondition, "action %s produced %s (sha256:%s), which is quarantined; see `kiln quarantine ls`", a.Digest, f.Path, f.Digest.Hash)
		}
	}
	return ex, nil
}

// reporting gives a failed action's response a readable account of how its sandbox
// ended, in ExecuteResponse.server_logs["kiln-sandbox"].
type reporting struct {
	next   stage
	cas    cache.BlobStore
	worker string
	url    func(cache.Digest) string // the action's web page; nil: none
}

func (r reporting) Execute(ctx context.Context, req Request, a *Action) (*Execution, error) {
	ex, err := r.next.Execute(ctx, req, a)
	if err != nil {
		return nil, err
	}
	jr := ex.Job
	if jr.ExitCode == 0 && !jr.TimedOut && !jr.OOMKilled && jr.Signal == "" {
		return ex, nil
	}
	if len(jr.Policy) > 0 { // the report names it (the attester stores it too)
		if _, err := cache.PutBytes(ctx, r.cas, jr.Policy); err != nil {
			return nil, err
		}
	}
	page := ""
	if r.url != nil {
		page = r.url(a.Digest)
		if ex.Message == "" {
			ex.Message = "kiln: the action failed; its page: " + page
		}
	}
	d, err := cache.PutBytes(ctx, r.cas, sandboxReport(a, ex.Toolchain, jr, r.worker, page))
	if err != nil {
		return nil, grpcerr.Wrap(err, "store the sandbox report of %s", a.Digest)
	}
	ex.ServerLogs = map[string]*repb.LogFile{"kiln-sandbox": {Digest: d.Proto(), HumanReadable: true}}
	return ex, nil
}

// sandboxReport says, for people, how an action's sandbox ended: what a failed
// action's client finds in ExecuteResponse.server_logs["kiln-sandbox"].
func sandboxReport(a *Action, toolchain string, jr JobResult, worker, page string) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "kiln sandbox report\naction      %s\n", a.Digest)
	if page != "" {
		fmt.Fprintf(&b, "page        %s\n", page)
	}
	fmt.Fprintf(&b, "toolchain   %s\nworker      %s\n", toolchain, worker)
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

// caching writes the action cache entry of a successful, cacheable build: not of a
// failure, a timeout, a do_not_cache action, a run that asked for no cache (verify,
// rebuild), one whose check failed, nor one whose stdout or stderr was truncated at
// the sandbox's cap (what was cut off is not what the action wrote). A failed write
// is logged, not an error: the client still gets its result (unless required: a
// cluster worker's ack promises it).
type caching struct {
	next     stage
	ac       cache.ActionCache
	log      *slog.Logger
	required bool
}

func (c caching) Execute(ctx context.Context, req Request, a *Action) (*Execution, error) {
	ex, err := c.next.Execute(ctx, req, a)
	if err != nil {
		return nil, err
	}
	if ex.Uncacheable || ex.Job.ExitCode != 0 || ex.Job.TimedOut || ex.Job.StdoutTruncated || ex.Job.StderrTruncated ||
		a.Action.GetDoNotCache() || req.NoCache {
		return ex, nil
	}
	if err := c.ac.Put(ctx, cache.ActionKey{Instance: req.Instance, Action: a.Digest}, ex.Result); err != nil {
		if c.required {
			return nil, status.Errorf(codes.Unavailable, "action cache write for %s failed: %v", a.Digest, status.Convert(err).Message())
		}
		c.log.Warn("action cache write failed", "action", a.Digest.String(), "err", err)
	}
	return ex, nil
}
