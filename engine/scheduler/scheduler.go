// Package scheduler queues executions for one local executor, merges identical ones
// in flight, bounds concurrency, checks determinism on the server's side and keeps
// the operations clients follow.
package scheduler

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"slices"
	"sync"
	"time"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/execution"
	"github.com/kilnbuild/kiln/engine/executor"
	"github.com/kilnbuild/kiln/engine/limits"
	"github.com/kilnbuild/kiln/internal/clock"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// SchedulerConfig bounds the scheduler.
type SchedulerConfig struct {
	Concurrency int           // actions running at once
	MaxQueue    int           // actions waiting; more is RESOURCE_EXHAUSTED
	Retain      time.Duration // how long finished operations answer WaitExecution
	Logger      *slog.Logger
	Registerer  prometheus.Registerer
	// VerifyRate is the fraction of cacheable actions (sampled by digest) run twice
	// and compared before their result is cached (kiln serve --verify-rate).
	VerifyRate float64
	// CancelGrace is how long an execution whose clients all went away keeps running
	// for one of them to come back with WaitExecution (a dropped stream); default 30 s.
	// An execution whose every operation was cancelled stops at once.
	CancelGrace time.Duration
	// Clock times retention and the cancel grace (and the determinism check's runs);
	// nil is the system clock.
	Clock clock.Clock
	// Observe, if set, is told of every finished execution and action-cache hit (the
	// web UI's history, package engine/history). It must not block.
	Observe func(Finished)
	// ActionURL, if set, is the web page of an action: an execution that ends in an
	// error names it in the error's message.
	ActionURL func(cache.Digest) string
	// Memory is charged for the input trees of queued executions (nil: not bounded).
	Memory *limits.Budget
	// ClientQueued bounds the executions one client (execution.Request.Client) may
	// have waiting for a slot or being validated; 0 means DefaultClientQueued.
	ClientQueued int
	// Work bounds the validation of input trees done for one client at a time.
	Work *limits.Work
}

// DefaultClientQueued is the default per-client bound on queued executions.
const DefaultClientQueued = 1000

// Finished is one execution or action-cache hit as it ended, for SchedulerConfig.Observe.
type Finished struct {
	Instance string
	Action   cache.Digest
	// Owners are the clients of the operations on it (execution.Request.Owner).
	Owners []string
	// Submitted is when the (first) Execute call came; Done when it ended.
	Submitted, Done time.Time
	// Outcome is as kiln_executions_total counts it: cached, ok, failed, error,
	// cancelled; an action refused before it was queued (its input tree) is an error
	// here, and "refused" in the metric.
	Outcome  string
	Response *repb.ExecuteResponse
	// Attest is the time signing the link took.
	Attest time.Duration
}

// Scheduler queues executions, merges identical ones in flight, bounds concurrency and
// cancels executions nobody waits for any more.
type Scheduler struct {
	exec *executor.Executor
	cfg  SchedulerConfig
	log  *slog.Logger
	slot chan struct{}

	mu       sync.Mutex
	inflight map[string]*flight    // by instance + action digest, cacheable ones only
	ops      map[string]*operation // by name, including finished ones until they expire
	queued   int
	pruned   time.Time // last scan for expired operations

	mExec   *prometheus.CounterVec
	mMerged prometheus.Counter
	mQueue  prometheus.Gauge
	mRun    prometheus.Gauge
	mPhase  *prometheus.HistogramVec
	verify  *serverVerify // kiln-verify and --verify-rate (verify_exec.go)
	// queuedSlots counts each client's executions being validated or waiting for a slot.
	queuedSlots *limits.Slots
}

// held is what a queued execution holds for its client: its queue slot (given back
// when it starts) and the memory its input tree is charged (given back when it ends).
type held struct {
	unqueue func()
	mem     *limits.Charge
}

func (h held) started() {
	if h.unqueue != nil {
		h.unqueue()
	}
}

func (h held) done() {
	h.started()
	h.mem.Release()
}

