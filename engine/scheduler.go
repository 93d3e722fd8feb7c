package engine

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"sync"
	"time"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
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
}

// Scheduler queues executions, merges identical ones in flight, bounds concurrency and
// cancels executions nobody waits for any more.
type Scheduler struct {
	exec *Executor
	cfg  SchedulerConfig
	log  *slog.Logger
	slot chan struct{}

	mu       sync.Mutex
	inflight map[string]*operation // by instance + action digest, cacheable ones only
	ops      map[string]*operation // by name, including finished ones until they expire
	queued   int

	mExec   *prometheus.CounterVec
	mMerged prometheus.Counter
	mQueue  prometheus.Gauge
	mRun    prometheus.Gauge
	mPhase  *prometheus.HistogramVec
	verify  *serverVerify // kiln-verify and --verify-rate (verify_exec.go)
}

// operation is one execution and the clients waiting for it.
type operation struct {
	name    string
	key     string
	action  cache.Digest
	stage   repb.ExecutionStage_Value
	waiters int
	changed chan struct{} // closed and replaced on every stage change
	resp    *repb.ExecuteResponse
	cancel  context.CancelFunc
	doneAt  time.Time
}

// NewScheduler returns a scheduler over exec.
func NewScheduler(exec *Executor, cfg SchedulerConfig) *Scheduler {
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = 1
	}
	if cfg.MaxQueue <= 0 {
		cfg.MaxQueue = 1000
	}
	if cfg.Retain <= 0 {
		cfg.Retain = 10 * time.Minute
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Scheduler{exec: exec, cfg: cfg, log: cfg.Logger, slot: make(chan struct{}, cfg.Concurrency),
		inflight: map[string]*operation{}, ops: map[string]*operation{}}
	s.mExec = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kiln_executions_total", Help: "Executions by outcome (cached, ok, failed, error, cancelled)."}, []string{"outcome"})
	s.mMerged = prometheus.NewCounter(prometheus.CounterOpts{Name: "kiln_executions_merged_total", Help: "Execute calls merged into an identical execution already in flight."})
	s.mQueue = prometheus.NewGauge(prometheus.GaugeOpts{Name: "kiln_execution_queue_length", Help: "Executions waiting for a slot."})
	s.mRun = prometheus.NewGauge(prometheus.GaugeOpts{Name: "kiln_executions_running", Help: "Executions running."})
	s.mPhase = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "kiln_execution_phase_seconds", Help: "Time per execution phase (queue, input_fetch, sandbox, output_upload, attest) and per execution on the worker (total).",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2.5, 14)}, []string{"phase"})
	if cfg.Registerer != nil {
		cfg.Registerer.MustRegister(s.mExec, s.mMerged, s.mQueue, s.mRun, s.mPhase)
	}
	s.verify = newServerVerify(exec, cfg)
	return s
}

// Watch follows one operation for one client.
type Watch struct {
	s  *Scheduler
	op *operation
}

// Submit starts (or joins) the execution of req and returns a Watch on it. A cache hit
// is a finished operation at once.
func (s *Scheduler) Submit(ctx context.Context, req Request) (*Watch, error) {
	a, err := s.exec.LoadAction(ctx, req.ActionDigest)
	if err != nil {
		return nil, err
	}
	if !req.SkipCacheLookup && !req.NoCache {
		if r, err := s.exec.CachedResult(ctx, req.Instance, req.ActionDigest); err == nil {
			s.mExec.WithLabelValues("cached").Inc()
			op := s.newOp(req.ActionDigest, "")
			s.finish(op, &repb.ExecuteResponse{Result: r, CachedResult: true, Status: statusProto(nil)})
			return s.attach(op), nil
		} else if status.Code(err) != codes.NotFound {
			return nil, err
		}
	}
	key := ""
	if !a.Action.GetDoNotCache() && !req.NoCache && req.Variation == nil {
		key = req.Instance + "\x00" + req.ActionDigest.String()
	}
	s.mu.Lock()
	if key != "" {
		if op := s.inflight[key]; op != nil {
			op.waiters++
			s.mu.Unlock()
			s.mMerged.Inc()
			return &Watch{s: s, op: op}, nil
		}
	}
	if s.queued >= s.cfg.MaxQueue {
		s.mu.Unlock()
		return nil, status.Errorf(codes.ResourceExhausted, "execution queue is full (%d actions waiting); retry later", s.cfg.MaxQueue)
	}
	s.queued++
	s.mQueue.Set(float64(s.queued))
	s.mu.Unlock()

	op := s.newOp(req.ActionDigest, key)
	opCtx, cancel := context.WithCancel(context.Background())
	op.cancel = cancel
	w := s.attach(op)
	req.Queued = time.Now()
	go s.run(opCtx, op, req, a)
	return w, nil
}

func (s *Scheduler) newOp(d cache.Digest, key string) *operation {
	var b [16]byte
	rand.Read(b[:])
	op := &operation{name: "operations/" + hex.EncodeToString(b[:]), key: key, action: d,
		stage: repb.ExecutionStage_QUEUED, changed: make(chan struct{})}
	s.mu.Lock()
	s.ops[op.name] = op
	if key != "" {
		s.inflight[key] = op
	}
	s.mu.Unlock()
	return op
}

func (s *Scheduler) attach(op *operation) *Watch {
	s.mu.Lock()
	op.waiters++
	s.mu.Unlock()
	return &Watch{s: s, op: op}
}

