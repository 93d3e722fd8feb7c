package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"sync"
	"time"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/execution"
	"github.com/kilnbuild/kiln/engine/executor"
	"github.com/kilnbuild/kiln/engine/limits"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// Loader validates actions and looks up the action cache: the frontend's executor,
// which never runs anything itself.
type Loader interface {
	LoadAction(ctx context.Context, d cache.Digest) (*executor.Action, error)
	CachedResult(ctx context.Context, instance string, d cache.Digest) (*repb.ActionResult, error)
	// AdmitInputs reads and validates a's input tree as client's work, charged to its
	// share of mem (executor.Executor.AdmitInputs).
	AdmitInputs(ctx context.Context, client string, a *executor.Action, mem *limits.Budget, work *limits.Work) (*limits.Charge, error)
}

// Frontend is the execution.Scheduler of a stateless kiln serve in a cluster: Submit
// validates the action and looks up the action cache here, then starts (or joins) the
// execution in the cluster's state and queues it for the workers; every operation is
// answered from the state bucket, so any frontend serves WaitExecution, GetOperation,
// CancelOperation and DeleteOperation for any operation.
//
// Unlike the local scheduler, an execution is not cancelled when its clients leave: it
// runs on a worker, and its result is cached for the client's retry (through any
// frontend). CancelOperation of every operation on it does stop it.
type Frontend struct {
	c    *Conn
	load Loader
	cas  cache.BlobStore
	log  *slog.Logger
	mem  *limits.Budget // charged for an input tree while it is validated (nil: not bounded)
	work *limits.Work   // bounds one client's validation work (nil: not bounded)
	// queued counts each client's executions queued through this frontend until a
	// worker takes them (nil: not bounded).
	queued *limits.Slots

	mExec   *prometheus.CounterVec
	mMerged prometheus.Counter
	mPath   prometheus.Histogram
}

// NewFrontend returns the scheduler of a frontend on c; reg (may be nil) gets its
// metrics, kiln_cluster_queue_pending{platform} among them.
func NewFrontend(c *Conn, load Loader, cas cache.BlobStore, reg prometheus.Registerer, log *slog.Logger) *Frontend {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	f := &Frontend{c: c, load: load, cas: cas, log: log,
		mExec:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kiln_executions_total", Help: "Execute calls by outcome at this frontend (cached, queued, merged, refused)."}, []string{"outcome"}),
		mMerged: prometheus.NewCounter(prometheus.CounterOpts{Name: "kiln_executions_merged_total", Help: "Execute calls merged into an identical execution already in flight in the cluster."}),
		mPath: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "kiln_cluster_path_seconds",
			Help:    "Per action this frontend queued and a worker ran once: the time from queueing it (after validation) to seeing its result, less the worker's run (its executor's time). What the cluster adds to a single kiln serve, but for the executor's own phases.",
			Buckets: []float64{.00025, .0005, .00075, .001, .0015, .002, .0025, .003, .004, .005, .0075, .01, .015, .02, .05, .1, .5, 1, 5}}),
	}
	if reg != nil {
		reg.MustRegister(f.mExec, f.mMerged, f.mPath, newQueueCollector(c))
	}
	return f
}

// Limit charges the validation of input trees to the client's share of mem and runs
// it as the client's work, and bounds the executions one client has queued through
// this frontend to clientQueued (0: none) until a worker takes them (kiln serve's
// limits); it returns f.
func (f *Frontend) Limit(mem *limits.Budget, work *limits.Work, clientQueued int) *Frontend {
	f.mem, f.work = mem, work
	if clientQueued > 0 {
		f.queued = limits.NewSlots(mem, "queued_executions", "queued executions", "--client-max-queued", clientQueued, 0)
	}
	return f
}

// PlatformKey is the work subject an action is queued on. Every action kiln accepts
// runs on Linux x86-64 (the executor refuses other OSFamily/Arch properties) and any
// worker runs any toolchain (toolchains come from shared storage), so today there is
// one key; this is the one place that learns more.
func PlatformKey(*executor.Action) string { return "linux-amd64" }