// flight is one run of an action, shared by every operation merged into it.
type flight struct {
	key     string
	action  cache.Digest
	stage   repb.ExecutionStage_Value
	waiters int           // watches of operations not cancelled; 0 for CancelGrace on an unfinished run cancels it
	live    int           // operations not cancelled; 0 on an unfinished run cancels it at once
	grace   clock.Timer   // running while waiters == 0 on an unfinished run
	changed chan struct{} // closed and replaced on every change of the execution or its operations
	resp    *repb.ExecuteResponse
	cancel  context.CancelFunc
	doneAt  time.Time
	owners  []string // of its operations, each once
}

// operation is what one Execute call gets: its own name, so that one client's
// CancelOperation ends its own wait and never a run other clients share.
type operation struct {
	name    string
	owner   string // execution.Request.Owner
	exec    *flight
	waiters int                   // watches on this operation
	resp    *repb.ExecuteResponse // set when cancelled: it answers instead of exec's
	doneAt  time.Time             // when cancelled
}

// state returns the operation's stage and response (nil while unfinished). Callers hold s.mu.
func (op *operation) state() (repb.ExecutionStage_Value, *repb.ExecuteResponse) {
	if op.resp != nil {
		return repb.ExecutionStage_COMPLETED, op.resp
	}
	return op.exec.stage, op.exec.resp
}

// finishedAt is when the operation ended, zero while it runs. Callers hold s.mu.
func (op *operation) finishedAt() time.Time {
	if op.resp != nil {
		return op.doneAt
	}
	return op.exec.doneAt
}

// NewScheduler returns a scheduler over exec.
func NewScheduler(exec *executor.Executor, cfg SchedulerConfig) *Scheduler {
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = 1
	}
	if cfg.MaxQueue <= 0 {
		cfg.MaxQueue = 1000
	}
	if cfg.Retain <= 0 {
		cfg.Retain = 10 * time.Minute
	}
	if cfg.CancelGrace <= 0 {
		cfg.CancelGrace = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.System()
	}
	if cfg.ClientQueued <= 0 {
		cfg.ClientQueued = DefaultClientQueued
	}
	s := &Scheduler{exec: exec, cfg: cfg, log: cfg.Logger, slot: make(chan struct{}, cfg.Concurrency),
		inflight: map[string]*flight{}, ops: map[string]*operation{}}
	s.mExec = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kiln_executions_total", Help: "Executions by outcome (cached, ok, failed, error, cancelled; refused: an input tree refused before it was queued)."}, []string{"outcome"})
	s.mMerged = prometheus.NewCounter(prometheus.CounterOpts{Name: "kiln_executions_merged_total", Help: "Execute calls merged into an identical execution already in flight."})
	s.mQueue = prometheus.NewGauge(prometheus.GaugeOpts{Name: "kiln_execution_queue_length", Help: "Executions waiting for a slot."})
	s.mRun = prometheus.NewGauge(prometheus.GaugeOpts{Name: "kiln_executions_running", Help: "Executions running."})
	s.mPhase = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "kiln_execution_phase_seconds", Help: "Time per execution phase (queue, input_fetch, sandbox, output_upload, attest) and per execution on the worker (total).",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2.5, 14)}, []string{"phase"})
	if cfg.Registerer != nil {
		cfg.Registerer.MustRegister(s.mExec, s.mMerged, s.mQueue, s.mRun, s.mPhase)
	}
	s.verify = newServerVerify(exec, cfg)
	s.queuedSlots = limits.NewSlots(cfg.Memory, "queued_executions", "queued executions", "--client-max-queued", cfg.ClientQueued, 0)
	return s
}

// watch follows one operation for one client.
type watch struct {
	s  *Scheduler
	op *operation
}

