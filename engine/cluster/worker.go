package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/execution"
	"github.com/kilnbuild/kiln/engine/verify"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// heartbeatEvery is how often a worker writes its heartbeat; status forgets a worker
// after three missed ones.
const heartbeatEvery = 5 * time.Second

// WorkerConfig configures a Worker.
type WorkerConfig struct {
	Name        string // shown in status and sandbox reports (kiln-worker@HOST)
	Platform    string // the platform key it serves; "" is PlatformKey's
	Concurrency int    // actions at once
	// Grace is how long, after SIGTERM, running actions may finish before they are
	// handed back to the queue (0: 30 s).
	Grace time.Duration
	KeyID string // the executor key its links are signed with: must be admitted
	// LocalTier, if set, is the local disk tier of the worker's store: blobs a work
	// message carries are put there (verified), not read from the bucket.
	LocalTier cache.BlobStore
	Version   string
	Logger    *slog.Logger
	// Registerer gets the worker's metrics; nil: none.
	Registerer prometheus.Registerer
}

// Worker takes actions from the cluster's work queue and runs them with a local
// scheduler (the same one, over the same executor, as a single kiln serve). The queue's
// acknowledgement is the lease: a worker tells the queue it still runs an action every
// AckWait/3 and acknowledges it only when its outputs, action-cache entry and link are
// in shared storage and its result is in the cluster's state. A worker that dies or
// stalls past AckWait loses the action to another; every step before the ack is
// content-addressed, so running it again is harmless, and the first completion wins.
type Worker struct {
	c     *Conn
	sched execution.Scheduler
	cas   cache.BlobStore
	ac    cache.ActionCache
	cfg   WorkerConfig
	id    string
	log   *slog.Logger
	start time.Time

	running  atomic.Int32
	draining atomic.Bool
	handling sync.WaitGroup

	mActions *prometheus.CounterVec
	mDup     *prometheus.CounterVec
	mRunning prometheus.GaugeFunc
}

// NewWorker returns a worker on c that runs actions with sched (a local scheduler with
// cfg.Concurrency slots), reading and writing blobs and results through cas and ac.
func NewWorker(c *Conn, sched execution.Scheduler, cas cache.BlobStore, ac cache.ActionCache, cfg WorkerConfig) *Worker {
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = 1
	}
	if cfg.Platform == "" {
		cfg.Platform = PlatformKey(nil)
	}
	if cfg.Grace <= 0 {
		cfg.Grace = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	w := &Worker{c: c, sched: sched, cas: cas, ac: ac, cfg: cfg, id: newID()[:12], log: cfg.Logger, start: time.Now(),
		mActions: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kiln_cluster_worker_actions_total",
			Help: "Actions this worker took from the queue, by outcome (completed, duplicate, handed_back, max_deliver, cancelled, gone)."}, []string{"outcome"}),
		mDup: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kiln_cluster_duplicate_runs_total",
			Help: "Runs that completed after another run of the same execution had (a lost lease), by comparison (same, different, not_compared)."}, []string{"result"}),
	}
	w.mRunning = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "kiln_cluster_worker_running", Help: "Actions this worker runs now."},
		func() float64 { return float64(w.running.Load()) })
	if cfg.Registerer != nil {
		cfg.Registerer.MustRegister(w.mActions, w.mDup, w.mRunning)
	}
	return w
}