// Submit implements execution.Scheduler.
func (f *Frontend) Submit(ctx context.Context, req execution.Request) (execution.Watch, error) {
	a, err := f.load.LoadAction(ctx, req.ActionDigest)
	if err != nil {
		return nil, err
	}
	op := opRecord{Owner: req.Owner, Action: req.ActionDigest.String()}
	opID := newID()
	if !req.SkipCacheLookup {
		r, err := f.load.CachedResult(ctx, req.Instance, req.ActionDigest)
		switch {
		case err == nil:
			f.mExec.WithLabelValues("cached").Inc()
			if op.Response, err = proto.Marshal(&repb.ExecuteResponse{Result: r, CachedResult: true, Status: execution.StatusProto(nil)}); err != nil {
				return nil, status.Errorf(codes.Internal, "response: %v", err)
			}
			w := f.newWatch(opID, op)
			if _, err := f.c.createRecord(ctx, opKey(opID), &op); err != nil {
				return nil, err
			}
			return w, nil
		case status.Code(err) != codes.NotFound:
			return nil, err
		}
	}
	// The client's queue slot first: it is held until a worker takes the execution,
	// whether or not the client stays to wait.
	unqueue := func() {}
	if f.queued != nil && req.Client != "" {
		if unqueue, err = f.queued.Acquire(req.Client); err != nil {
			return nil, err
		}
	}
	holding := false
	defer func() {
		if !holding {
			unqueue()
		}
	}()
	// The input tree is read and validated here, before the execution is queued, so a
	// tree a worker would refuse never reaches one (issue 19).
	charge, err := f.load.AdmitInputs(ctx, req.Client, a, f.mem, f.work)
	if err != nil {
		if c := status.Code(err); c == codes.InvalidArgument || c == codes.FailedPrecondition {
			f.mExec.WithLabelValues("refused").Inc()
		}
		return nil, err
	}
	charge.Release()
	rec := execRecord{ID: newID(), Instance: req.Instance, Action: req.ActionDigest.String(), Platform: PlatformKey(a),
		Stage: repb.ExecutionStage_QUEUED, Queued: time.Now(), Live: 1, SkipCache: req.SkipCacheLookup}
	if !a.Action.GetDoNotCache() {
		rec.InFlight = inFlightKey(req.Instance, req.ActionDigest)
	}
	op.Exec = rec.ID
	w := f.newWatch(opID, op)
	w.exec = &rec
	ok := false
	defer func() {
		if !ok {
			w.Close()
		}
	}()
	queuedAt := time.Now() // monotonic, unlike rec.Queued once in JSON
	if _, err := f.c.createRecord(ctx, execKey(rec.ID), &rec); err != nil {
		return nil, err
	}
	var joined *execRecord
	if rec.InFlight != "" {
		if joined, err = f.start(ctx, &rec, w); err != nil {
			return nil, err
		}
	}
	queue := &rec
	if joined != nil {
		// Ours was not needed; the one in flight carries this operation.
		f.c.State.Delete(context.WithoutCancel(ctx), execKey(rec.ID))
		op.Exec, w.op.Exec, w.exec = joined.ID, joined.ID, joined
		f.mMerged.Inc()
		f.mExec.WithLabelValues("merged").Inc()
		queue = nil
		if joined.Stage == repb.ExecutionStage_QUEUED {
			queue = joined // queue it again: a no-op by its message id, unless its frontend died before it could
		}
	} else {
		f.mExec.WithLabelValues("queued").Inc()
		w.queued = queuedAt
	}
	if joined == nil && f.queued != nil && req.Client != "" {
		// Subscribed before the publish, so that no change of the record is missed.
		if stop, err := f.holdWhileQueued(rec.ID, unqueue); err == nil {
			holding = true
			defer func() {
				if !ok {
					stop()
				}
			}()
		}
	}
	g, gctx := errgroup.WithContext(ctx)
	if queue != nil {
		g.Go(func() error { return f.publish(gctx, queue, f.seeds(gctx, a)) })
	}
	g.Go(func() error {
		_, err := f.c.createRecord(gctx, opKey(opID), &op)
		return err
	})
	if err := g.Wait(); err != nil {
		return nil, err
	}
	ok = true
	return w, nil
}

// holdWhileQueued calls release once execution id has left the queue: a worker took it,
// it completed or was cancelled, or its record is gone. stop releases it now.
func (f *Frontend) holdWhileQueued(id string, release func()) (stop func(), err error) {
	ch := make(chan *nats.Msg, 8)
	sub, err := f.c.NC.ChanSubscribe("$KV."+stateBucket+"."+execKey(id), ch)
	if err != nil {
		return nil, err
	}
	quit := make(chan struct{})
	var once sync.Once
	stop = func() { once.Do(func() { close(quit) }) }
	left := func(b []byte) bool {
		var x execRecord
		return json.Unmarshal(b, &x) != nil || x.Stage != repb.ExecutionStage_QUEUED
	}
	go func() {
		defer release()
		defer sub.Unsubscribe()
		t := time.NewTicker(5 * time.Second) // a message lost in a reconnection
		defer t.Stop()
		for {
			select {
			case <-quit:
				return
			case m := <-ch:
				if m.Header.Get("KV-Operation") != "" || left(m.Data) {
					return
				}
			case <-t.C:
				if f.c.NC.IsClosed() {
					return // the frontend is shutting down
				}
				e, err := f.c.State.Get(context.Background(), execKey(id))
				if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) || (err == nil && left(e.Value())) {
					return
				}
			}
		}
	}()
	return stop, nil
}

