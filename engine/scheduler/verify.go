package scheduler

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"log/slog"
	"math"
	"strings"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/executor"
	"github.com/kilnbuild/kiln/engine/verify"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/status"
)

// serverVerify is kiln serve's determinism check: an action with kiln-verify=N, or
// one sampled by --verify-rate (N=2), runs N times before its result is cached.
//
// The first run is the normal execution. Its Check (Request.Check) runs the other
// N-1 with variations in the same scheduler slot, one after another, then compares.
// Deterministic: the result is cached and the link notes it. Nondeterministic: each
// difference is narrowed to its variation (more runs, same slot); the result is
// returned to the client but not cached, the ExecuteResponse message and the link
// say what differs under which variation, and kiln_nondeterministic_actions_total
// counts it. A check that cannot complete (a variation run fails to start or times
// out) is treated like a nondeterministic one: returned, not cached, said why.
type serverVerify struct {
	exec     *executor.Executor
	rate     float64
	log      *slog.Logger
	mNondet  prometheus.Counter
	mOutcome *prometheus.CounterVec
	mRuns    prometheus.Counter
	clock    verify.Clock
}

func newServerVerify(exec *executor.Executor, cfg SchedulerConfig) *serverVerify {
	v := &serverVerify{exec: exec, rate: cfg.VerifyRate, log: cfg.Logger, clock: cfg.Clock,
		mNondet: prometheus.NewCounter(prometheus.CounterOpts{Name: "kiln_nondeterministic_actions_total",
			Help: "Actions whose determinism check found outputs that differ (their results are not cached)."}),
		mOutcome: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kiln_verified_actions_total",
			Help: "Determinism checks by outcome (deterministic, nondeterministic, error, skipped: the action failed)."}, []string{"outcome"}),
		mRuns: prometheus.NewCounter(prometheus.CounterOpts{Name: "kiln_verify_runs_total",
			Help: "Extra sandbox runs made by determinism checks (variations and narrowing)."}),
	}
	if v.log == nil {
		v.log = slog.New(slog.DiscardHandler)
	}
	if cfg.Registerer != nil {
		cfg.Registerer.MustRegister(v.mNondet, v.mOutcome, v.mRuns)
	}
	return v
}

// runs is how many times req must run: the kiln-verify property, at least 2 when
// --verify-rate samples it; 0 or 1 means no check. A client cannot opt out of the
// operator's sampling with kiln-verify=1.
func (v *serverVerify) runs(req executor.Request, a *executor.Action) int {
	if req.Variation != nil || req.NoCache || req.Check != nil {
		return 0
	}
	n := a.Platform.VerifyRuns
	if n < 2 && !a.Action.GetDoNotCache() && sampled(a.Digest, v.rate) {
		n = 2
	}
	return n
}

// prepare adds the determinism check to req when the action needs one.
func (v *serverVerify) prepare(req executor.Request, a *executor.Action) executor.Request {
	if v == nil {
		return req
	}
	n := v.runs(req, a)
	if n < 2 {
		return req
	}
	instance := req.Instance
	req.Check = func(ctx context.Context, ex *executor.Execution) ([]string, bool, error) {
		return v.check(ctx, instance, a, n, ex)
	}
	return req
}

// check compares the execution ex with n-1 more runs.
func (v *serverVerify) check(ctx context.Context, instance string, a *executor.Action, n int, ex *executor.Execution) ([]string, bool, error) {
	if ex.Status != nil || ex.Result.GetExitCode() != 0 {
		v.mOutcome.WithLabelValues("skipped").Inc()
		return []string{"kiln-verify: not checked: the action failed"}, true, nil
	}
	opts := executor.VerifyOptions(a, n, nil)
	opts.Clock = v.clock
	rep, err := verify.Verify(ctx, v.exec.CAS(), executor.VerifyRunner{Executor: v.exec, Instance: instance, Action: a}, opts, ex.Result)
	if rep != nil {
		v.mRuns.Add(float64(len(rep.Runs) - 1))
	}
	if err != nil {
		if ctx.Err() != nil {
			return nil, false, err
		}
		v.mOutcome.WithLabelValues("error").Inc()
		msg := "kiln-verify: the determinism check could not complete, so the result is not cached: " + status.Convert(err).Message()
		v.log.Warn("determinism check failed", "action", a.Digest.String(), "err", err)
		ex.Message = joinMessage(ex.Message, msg)
		return []string{msg}, false, nil
	}
	note := "kiln-verify: " + rep.Summary()
	if rep.Deterministic {
		v.mOutcome.WithLabelValues("deterministic").Inc()
		return []string{note}, true, nil
	}
	v.mNondet.Inc()
	v.mOutcome.WithLabelValues("nondeterministic").Inc()
	v.log.Warn("nondeterministic action: result not cached", "action", a.Digest.String(), "summary", rep.Summary())
	note += "; the result is not cached"
	ex.Message = joinMessage(ex.Message, note)
	return []string{note}, false, nil
}

func joinMessage(a, b string) string { return strings.TrimSpace(a + "\n" + b) }

// sampled reports whether --verify-rate picks action d: the first 64 bits of its
// SHA-256, read as a fraction of 2^64, are below rate. The same action is always
// picked, or never, on every server with the same rate.
func sampled(d cache.Digest, rate float64) bool {
	switch {
	case rate <= 0:
		return false
	case rate >= 1:
		return true
	case len(d.Hash) < 16:
		return false
	}
	b, err := hex.DecodeString(d.Hash[:16])
	if err != nil {
		return false
	}
	return float64(binary.BigEndian.Uint64(b))/math.Exp2(64) < rate
}