// Run takes and runs actions until ctx ends, then stops taking work, lets running
// actions finish for Grace, hands back (naks) those still running, and returns. It
// refuses to start (FAILED_PRECONDITION) while the worker's key is not admitted.
func (w *Worker) Run(ctx context.Context) error {
	if err := w.checkKey(ctx); err != nil {
		return err
	}
	cfg := w.c.cfg
	cons, err := w.c.JS.CreateOrUpdateConsumer(ctx, workStream, jetstream.ConsumerConfig{
		Durable: "workers-" + w.cfg.Platform, FilterSubject: workSubject + w.cfg.Platform,
		Description: "kiln workers of platform " + w.cfg.Platform,
		AckPolicy:   jetstream.AckExplicitPolicy, AckWait: cfg.AckWait,
		// Deliveries are counted by the workers (MaxDeliver is theirs): the delivery past
		// it is failed with a message that says why, never dropped in silence.
		MaxDeliver: -1, MaxAckPending: -1, MaxWaiting: 4096,
	})
	if err != nil {
		return w.c.wrap(err, "join the %s queue", w.cfg.Platform)
	}
	w.log.Info("kiln worker taking work", "cluster", cfg.String(), "platform", w.cfg.Platform, "concurrency", w.cfg.Concurrency,
		"ack_wait", cfg.AckWait, "max_deliver", cfg.MaxDeliver, "key", w.cfg.KeyID, "id", w.id)

	// Actions run under hard, which ends Grace after ctx (or at once when the worker's
	// key is retired): then whatever still runs is handed back.
	hard, stopHard := context.WithCancel(context.WithoutCancel(ctx))
	defer stopHard()
	go func() {
		<-ctx.Done()
		w.draining.Store(true)
		w.heartbeat(hard)
		select {
		case <-time.After(w.cfg.Grace):
			w.log.Warn("grace over: handing back the actions still running", "running", w.running.Load())
			stopHard()
		case <-hard.Done():
		}
	}()
	hbDone := make(chan struct{})
	go func() {
		defer close(hbDone)
		t := time.NewTicker(heartbeatEvery)
		defer t.Stop()
		for {
			w.heartbeat(hard)
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if err := w.checkKey(ctx); status.Code(err) == codes.FailedPrecondition {
				w.log.Error("this worker's key is no longer trusted; taking no more work", "err", status.Convert(err).Message())
				w.draining.Store(true)
			}
		}
	}()

	slots := make(chan struct{}, w.cfg.Concurrency)
	for ctx.Err() == nil {
		if w.draining.Load() {
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
			continue
		}
		select { // one free slot at least, then every other free one
		case slots <- struct{}{}:
		case <-ctx.Done():
			continue
		}
		if w.draining.Load() { // it began while every slot was busy: take nothing more
			<-slots
			continue
		}
		n := 1
		for n < w.cfg.Concurrency {
			select {
			case slots <- struct{}{}:
				n++
				continue
			default:
			}
			break
		}
		batch, err := cons.Fetch(n, jetstream.FetchMaxWait(2*time.Second))
		if err != nil {
			for range n {
				<-slots
			}
			if ctx.Err() == nil {
				w.log.Warn("cannot take work; retrying", "err", err)
				select {
				case <-ctx.Done():
				case <-time.After(time.Second):
				}
			}
			continue
		}
		got := 0
		for m := range batch.Messages() {
			got++
			w.handling.Add(1)
			go func() {
				defer func() { <-slots; w.handling.Done() }()
				w.handle(ctx, hard, m)
			}()
		}
		for range n - got {
			<-slots
		}
	}
	w.handling.Wait()
	stopHard()
	<-hbDone
	dctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	w.c.Workers.Delete(dctx, "w."+w.id)
	cancel()
	w.log.Info("kiln worker stopped")
	return nil
}

// checkKey fails unless the worker's key is admitted and not retired.
func (w *Worker) checkKey(ctx context.Context) error {
	t, err := w.c.TrustSet(ctx)
	if err != nil {
		return err
	}
	k, ok := t.Key(w.cfg.KeyID)
	switch {
	case !ok:
		return status.Errorf(codes.FailedPrecondition, "this worker's key %s is not admitted to the cluster: an operator runs `kiln cluster admit-key FILE` with `kiln attest pubkey --data DATA` of this worker", w.cfg.KeyID)
	case !k.Active():
		return status.Errorf(codes.FailedPrecondition, "this worker's key %s was retired on %s: give the worker a new key (kiln attest key rotate --data DATA) and admit it", w.cfg.KeyID, k.NotAfter.Format(time.RFC3339))
	}
	return nil
}

func (w *Worker) heartbeat(ctx context.Context) {
	b, _ := json.Marshal(WorkerStatus{ID: w.id, Name: w.cfg.Name, Platform: w.cfg.Platform, Concurrency: w.cfg.Concurrency,
		Running: int(w.running.Load()), KeyID: w.cfg.KeyID, Version: w.cfg.Version, Started: w.start, Seen: time.Now(), Draining: w.draining.Load()})
	hctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := w.c.Workers.Put(hctx, "w."+w.id, b); err != nil && ctx.Err() == nil {
		w.log.Debug("heartbeat failed", "err", err)
	}
}