// publish queues rec for a worker; its id is the message id, so publishing it again
// within the stream's duplicate window queues nothing more.
func (f *Frontend) publish(ctx context.Context, rec *execRecord, seeds map[string][]byte) error {
	b, err := json.Marshal(work{Exec: rec.ID, Instance: rec.Instance, Action: rec.Action, Queued: rec.Queued, SkipCache: rec.SkipCache, Blobs: seeds})
	if err != nil {
		return status.Errorf(codes.Internal, "work: %v", err)
	}
	if _, err := f.c.JS.Publish(ctx, workSubject+rec.Platform, b, jetstream.WithMsgID(rec.ID)); err != nil {
		return f.c.wrap(err, "queue action %s", rec.Action)
	}
	return nil
}

// seeds collects the blobs a worker reads first and one after another: the Action,
// the Command and the input tree's Directory messages, breadth first, up to seedBytes.
// They come from this frontend's local tier, where the client's upload left them; what
// cannot be read here is left to the worker.
func (f *Frontend) seeds(ctx context.Context, a *executor.Action) map[string][]byte {
	out := map[string][]byte{}
	total := 0
	add := func(d cache.Digest) []byte {
		if d.Size == 0 || total+int(d.Size) > seedBytes || out[d.String()] != nil {
			return nil
		}
		b, err := cache.ReadAll(ctx, f.cas, d, d.Size)
		if err != nil {
			return nil
		}
		out[d.String()], total = b, total+len(b)
		return b
	}
	add(a.Digest)
	add(a.CmdDigest)
	root, err := cache.FromProto(a.Action.GetInputRootDigest())
	if err != nil {
		return out
	}
	queue := []cache.Digest{root}
	for len(queue) > 0 && total < seedBytes {
		d := queue[0]
		queue = queue[1:]
		b := add(d)
		if b == nil {
			continue
		}
		var dir repb.Directory
		if proto.Unmarshal(b, &dir) != nil {
			continue
		}
		for _, sub := range dir.GetDirectories() {
			if sd, err := cache.FromProto(sub.GetDigest()); err == nil {
				queue = append(queue, sd)
			}
		}
	}
	return out
}

var errStale = errors.New("stale")

// start makes rec the in-flight execution of its action with a KV create of its
// in-flight key, or joins the execution already in flight (its Live count + 1) and
// returns it. An in-flight key left by an execution that finished is taken over.
func (f *Frontend) start(ctx context.Context, rec *execRecord, w *watch) (*execRecord, error) {
	for attempt := 0; attempt < 20; attempt++ {
		_, err := f.c.State.Create(ctx, rec.InFlight, []byte(rec.ID))
		if err == nil {
			return nil, nil
		}
		if !errors.Is(err, jetstream.ErrKeyExists) {
			return nil, f.c.wrap(err, "start execution of %s", rec.Action)
		}
		e, err := f.c.State.Get(ctx, rec.InFlight)
		if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
			continue
		}
		if err != nil {
			return nil, f.c.wrap(err, "start execution of %s", rec.Action)
		}
		other := string(e.Value())
		w.follow(other) // before reading it: no change after the read is missed
		x, err := updateRecord(ctx, f.c, execKey(other), func(x *execRecord) error {
			if x.done() || x.Cancel {
				return errStale
			}
			x.Live++
			return nil
		})
		if err == nil {
			return x, nil
		}
		if !errors.Is(err, errStale) && status.Code(err) != codes.NotFound {
			return nil, err
		}
		w.follow(rec.ID)
		if _, err := f.c.State.Update(ctx, rec.InFlight, []byte(rec.ID), e.Revision()); err == nil {
			return nil, nil
		}
	}
	return nil, status.Errorf(codes.Aborted, "start execution of %s: too much contention on its in-flight key; retry", rec.Action)
}

// lookup reads owner's operation called name; another owner's is NOT_FOUND.
func (f *Frontend) lookup(ctx context.Context, name, owner string) (string, *opRecord, error) {
	id, ok := opID(name)
	notFound := status.Errorf(codes.NotFound, "operation %q not found (unknown, or finished too long ago)", name)
	if !ok {
		return "", nil, notFound
	}
	var op opRecord
	if _, err := f.c.getRecord(ctx, opKey(id), &op); err != nil {
		if status.Code(err) == codes.NotFound {
			return "", nil, notFound
		}
		return "", nil, err
	}
	if op.Owner != owner {
		return "", nil, notFound
	}
	return id, &op, nil
}