// run waits for a slot, executes, and publishes the response.
func (s *Scheduler) run(ctx context.Context, op *operation, req Request, a *Action) {
	defer op.cancel()
	select {
	case s.slot <- struct{}{}:
	case <-ctx.Done():
		s.dequeue()
		s.mExec.WithLabelValues("cancelled").Inc()
		s.finish(op, &repb.ExecuteResponse{Status: statusProto(status.Error(codes.Canceled, "cancelled: no client is waiting"))})
		return
	}
	s.dequeue()
	s.mRun.Inc()
	s.setStage(op, repb.ExecutionStage_EXECUTING)
	ex, err := s.exec.Execute(ctx, s.verify.prepare(req, a), a)
	<-s.slot
	s.mRun.Dec()
	resp := &repb.ExecuteResponse{}
	switch {
	case err != nil:
		if ctx.Err() != nil {
			err = status.Error(codes.Canceled, "cancelled: no client is waiting")
			s.mExec.WithLabelValues("cancelled").Inc()
		} else {
			s.mExec.WithLabelValues("error").Inc()
		}
		resp.Status = statusProto(err)
		s.log.Info("execution failed", "action", req.ActionDigest.String(), "code", status.Code(err).String(), "err", status.Convert(err).Message())
	default:
		resp.Result, resp.Status, resp.Message = ex.Result, statusProto(ex.Status), ex.Message
		if ex.Result.GetExitCode() == 0 && ex.Status == nil {
			s.mExec.WithLabelValues("ok").Inc()
		} else {
			s.mExec.WithLabelValues("failed").Inc()
		}
		s.observePhases(ex.Result.GetExecutionMetadata())
		if ex.Attest > 0 {
			s.mPhase.WithLabelValues("attest").Observe(ex.Attest.Seconds())
		}
		if md := ex.Result.GetExecutionMetadata(); md.GetWorkerStartTimestamp() != nil && md.GetWorkerCompletedTimestamp() != nil {
			s.mPhase.WithLabelValues("total").Observe(md.GetWorkerCompletedTimestamp().AsTime().Sub(md.GetWorkerStartTimestamp().AsTime()).Seconds())
		}
	}
	s.finish(op, resp)
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

func (s *Scheduler) setStage(op *operation, st repb.ExecutionStage_Value) {
	s.mu.Lock()
	op.stage = st
	close(op.changed)
	op.changed = make(chan struct{})
	s.mu.Unlock()
}

// finish publishes the response and retires the operation from the in-flight set.
func (s *Scheduler) finish(op *operation, resp *repb.ExecuteResponse) {
	now := time.Now()
	s.mu.Lock()
	op.resp = resp
	op.stage = repb.ExecutionStage_COMPLETED
	op.doneAt = now
	close(op.changed)
	op.changed = make(chan struct{})
	if op.key != "" && s.inflight[op.key] == op {
		delete(s.inflight, op.key)
	}
	// Forget finished operations past their retention.
	for name, o := range s.ops {
		if !o.doneAt.IsZero() && now.Sub(o.doneAt) > s.cfg.Retain {
			delete(s.ops, name)
		}
	}
	s.mu.Unlock()
}

// Wait re-attaches to an operation by name.
func (s *Scheduler) Wait(name string) (*Watch, error) {
	s.mu.Lock()
	op := s.ops[name]
	s.mu.Unlock()
	if op == nil {
		return nil, status.Errorf(codes.NotFound, "operation %q not found (unknown, or finished too long ago)", name)
	}
	return s.attach(op), nil
}

// Next blocks until the operation's state differs from what the caller saw last
// (stage, done) and returns it as a longrunning Operation; seen is updated.
func (w *Watch) Next(ctx context.Context, seen *repb.ExecutionStage_Value) (*longrunningpb.Operation, error) {
	for {
		w.s.mu.Lock()
		stage, resp, ch := w.op.stage, w.op.resp, w.op.changed
		w.s.mu.Unlock()
		if stage != *seen {
			*seen = stage
			return w.op.proto(stage, resp)
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// Close detaches the client; the last client to leave an unfinished operation cancels it.
func (w *Watch) Close() {
	w.s.mu.Lock()
	defer w.s.mu.Unlock()
	w.op.waiters--
	if w.op.waiters == 0 && w.op.resp == nil && w.op.cancel != nil {
		w.s.log.Info("cancelling execution: every client left", "action", w.op.action.String(), "operation", w.op.name)
		if w.op.key != "" && w.s.inflight[w.op.key] == w.op {
			delete(w.s.inflight, w.op.key) // a new Execute must not join a dying run
		}
		w.op.cancel()
	}
}

// detachQuietly drops a watcher that only looked (GetOperation) without cancelling.
func (w *Watch) detachQuietly() {
	w.s.mu.Lock()
	w.op.waiters--
	w.s.mu.Unlock()
}

// Name is the operation's name.
func (w *Watch) Name() string { return w.op.name }

// Response blocks until the execution finishes and returns its response.
func (w *Watch) Response(ctx context.Context) (*repb.ExecuteResponse, error) {
	var seen repb.ExecutionStage_Value
	for {
		op, err := w.Next(ctx, &seen)
		if err != nil {
			return nil, err
		}
		if op.GetDone() {
			w.s.mu.Lock()
			defer w.s.mu.Unlock()
			return w.op.resp, nil
		}
	}
}

func (op *operation) proto(stage repb.ExecutionStage_Value, resp *repb.ExecuteResponse) (*longrunningpb.Operation, error) {
	md, err := anypb.New(&repb.ExecuteOperationMetadata{Stage: stage, ActionDigest: op.action.Proto()})
	if err != nil {
		return nil, status.Errorf(codes.Internal, "operation metadata: %v", err)
	}
	out := &longrunningpb.Operation{Name: op.name, Metadata: md}
	if resp != nil {
		r, err := anypb.New(resp)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "operation response: %v", err)
		}
		out.Done = true
		out.Result = &longrunningpb.Operation_Response{Response: r}
	}
	return out, nil
}