// handle runs one delivered action to its acknowledgement (or hands it back). soft
// ends when the worker stops taking work; hard when running actions must stop.
func (w *Worker) handle(soft, hard context.Context, m jetstream.Msg) {
	w.running.Add(1)
	defer w.running.Add(-1)
	meta, err := m.Metadata()
	if err != nil {
		m.Term()
		return
	}
	var job work
	if err := json.Unmarshal(m.Data(), &job); err != nil || job.Exec == "" {
		w.log.Error("dropping a malformed work message", "err", err)
		m.TermWithReason("malformed")
		return
	}
	if soft.Err() != nil || w.draining.Load() { // fetched as the worker began to stop, or its key was retired
		w.handBack(m, job)
		return
	}
	log := w.log.With("exec", job.Exec, "action", job.Action, "delivery", meta.NumDelivered)
	attempt := int(meta.NumDelivered)
	run, stop := context.WithCancel(hard)
	defer stop()
	var stopped atomic.Bool // CancelOperation of every operation
	w.watchCancel(run, job.Exec, func() { stopped.Store(true); stop() })
	marked := make(chan mark, 1)
	if attempt == 1 {
		// A first delivery has not run anywhere: it starts at once, and the record is
		// read and marked EXECUTING beside it (two KV round trips off every action's
		// path). What the read finds (cancelled while queued, gone) stops the run.
		go func() {
			mk := w.markExecuting(hard, job, attempt)
			if mk.outcome != markedOK && mk.outcome != markUnreadable {
				stop()
			}
			marked <- mk
		}()
	} else {
		// A redelivery may have completed, been cancelled or died too often: read first.
		mk := w.markExecuting(hard, job, attempt)
		if w.settle(hard, log, m, job, mk) {
			return
		}
		marked <- mk
	}
	w.seed(hard, log, job)
	go w.keepLease(run, m)

	log.Info("executing")
	began := time.Now()
	resp := w.run(run, log, job, attempt)
	ran := time.Since(began)
	mk := <-marked
	if mk.outcome == markUnreadable {
		// The cluster's state was unreachable: the run went on; complete retries.
		log.Warn("cannot record that the action runs", "err", mk.err)
	} else if w.settle(hard, log, m, job, mk) {
		return
	}
	switch {
	case stopped.Load():
		w.complete(hard, log, job, cancelled(), 0, true)
		m.Term()
		w.mActions.WithLabelValues("cancelled").Inc()
		return
	case hard.Err() != nil:
		log.Warn("handing the action back to the queue")
		w.handBack(m, job)
		return
	}
	// Fast path: nobody wrote the record since this worker marked it EXECUTING.
	if mk.rev == 0 || !w.completeAt(hard, job, &mk.rec, mk.rev, resp, ran) {
		if !w.complete(hard, log, job, resp, ran, false) {
			w.handBack(m, job) // the cluster's state was unreachable until the end: let another report it
			return
		}
	}
	// The result is stored and reported: now the queue may forget the action. An ack
	// that does not reach the server only costs a redelivery that finds it done.
	m.Ack()
	w.mActions.WithLabelValues("completed").Inc()
}

// markOutcome is what reading an execution's record before (or while) running it found.
type markOutcome int

const (
	markedOK       markOutcome = iota // marked EXECUTING (rev 0: written without a revision)
	markUnreadable                    // the state could not be read
	markGone                          // retained no longer
	markDone                          // completed before; the ack was lost
	markCancelled                     // every operation was cancelled
	markMaxDeliver                    // delivered too often
)

// mark is the record as this worker marked it EXECUTING, at revision rev.
type mark struct {
	outcome markOutcome
	rec     execRecord
	rev     uint64
	err     error
}