// Wait implements execution.Scheduler.
func (f *Frontend) Wait(ctx context.Context, name, owner string) (execution.Watch, error) {
	id, _, err := f.lookup(ctx, name, owner)
	if err != nil {
		return nil, err
	}
	w := f.newWatch(id, opRecord{})
	if err := w.refresh(ctx); err != nil { // after subscribing: nothing is missed
		w.Close()
		return nil, err
	}
	return w, nil
}

// Get implements execution.Scheduler.
func (f *Frontend) Get(ctx context.Context, name, owner string) (*longrunningpb.Operation, error) {
	id, op, err := f.lookup(ctx, name, owner)
	if err != nil {
		return nil, err
	}
	w := &watch{f: f, id: id, op: *op}
	if err := w.readExec(ctx); err != nil {
		return nil, err
	}
	stage, resp, err := w.state(ctx)
	if err != nil {
		return nil, err
	}
	return w.operation(stage, resp)
}

// Cancel implements execution.Scheduler: the operation ends CANCELLED; its execution is
// stopped when every operation on it was cancelled.
func (f *Frontend) Cancel(ctx context.Context, name, owner string) error {
	id, op, err := f.lookup(ctx, name, owner)
	if err != nil {
		return err
	}
	if op.Response != nil {
		return nil
	}
	var x execRecord
	if _, err := f.c.getRecord(ctx, execKey(op.Exec), &x); err != nil || x.done() {
		return err
	}
	cancelled, err := proto.Marshal(&repb.ExecuteResponse{Status: execution.StatusProto(status.Error(codes.Canceled, "cancelled by CancelOperation"))})
	if err != nil {
		return status.Errorf(codes.Internal, "response: %v", err)
	}
	if _, err := updateRecord(ctx, f.c, opKey(id), func(o *opRecord) error {
		if o.Response != nil {
			return errUnchanged
		}
		o.Response = cancelled
		return nil
	}); err != nil {
		return err
	}
	_, err = updateRecord(ctx, f.c, execKey(op.Exec), func(x *execRecord) error {
		if x.done() {
			return errUnchanged
		}
		x.Live--
		x.Cancel = x.Live <= 0
		return nil
	})
	if status.Code(err) == codes.NotFound {
		return nil
	}
	return err
}

// Delete implements execution.Scheduler.
func (f *Frontend) Delete(ctx context.Context, name, owner string) error {
	id, op, err := f.lookup(ctx, name, owner)
	if err != nil {
		return err
	}
	if op.Response == nil {
		var x execRecord
		if _, err := f.c.getRecord(ctx, execKey(op.Exec), &x); err == nil && !x.done() {
			return status.Errorf(codes.FailedPrecondition, "operation %q is still running; cancel it first", name)
		}
	}
	if err := f.c.State.Delete(ctx, opKey(id)); err != nil {
		return f.c.wrap(err, "delete %s", name)
	}
	return nil
}

// watch follows one operation for one client, from the state bucket: it subscribes to
// the operation's and its execution's keys (plain NATS subscriptions: no server-side
// consumer per watch), applies every update it gets, and reads both records again after
// a reconnection (updates published meanwhile were not delivered) and every 10 s.
type watch struct {
	f    *Frontend
	id   string
	op   opRecord
	exec *execRecord
	subs []*nats.Subscription
	ch   chan *nats.Msg
	// queued is when this watch's Submit queued its execution, until its path time is
	// observed (zero for a joined or cached one).
	queued time.Time
}

func (f *Frontend) newWatch(id string, op opRecord) *watch {
	w := &watch{f: f, id: id, op: op, ch: make(chan *nats.Msg, 64)}
	w.subscribe(opKey(id))
	if op.Exec != "" {
		w.follow(op.Exec)
	}
	return w
}

// subscribe adds the state bucket's subject of key to the watch's subscriptions.
func (w *watch) subscribe(key string) {
	if w.ch == nil {
		return
	}
	s, err := w.f.c.NC.ChanSubscribe("$KV."+stateBucket+"."+key, w.ch)
	if err != nil {
		// Only the refresh timer will notice changes to this key.
		w.f.log.Warn("cannot subscribe to operation updates", "key", key, "err", err)
		return
	}
	w.subs = append(w.subs, s)
}

// follow subscribes to execution id (once).
func (w *watch) follow(id string) {
	for _, s := range w.subs {
		if s.Subject == "$KV."+stateBucket+"."+execKey(id) {
			return
		}
	}
	w.subscribe(execKey(id))
}