// Submit implements execution.Scheduler: it starts (or joins) the execution of req and
// returns a Watch on a new operation for it. A cache hit is a finished operation at once.
func (s *Scheduler) Submit(ctx context.Context, req execution.Request) (execution.Watch, error) {
	a, err := s.exec.LoadAction(ctx, req.ActionDigest)
	if err != nil {
		return nil, err
	}
	submitted := time.Now()
	if !req.SkipCacheLookup {
		if w, err := s.cached(ctx, req, submitted); err != nil {
			return nil, err
		} else if w != nil {
			return w, nil
		}
	}
	key := ""
	if !a.Action.GetDoNotCache() {
		key = req.Instance + "\x00" + req.ActionDigest.String()
	}
	if w := s.merge(key, req.Owner); w != nil {
		return w, nil
	}
	// A new execution: the client's queue slot, then its input tree read and
	// validated here, before it waits for an execution slot, so that a tree the
	// executor would refuse never takes one.
	h, err := s.admit(ctx, req, a)
	if err != nil {
		if c := status.Code(err); c == codes.InvalidArgument || c == codes.FailedPrecondition {
			// The action cannot run: reported as an execution that ended in an error.
			err = s.withActionURL(err, req.ActionDigest)
			s.mExec.WithLabelValues("refused").Inc()
			s.observe(Finished{Instance: req.Instance, Action: req.ActionDigest, Owners: []string{req.Owner}, Submitted: submitted, Done: time.Now(), Outcome: "error",
				Response: &repb.ExecuteResponse{Status: execution.StatusProto(err)}})
		}
		return nil, err
	}
	s.mu.Lock()
	if key != "" {
		if ex := s.inflight[key]; ex != nil { // started meanwhile
			w := s.newOpLocked(ex, req.Owner)
			s.mu.Unlock()
			s.mMerged.Inc()
			h.done()
			return w, nil
		}
	}
	if s.queued >= s.cfg.MaxQueue {
		s.mu.Unlock()
		h.done()
		return nil, status.Errorf(codes.ResourceExhausted, "execution queue is full (%d actions waiting); retry later", s.cfg.MaxQueue)
	}
	s.queued++
	s.mQueue.Set(float64(s.queued))
	opCtx, cancel := context.WithCancel(context.Background())
	ex := &flight{key: key, action: req.ActionDigest, stage: repb.ExecutionStage_QUEUED,
		changed: make(chan struct{}), cancel: cancel}
	if key != "" {
		s.inflight[key] = ex
	}
	w := s.newOpLocked(ex, req.Owner)
	s.mu.Unlock()

	if key != "" && !req.SkipCacheLookup {
		// Look the action cache up again now that this execution is in flight: one of
		// the same action may have ended since the lookup above (admitting can wait for
		// the client's work). A run writes the cache before it leaves the in-flight set,
		// so either it was still in flight when this one looked (and was joined) or its
		// result is found here; it never runs twice.
		if r, err := s.exec.CachedResult(ctx, req.Instance, req.ActionDigest); err == nil {
			s.dequeue()
			h.done()
			cancel()
			s.mExec.WithLabelValues("cached").Inc()
			resp := &repb.ExecuteResponse{Result: r, CachedResult: true, Status: execution.StatusProto(nil)}
			s.finish(ex, resp)
			s.observeFlight(ex, executor.Request{Instance: req.Instance, ActionDigest: req.ActionDigest, Queued: submitted}, "cached", resp, 0)
			return w, nil
		}
	}
	// Queued is wall-clock time, as the executor's own timestamps in the result are.
	go s.run(opCtx, ex, executor.Request{Instance: req.Instance, ActionDigest: req.ActionDigest, Queued: submitted, RequestedBy: req.Owner}, a, h)
	return w, nil
}