// markExecuting reads the execution's record and, unless it must not run, marks it
// EXECUTING on this worker.
func (w *Worker) markExecuting(ctx context.Context, job work, attempt int) mark {
	var mk mark
	rev, err := w.c.getRecord(ctx, execKey(job.Exec), &mk.rec)
	switch {
	case status.Code(err) == codes.NotFound:
		mk.outcome = markGone
		return mk
	case err != nil:
		mk.outcome, mk.err = markUnreadable, err
		return mk
	case mk.rec.done():
		mk.outcome = markDone
		return mk
	case mk.rec.Cancel:
		mk.outcome = markCancelled
		return mk
	case attempt-mk.rec.Returned > w.c.cfg.MaxDeliver:
		mk.outcome = markMaxDeliver
		return mk
	}
	mk.rec.Stage, mk.rec.Worker, mk.rec.Attempt = repb.ExecutionStage_EXECUTING, w.cfg.Name, attempt
	if mk.rev, err = w.c.putRecord(ctx, execKey(job.Exec), &mk.rec, rev); err != nil {
		mk.rev = 0
		if _, err := updateRecord(ctx, w.c, execKey(job.Exec), func(x *execRecord) error {
			if x.done() {
				return errUnchanged
			}
			x.Stage, x.Worker, x.Attempt = repb.ExecutionStage_EXECUTING, w.cfg.Name, attempt
			return nil
		}); err != nil {
			w.log.Warn("cannot record that the action runs", "exec", job.Exec, "err", err)
		}
	}
	return mk
}

// settle finishes a delivery that must not run (or whose run is discarded) as its
// mark says, and reports whether it did.
func (w *Worker) settle(ctx context.Context, log *slog.Logger, m jetstream.Msg, job work, mk mark) bool {
	switch mk.outcome {
	case markGone:
		log.Warn("execution is gone from the cluster's state (retained no longer); dropping it")
		m.Term()
		w.mActions.WithLabelValues("gone").Inc()
	case markUnreadable:
		m.NakWithDelay(time.Second)
		w.mActions.WithLabelValues("handed_back").Inc()
	case markDone:
		m.Ack() // completed before; the acknowledgement was lost
		w.mActions.WithLabelValues("duplicate").Inc()
	case markCancelled:
		w.complete(ctx, log, job, cancelled(), 0, true)
		m.Term()
		w.mActions.WithLabelValues("cancelled").Inc()
	case markMaxDeliver:
		max := w.c.cfg.MaxDeliver
		msg := fmt.Sprintf("kiln cluster: action %s was handed to a worker %d times and no worker completed it (each died or lost its lease while running it): not retried again (max-deliver %d)", job.Action, max, max)
		log.Error("action failed after max-deliver", "max_deliver", max)
		w.complete(ctx, log, job, &repb.ExecuteResponse{Status: execution.StatusProto(status.Error(codes.Aborted, msg)), Message: msg}, 0, true)
		m.Term()
		w.mActions.WithLabelValues("max_deliver").Inc()
	default:
		return false
	}
	return true
}

// completeAt records resp as the result of rec, last written at revision rev by this
// worker; false if the record changed since (complete then starts over from a read).
func (w *Worker) completeAt(ctx context.Context, job work, rec *execRecord, rev uint64, resp *repb.ExecuteResponse, ran time.Duration) bool {
	x := *rec
	x.Stage, x.Ran = repb.ExecutionStage_COMPLETED, ran
	if x.setResponse(ctx, w.cas, resp) != nil {
		return false
	}
	if _, err := w.c.putRecord(ctx, execKey(job.Exec), &x, rev); err != nil {
		return false
	}
	if x.InFlight != "" {
		go w.release(context.WithoutCancel(ctx), &x) // off the path: a stale in-flight key is replaced by the next Execute anyway
	}
	return true
}

// seed puts the blobs the work message carries into the local tier, each checked
// against its digest (a wrong one is dropped: the bucket's copy will be read).
func (w *Worker) seed(ctx context.Context, log *slog.Logger, job work) {
	if w.cfg.LocalTier == nil {
		return
	}
	for k, b := range job.Blobs {
		d, err := cache.ParseDigest(k)
		if err != nil || cache.DigestOf(b) != d {
			log.Warn("a work message carries a blob that does not match its digest; ignored", "blob", k)
			continue
		}
		if err := w.cfg.LocalTier.Put(ctx, d, bytes.NewReader(b)); err != nil {
			log.Debug("could not seed a blob into the local tier", "blob", k, "err", err)
		}
	}
}