// Name implements execution.Watch.
func (w *watch) Name() string { return opName(w.id) }

// Close implements execution.Watch: it stops following; the execution goes on.
func (w *watch) Close() {
	for _, s := range w.subs {
		s.Unsubscribe()
	}
	w.subs = nil
}

// refresh reads the operation and its execution again.
func (w *watch) refresh(ctx context.Context) error {
	var op opRecord
	if _, err := w.f.c.getRecord(ctx, opKey(w.id), &op); err != nil {
		if status.Code(err) == codes.NotFound {
			return status.Errorf(codes.NotFound, "operation %q is gone (deleted, or retained no longer)", opName(w.id))
		}
		return err
	}
	w.op = op
	if op.Exec != "" {
		w.follow(op.Exec)
	}
	return w.readExec(ctx)
}

func (w *watch) readExec(ctx context.Context) error {
	if w.op.Exec == "" || w.op.Response != nil {
		return nil
	}
	var x execRecord
	if _, err := w.f.c.getRecord(ctx, execKey(w.op.Exec), &x); err != nil {
		if status.Code(err) == codes.NotFound {
			return status.Errorf(codes.NotFound, "the execution of operation %q is gone (retained no longer)", opName(w.id))
		}
		return err
	}
	w.exec = &x
	return nil
}

// apply takes one update of the operation's or execution's record.
func (w *watch) apply(m *nats.Msg) {
	if op := m.Header.Get("KV-Operation"); op != "" {
		return // deleted or purged: the next read says so
	}
	key := m.Subject[len("$KV."+stateBucket+"."):]
	switch {
	case key == opKey(w.id):
		var op opRecord
		if json.Unmarshal(m.Data, &op) == nil {
			w.op = op
		}
	case w.op.Exec != "" && key == execKey(w.op.Exec):
		var x execRecord
		if json.Unmarshal(m.Data, &x) == nil {
			w.exec = &x
		}
	}
}

// state is the operation's stage and, once done, its response.
func (w *watch) state(ctx context.Context) (repb.ExecutionStage_Value, *repb.ExecuteResponse, error) {
	if w.op.Response != nil {
		resp := &repb.ExecuteResponse{}
		if err := proto.Unmarshal(w.op.Response, resp); err != nil {
			return 0, nil, status.Errorf(codes.DataLoss, "operation %s: response: %v", opName(w.id), err)
		}
		return repb.ExecutionStage_COMPLETED, resp, nil
	}
	if w.exec == nil {
		return repb.ExecutionStage_UNKNOWN, nil, nil
	}
	if !w.exec.done() {
		return w.exec.Stage, nil, nil
	}
	resp, err := w.exec.response(ctx, w.f.cas)
	return repb.ExecutionStage_COMPLETED, resp, err
}

// observePath records what the cluster added to the execution this watch queued, once,
// if one worker ran it once (a redelivery's lost runs are not the path's).
func (w *watch) observePath() {
	x := w.exec
	if w.queued.IsZero() || x == nil || w.op.Response != nil || x.Ran <= 0 || x.Attempt != 1 {
		return
	}
	w.f.mPath.Observe(max(time.Since(w.queued)-x.Ran, 0).Seconds())
	w.queued = time.Time{}
}

func (w *watch) operation(stage repb.ExecutionStage_Value, resp *repb.ExecuteResponse) (*longrunningpb.Operation, error) {
	d, _ := cache.ParseDigest(w.op.Action)
	return execution.Operation(opName(w.id), d, stage, resp)
}

// Next implements execution.Watch.
func (w *watch) Next(ctx context.Context, seen *repb.ExecutionStage_Value) (*longrunningpb.Operation, error) {
	for {
		stage, resp, err := w.state(ctx)
		if err != nil {
			return nil, err
		}
		if stage != *seen && stage != repb.ExecutionStage_UNKNOWN {
			*seen = stage
			if stage == repb.ExecutionStage_COMPLETED {
				w.observePath()
			}
			return w.operation(stage, resp)
		}
		timer := time.NewTimer(10 * time.Second)
		select {
		case m := <-w.ch:
			w.apply(m)
		case <-w.f.c.Reconnected():
			err = w.refresh(ctx)
		case <-timer.C:
			err = w.refresh(ctx)
		case <-ctx.Done():
			timer.Stop()
			return nil, ctx.Err()
		}
		timer.Stop()
		if err != nil && status.Code(err) != codes.Unavailable {
			return nil, err
		}
	}
}

var _ execution.Scheduler = (*Frontend)(nil)