// cached answers req from the action cache: a finished operation, or nil on a miss.
func (s *Scheduler) cached(ctx context.Context, req execution.Request, submitted time.Time) (*watch, error) {
	r, err := s.exec.CachedResult(ctx, req.Instance, req.ActionDigest)
	if status.Code(err) == codes.NotFound {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	s.mExec.WithLabelValues("cached").Inc()
	ex := &flight{action: req.ActionDigest, changed: make(chan struct{})}
	resp := &repb.ExecuteResponse{Result: r, CachedResult: true, Status: execution.StatusProto(nil)}
	s.finish(ex, resp)
	s.observe(Finished{Instance: req.Instance, Action: req.ActionDigest, Owners: []string{req.Owner}, Submitted: submitted, Done: time.Now(), Outcome: "cached", Response: resp})
	return s.newOp(ex, req.Owner), nil
}

// merge joins owner to the execution of key in flight, if there is one.
func (s *Scheduler) merge(key, owner string) *watch {
	if key == "" {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	ex := s.inflight[key]
	if ex == nil {
		return nil
	}
	s.mMerged.Inc()
	return s.newOpLocked(ex, owner) // under the lock that found ex, so its last client cannot cancel it first
}

// withActionURL names the action's web page in err's message, keeping its code and
// details (the MISSING violations a client re-uploads by).
func (s *Scheduler) withActionURL(err error, d cache.Digest) error {
	if s.cfg.ActionURL == nil {
		return err
	}
	p := status.Convert(err).Proto()
	p.Message += " (the action's page: " + s.cfg.ActionURL(d) + ")"
	return status.FromProto(p).Err()
}

// admit takes the client's queue slot and reads and validates a's input tree, its
// memory charged to the client and the work done as the client's.
func (s *Scheduler) admit(ctx context.Context, req execution.Request, a *executor.Action) (held, error) {
	var h held
	var err error
	if req.Client != "" {
		if h.unqueue, err = s.queuedSlots.Acquire(req.Client); err != nil {
			return h, err
		}
	}
	if h.mem, err = s.exec.AdmitInputs(ctx, req.Client, a, s.cfg.Memory, s.cfg.Work); err != nil {
		h.done()
		return held{}, err
	}
	return h, nil
}

// newOp names a new operation of owner on ex and returns a Watch on it.
func (s *Scheduler) newOp(ex *flight, owner string) *watch {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.newOpLocked(ex, owner)
}

// newOpLocked is newOp for callers holding s.mu.
func (s *Scheduler) newOpLocked(ex *flight, owner string) *watch {
	var b [16]byte
	rand.Read(b[:])
	op := &operation{name: "operations/" + hex.EncodeToString(b[:]), owner: owner, exec: ex}
	s.ops[op.name] = op
	ex.live++
	if !slices.Contains(ex.owners, owner) {
		ex.owners = append(ex.owners, owner)
	}
	return s.attachLocked(op)
}

func (s *Scheduler) attach(op *operation) *watch {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.attachLocked(op)
}

// attachLocked adds a watch on op; callers hold s.mu.
func (s *Scheduler) attachLocked(op *operation) *watch {
	op.waiters++
	if op.resp == nil {
		op.exec.waiters++
	}
	return &watch{s: s, op: op}
}

// run waits for a slot, executes, and publishes the response.
func (s *Scheduler) run(ctx context.Context, ex *flight, req executor.Request, a *executor.Action, h held) {
	defer ex.cancel()
	defer h.done()
	select {
	case s.slot <- struct{}{}:
	case <-ctx.Done():
		s.dequeue()
		s.mExec.WithLabelValues("cancelled").Inc()
		resp := &repb.ExecuteResponse{Status: execution.StatusProto(status.Error(codes.Canceled, "cancelled: no client is waiting"))}
		s.finish(ex, resp)
		s.observeFlight(ex, req, "cancelled", resp, 0)
		return
	}
	s.dequeue()
	h.started()
	s.mRun.Inc()
	s.setStage(ex, repb.ExecutionStage_EXECUTING)
	res, err := s.exec.Execute(ctx, s.verify.prepare(req, a), a)
	<-s.slot
	s.mRun.Dec()
	var resp *repb.ExecuteResponse
	var outcome string
	var attest time.Duration
	switch {
	case err != nil:
		if ctx.Err() != nil {
			err = status.Error(codes.Canceled, "cancelled: no client is waiting")
			outcome = "cancelled"
		} else {
			outcome = "error"
		}
		s.mExec.WithLabelValues(outcome).Inc()
		if outcome == "error" {
			err = s.withActionURL(err, req.ActionDigest)
		}
		resp = &repb.ExecuteResponse{Status: execution.StatusProto(err)}
		s.log.Info("execution failed", "action", req.ActionDigest.String(), "code", status.Code(err).String(), "err", status.Convert(err).Message())
	default:
		resp = res.Response()
		outcome, attest = "failed", res.Attest
		if res.Result.GetExitCode() == 0 && res.Status == nil {
			outcome = "ok"
		}
		s.mExec.WithLabelValues(outcome).Inc()
		s.observePhases(res.Result.GetExecutionMetadata())
		if res.Attest > 0 {
			s.mPhase.WithLabelValues("attest").Observe(res.Attest.Seconds())
		}
		if md := res.Result.GetExecutionMetadata(); md.GetWorkerStartTimestamp() != nil && md.GetWorkerCompletedTimestamp() != nil {
			s.mPhase.WithLabelValues("total").Observe(md.GetWorkerCompletedTimestamp().AsTime().Sub(md.GetWorkerStartTimestamp().AsTime()).Seconds())
		}
	}
	s.finish(ex, resp)
	s.observeFlight(ex, req, outcome, resp, attest)
}

// observe hands f to the configured observer.
func (s *Scheduler) observe(f Finished) {
	if s.cfg.Observe != nil {
		s.cfg.Observe(f)
	}
}

// observeFlight reports a finished execution with the clients of its operations.
func (s *Scheduler) observeFlight(ex *flight, req executor.Request, outcome string, resp *repb.ExecuteResponse, attest time.Duration) {
	if s.cfg.Observe == nil {
		return
	}
	s.mu.Lock()
	owners := slices.Clone(ex.owners)
	s.mu.Unlock()
	s.observe(Finished{Instance: req.Instance, Action: req.ActionDigest, Owners: owners, Submitted: req.Queued, Done: time.Now(), Outcome: outcome, Response: resp, Attest: attest})
}

func (s *Scheduler) observePhases(md *repb.ExecutedActionMetadata) {
	obs := func(phase string, a, b interface{ AsTime() time.Time }) {
		if a != nil && b != nil {
			s.mPhase.WithLabelValues(phase).Observe(b.AsTime().Sub(a.AsTime()).Seconds())
		}
	}
	if md.GetQueuedTimestamp() != nil {
		obs("queue", md.GetQueuedTimestamp(), md.GetWorkerStartTimestamp())
	}
	obs("input_fetch", md.GetInputFetchStartTimestamp(), md.GetInputFetchCompletedTimestamp())
	obs("sandbox", md.GetExecutionStartTimestamp(), md.GetExecutionCompletedTimestamp())
	obs("output_upload", md.GetOutputUploadStartTimestamp(), md.GetOutputUploadCompletedTimestamp())
}

func (s *Scheduler) dequeue() {
	s.mu.Lock()
	s.queued--
	s.mQueue.Set(float64(s.queued))
	s.mu.Unlock()
}

// notify wakes every watch of ex and its operations. Callers hold s.mu.
func (ex *flight) notify() {
	close(ex.changed)
	ex.changed = make(chan struct{})
}

func (s *Scheduler) setStage(ex *flight, st repb.ExecutionStage_Value) {
	s.mu.Lock()
	ex.stage = st
	ex.notify()
	s.mu.Unlock()
}

// finish publishes the response and retires the execution from the in-flight set.
func (s *Scheduler) finish(ex *flight, resp *repb.ExecuteResponse) {
	now := s.cfg.Clock.Now()
	s.mu.Lock()
	ex.resp = resp
	ex.stage = repb.ExecutionStage_COMPLETED
	ex.doneAt = now
	ex.notify()
	if ex.key != "" && s.inflight[ex.key] == ex {
		delete(s.inflight, ex.key)
	}
	// Forget finished operations past their retention; a scan of every operation, so
	// not on every finish.
	if now.Sub(s.pruned) > s.cfg.Retain/10 {
		s.pruned = now
		for name, op := range s.ops {
			if t := op.finishedAt(); !t.IsZero() && now.Sub(t) > s.retention(op) {
				delete(s.ops, name)
			}
		}
	}
	s.mu.Unlock()
}

// cachedRetain bounds how long an operation answered from the action cache is kept: a
// client that lost it may as well Execute again, and a large cached build makes many.
const cachedRetain = time.Minute

// retention is how long a finished op answers WaitExecution. Callers hold s.mu.
func (s *Scheduler) retention(op *operation) time.Duration {
	if _, resp := op.state(); resp.GetCachedResult() && s.cfg.Retain > cachedRetain {
		return cachedRetain
	}
	return s.cfg.Retain
}

// lookup returns the operation called name, if owner may see it: another client's
// operation is as unknown as one that never existed.
func (s *Scheduler) lookup(name, owner string) (*operation, error) {
	s.mu.Lock()
	op := s.ops[name]
	s.mu.Unlock()
	if op == nil || op.owner != owner {
		return nil, status.Errorf(codes.NotFound, "operation %q not found (unknown, or finished too long ago)", name)
	}
	return op, nil
}

// Wait implements execution.Scheduler: it re-attaches owner to its operation called name.
func (s *Scheduler) Wait(_ context.Context, name, owner string) (execution.Watch, error) {
	op, err := s.lookup(name, owner)
	if err != nil {
		return nil, err
	}
	return s.attach(op), nil
}

// Cancel ends owner's operation called name: its watches get CANCELLED. The
// execution behind it goes on while operations merged into it still wait, and is
// cancelled when none does. Cancelling a finished operation does nothing.
func (s *Scheduler) Cancel(_ context.Context, name, owner string) error {
	op, err := s.lookup(name, owner)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if op.resp != nil || op.exec.resp != nil {
		return nil
	}
	op.resp = &repb.ExecuteResponse{Status: execution.StatusProto(status.Error(codes.Canceled, "cancelled by CancelOperation"))}
	op.doneAt = s.cfg.Clock.Now()
	op.exec.live--
	s.release(op.exec, op.waiters)
	op.exec.notify()
	return nil
}

// release drops n watches from ex. When none is left on an unfinished execution, it is
// cancelled: at once if every operation on it was cancelled, else after CancelGrace
// unless a client came back meanwhile. Callers hold s.mu.
func (s *Scheduler) release(ex *flight, n int) {
	ex.waiters -= n
	if ex.waiters > 0 || ex.resp != nil || ex.cancel == nil {
		return
	}
	if ex.live == 0 {
		s.stop(ex, "every operation on it was cancelled")
		return
	}
	if ex.grace == nil {
		ex.grace = s.cfg.Clock.AfterFunc(s.cfg.CancelGrace, func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			ex.grace = nil
			if ex.waiters == 0 && ex.resp == nil {
				s.stop(ex, "every client left and none came back")
			}
		})
	}
}

// stop cancels ex. Callers hold s.mu.
func (s *Scheduler) stop(ex *flight, why string) {
	s.log.Info("cancelling execution: "+why, "action", ex.action.String())
	if ex.key != "" && s.inflight[ex.key] == ex {
		delete(s.inflight, ex.key) // a new Execute must not join a dying run
	}
	if ex.grace != nil {
		ex.grace.Stop()
		ex.grace = nil
	}
	ex.cancel()
}

// Delete forgets owner's finished operation; a running one must be cancelled first.
func (s *Scheduler) Delete(_ context.Context, name, owner string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	op := s.ops[name]
	if op == nil || op.owner != owner {
		return status.Errorf(codes.NotFound, "operation %q not found", name)
	}
	if _, resp := op.state(); resp == nil {
		return status.Errorf(codes.FailedPrecondition, "operation %q is still running; cancel it first", name)
	}
	delete(s.ops, name)
	return nil
}

// Next blocks until the operation's state differs from what the caller saw last
// (stage, done) and returns it as a longrunning Operation; seen is updated.
func (w *watch) Next(ctx context.Context, seen *repb.ExecutionStage_Value) (*longrunningpb.Operation, error) {
	for {
		stage, resp, ch := w.state()
		if stage != *seen {
			*seen = stage
			return execution.Operation(w.op.name, w.op.exec.action, stage, resp)
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// state returns the operation's stage and response, and a channel closed at its next change.
func (w *watch) state() (repb.ExecutionStage_Value, *repb.ExecuteResponse, chan struct{}) {
	w.s.mu.Lock()
	defer w.s.mu.Unlock()
	stage, resp := w.op.state()
	return stage, resp, w.op.exec.changed
}

// Get returns owner's operation called name as it stands, without waiting.
func (s *Scheduler) Get(_ context.Context, name, owner string) (*longrunningpb.Operation, error) {
	op, err := s.lookup(name, owner)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	stage, resp := op.state()
	s.mu.Unlock()
	return execution.Operation(op.name, op.exec.action, stage, resp)
}

// Close detaches the client; the last client to leave an unfinished execution cancels it.
func (w *watch) Close() {
	w.s.mu.Lock()
	defer w.s.mu.Unlock()
	w.op.waiters--
	if w.op.resp == nil {
		w.s.release(w.op.exec, 1)
	}
}

// Name is the operation's name.
func (w *watch) Name() string { return w.op.name }

var _ execution.Scheduler = (*Scheduler)(nil)