// handBack returns the action to the queue for another worker, recording that this
// delivery was returned on purpose (it does not count against max-deliver).
func (w *Worker) handBack(m jetstream.Msg, job work) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	updateRecord(ctx, w.c, execKey(job.Exec), func(x *execRecord) error {
		if x.done() {
			return errUnchanged
		}
		x.Returned++
		if x.Stage == repb.ExecutionStage_EXECUTING {
			x.Stage, x.Worker = repb.ExecutionStage_QUEUED, ""
		}
		return nil
	})
	m.Nak()
	w.mActions.WithLabelValues("handed_back").Inc()
}

func cancelled() *repb.ExecuteResponse {
	return &repb.ExecuteResponse{Status: execution.StatusProto(status.Error(codes.Canceled, "cancelled: every operation on the execution was cancelled"))}
}

// keepLease tells the queue every AckWait/3 that the action still runs.
func (w *Worker) keepLease(ctx context.Context, m jetstream.Msg) {
	t := time.NewTicker(max(w.c.cfg.AckWait/3, 50*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			m.InProgress()
		}
	}
}

// watchCancel calls stop when the execution's record asks for cancellation.
func (w *Worker) watchCancel(ctx context.Context, exec string, stop func()) {
	ch := make(chan *nats.Msg, 8)
	sub, err := w.c.NC.ChanSubscribe("$KV."+stateBucket+"."+execKey(exec), ch)
	if err != nil {
		return
	}
	go func() {
		defer sub.Unsubscribe()
		for {
			select {
			case <-ctx.Done():
				return
			case msg := <-ch:
				var x execRecord
				if json.Unmarshal(msg.Data, &x) == nil && x.Cancel && !x.done() {
					stop()
					return
				}
			}
		}
	}()
}

// run executes the action with the local scheduler; an UNAVAILABLE outcome (shared
// storage or the cluster unreachable while fetching inputs or storing outputs) is
// retried, holding the lease, until it succeeds or the worker stops.
func (w *Worker) run(ctx context.Context, log *slog.Logger, job work, attempt int) *repb.ExecuteResponse {
	d, err := cache.ParseDigest(job.Action)
	if err != nil {
		return &repb.ExecuteResponse{Status: execution.StatusProto(status.Errorf(codes.InvalidArgument, "action %q: %v", job.Action, err))}
	}
	// The frontend looked the action cache up before queueing; on a redelivery the
	// previous worker may have stored the result before it died.
	req := execution.Request{Instance: job.Instance, ActionDigest: d, SkipCacheLookup: job.SkipCache || attempt == 1}
	wait := 100 * time.Millisecond
	for n := 1; ; n++ {
		resp, err := w.runOnce(ctx, req)
		if err != nil {
			resp = &repb.ExecuteResponse{Status: execution.StatusProto(err)}
		}
		if codes.Code(resp.GetStatus().GetCode()) != codes.Unavailable || ctx.Err() != nil {
			return resp
		}
		log.Warn("shared storage or the cluster is unavailable; running the action again", "attempt", n, "err", resp.GetStatus().GetMessage())
		select {
		case <-ctx.Done():
			return resp
		case <-time.After(wait):
		}
		wait = min(2*wait, 5*time.Second)
	}
}

func (w *Worker) runOnce(ctx context.Context, req execution.Request) (*repb.ExecuteResponse, error) {
	watch, err := w.sched.Submit(ctx, req)
	if err != nil {
		return nil, err
	}
	defer watch.Close()
	resp, err := execution.Response(ctx, watch)
	if err != nil && ctx.Err() != nil {
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		w.sched.Cancel(cctx, watch.Name(), "")
		cancel()
	}
	return resp, err
}

// complete records resp as the execution's result unless another run completed it
// first, which this run's result is then compared with. force records even a result
// that is not this worker's run (a failure past max-deliver, a cancellation). It
// reports false if the cluster's state stayed unreachable until the worker stopped.
func (w *Worker) complete(ctx context.Context, log *slog.Logger, job work, resp *repb.ExecuteResponse, ran time.Duration, force bool) bool {
	var first *execRecord
	err := retry(ctx, log, "record the result", func() error {
		first = nil
		x, err := updateRecord(ctx, w.c, execKey(job.Exec), func(x *execRecord) error {
			if x.done() {
				first = x
				return errUnchanged
			}
			x.Stage, x.Worker, x.Ran = repb.ExecutionStage_COMPLETED, w.cfg.Name, ran
			return x.setResponse(ctx, w.cas, resp)
		})
		if err == nil && first == nil && x.InFlight != "" {
			w.release(ctx, x)
		}
		return err
	})
	if status.Code(err) == codes.NotFound {
		return true // retained no longer: nobody waits; the action cache has the result
	}
	if err != nil {
		log.Error("could not record the result", "err", err)
		return false
	}
	if first != nil && !force {
		w.duplicate(ctx, log, job, first, resp)
	}
	return true
}

// release deletes the action's in-flight key if it still names x, so the next Execute
// of the action starts a new execution.
func (w *Worker) release(ctx context.Context, x *execRecord) {
	e, err := w.c.State.Get(ctx, x.InFlight)
	if err != nil || string(e.Value()) != x.ID {
		return
	}
	w.c.State.Delete(ctx, x.InFlight, jetstream.LastRevision(e.Revision()))
}

// duplicate handles a run that completed after another run of the same execution had:
// its outputs are compared with the first's, like kiln-verify compares runs; a
// difference is logged, counted and noted in the execution's response. The action
// cache keeps the first run's result (this run's caching stage may have overwritten it).
func (w *Worker) duplicate(ctx context.Context, log *slog.Logger, job work, first *execRecord, mine *repb.ExecuteResponse) {
	theirs, err := first.response(ctx, w.cas)
	if err != nil {
		w.mDup.WithLabelValues("not_compared").Inc()
		log.Warn("a second run completed; the first's response is unreadable", "err", err)
		return
	}
	ok := func(r *repb.ExecuteResponse) bool { return r.GetStatus().GetCode() == 0 && r.GetResult() != nil }
	if first.InFlight != "" && ok(theirs) && theirs.GetResult().GetExitCode() == 0 {
		d, _ := cache.ParseDigest(job.Action)
		if err := w.ac.Put(ctx, cache.ActionKey{Instance: job.Instance, Action: d}, theirs.GetResult()); err != nil {
			log.Warn("could not restore the first run's action-cache entry", "err", err)
		}
	}
	if !ok(theirs) || !ok(mine) {
		w.mDup.WithLabelValues("not_compared").Inc()
		log.Info("a second run of the execution completed; one of the two has no result to compare", "first_worker", first.Worker)
		return
	}
	a, err := verify.ManifestOf(ctx, w.cas, theirs.GetResult())
	if err == nil {
		var b verify.Manifest
		if b, err = verify.ManifestOf(ctx, w.cas, mine.GetResult()); err == nil {
			diffs := verify.Compare(a, b) // outputs, stdout, stderr and exit code
			if len(diffs) == 0 {
				w.mDup.WithLabelValues("same").Inc()
				log.Info("a second run of the execution (a lost lease) produced the same outputs", "first_worker", first.Worker)
				return
			}
			w.mDup.WithLabelValues("different").Inc()
			var names []string
			for _, d := range diffs {
				names = append(names, d.Output)
			}
			note := fmt.Sprintf("kiln cluster: this execution ran twice (worker %s lost its lease; %s ran it again) and the runs differ in %d output(s): %s; the first run's result stands",
				first.Worker, w.cfg.Name, len(diffs), strings.Join(names, ", "))
			log.Warn("a second run of the execution produced different outputs: the action is not deterministic", "first_worker", first.Worker, "differences", strings.Join(names, ", "))
			w.note(ctx, log, job, note)
			return
		}
	}
	w.mDup.WithLabelValues("not_compared").Inc()
	log.Warn("a second run completed; its outputs could not be compared", "err", err)
}

// note appends a line to the recorded response's message.
func (w *Worker) note(ctx context.Context, log *slog.Logger, job work, note string) {
	_, err := updateRecord(ctx, w.c, execKey(job.Exec), func(x *execRecord) error {
		resp, err := x.response(ctx, w.cas)
		if err != nil {
			return err
		}
		if strings.Contains(resp.Message, note) {
			return errUnchanged
		}
		resp.Message = strings.TrimSpace(resp.Message + "\n" + note)
		return x.setResponse(ctx, w.cas, resp)
	})
	if err != nil && !errors.Is(err, errUnchanged) {
		log.Warn("could not note the difference in the execution's response", "err", err)
	}
}
