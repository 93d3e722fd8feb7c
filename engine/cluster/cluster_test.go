package cluster

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"strings"

	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/cachetest"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/engine/execution"
	"github.com/kilnbuild/kiln/engine/executor"
	"github.com/kilnbuild/kiln/engine/executor/executortest"
	"github.com/kilnbuild/kiln/engine/limits"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// These tests run the frontend and the worker against an in-process JetStream (the
// embedded server) with a fake executor and scheduler; test/cluster_e2e_test.go runs
// the real processes, sandboxes and bucket.

func TestVersionCheck(t *testing.T) {
	for _, c := range []struct {
		a, b string
		less bool
	}{{"2.9.10", "2.10.0", true}, {"2.10.0", "2.10.0", false}, {"2.15.3", "2.10.0", false}, {"2.10.0-beta.1", "2.10.0", false}, {"1.99.99", "2.10.0", true}} {
		if got := versionLess(c.a, c.b); got != c.less {
			t.Errorf("versionLess(%s, %s) = %v", c.a, c.b, got)
		}
	}
	if err := checkVersion("2.9.10"); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "too old") {
		t.Errorf("2.9.10: %v", err)
	}
	if err := checkVersion("2.15.3"); err != nil {
		t.Errorf("2.15.3: %v", err)
	}
}

func TestConfigCheck(t *testing.T) {
	for _, c := range []struct {
		cfg  Config
		want string // "" = valid
	}{
		{Config{}, ""},
		{Config{URL: "nats://a:4222,nats://b:4222"}, ""},
		{Config{URL: "a:4222"}, ""},
		{Config{URL: "embedded", Listen: "127.0.0.1:4222"}, ""},
		{Config{URL: "embedded"}, "needs --cluster-listen"},
		{Config{Listen: "127.0.0.1:4222"}, "needs --cluster embedded"},
		{Config{URL: "nats://a:4222", Listen: "x:1"}, "for --cluster embedded only"},
		{Config{URL: "http://a:4222"}, "want nats://"},
		{Config{URL: "nats://u:p@a:4222"}, "no credentials in the URL"},
		{Config{URL: "nats://a:4222", TLSCert: "c"}, "go together"},
		{Config{URL: "nats://a:4222", AckWait: time.Millisecond}, "at least 300ms"},
	} {
		err := c.cfg.Check()
		if (c.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), c.want)) {
			t.Errorf("%+v: %v, want %q", c.cfg, err, c.want)
		}
	}
	if got := (Config{URL: "a:1, nats://b:2"}).Servers(); len(got) != 2 || got[0] != "nats://a:1" || got[1] != "nats://b:2" {
		t.Errorf("servers %v", got)
	}
}

// embeddedJS starts an embedded JetStream and returns a connector to it.
func embeddedJS(t *testing.T) func() *Conn {
	t.Helper()
	es, err := StartEmbedded("127.0.0.1:0", t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(es.Shutdown)
	return func() *Conn {
		c, err := Connect(context.Background(), Config{URL: es.URL(), AckWait: time.Second, MaxDeliver: 2}, "test", nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
		return c
	}
}

// loader is a frontend's fake executor: every action is valid, none cached.
type loader struct{}

func (loader) LoadAction(_ context.Context, d cache.Digest) (*executor.Action, error) {
	return &executor.Action{Digest: d, Action: &repb.Action{}}, nil
}
func (loader) CachedResult(context.Context, string, cache.Digest) (*repb.ActionResult, error) {
	return nil, status.Error(codes.NotFound, "miss")
}
func (loader) AdmitInputs(context.Context, string, *executor.Action, *limits.Budget, *limits.Work) (*limits.Charge, error) {
	return nil, nil
}

// sched is a worker's fake local scheduler: each run blocks until release is closed
// (or its context ends), then answers exit 0.
type sched struct {
	release   chan struct{}
	runs      atomic.Int32
	cancelled atomic.Int32
	started   chan cache.Digest
}

func newSched() *sched {
	return &sched{release: make(chan struct{}), started: make(chan cache.Digest, 16)}
}

func (s *sched) Submit(ctx context.Context, req execution.Request) (execution.Watch, error) {
	s.runs.Add(1)
	s.started <- req.ActionDigest
	return &fakeWatch{s: s, d: req.ActionDigest}, nil
}
func (s *sched) Wait(context.Context, string, string) (execution.Watch, error) { panic("unused") }
func (s *sched) Get(context.Context, string, string) (*longrunningpb.Operation, error) {
	panic("unused")
}
func (s *sched) Cancel(context.Context, string, string) error { return nil }
func (s *sched) Delete(context.Context, string, string) error { return nil }

type fakeWatch struct {
	s *sched
	d cache.Digest
}

func (w *fakeWatch) Name() string { return "operations/fake" }
func (w *fakeWatch) Close()       {}
func (w *fakeWatch) Next(ctx context.Context, seen *repb.ExecutionStage_Value) (*longrunningpb.Operation, error) {
	select {
	case <-w.s.release:
	case <-ctx.Done():
		w.s.cancelled.Add(1)
		return nil, ctx.Err()
	}
	return execution.Operation("operations/fake", w.d, repb.ExecutionStage_COMPLETED,
		&repb.ExecuteResponse{Result: &repb.ActionResult{StdoutRaw: []byte("ran " + w.d.Hash)}, Status: execution.StatusProto(nil)})
}

// worker starts a worker with s on a new connection, its key admitted; cancel stops it.
func worker(t *testing.T, connect func() *Conn, s *sched, grace time.Duration) (cancel func(), done chan error) {
	t.Helper()
	c := connect()
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	if _, err := c.AdmitKeys(context.Background(), keys.PublicPEM(pub), time.Now()); err != nil {
		t.Fatal(err)
	}
	w := NewWorker(c, s, cache.NewMemoryStore(), nil, WorkerConfig{Name: "test-worker", Concurrency: 2, Grace: grace, KeyID: keys.KeyID(pub)})
	ctx, stop := context.WithCancel(context.Background())
	done = make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() { stop(); <-done })
	return stop, done
}

func action(n byte) cache.Digest { return cache.DigestOf([]byte{n}) }

func response(t *testing.T, w execution.Watch) *repb.ExecuteResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := execution.Response(ctx, w)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// histogram reads h's observation count and sum.
func histogram(t *testing.T, h prometheus.Histogram) (uint64, float64) {
	t.Helper()
	var m dto.Metric
	if err := h.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleCount(), m.GetHistogram().GetSampleSum()
}

func messages(t *testing.T, c *Conn) uint64 {
	t.Helper()
	info, err := c.Work.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Msgs
}

// TestFrontendsMerge: the same action through two frontends is one execution (one work
// message, one run); each client has its own operation, which any frontend answers for
// its owner only; after completion, Execute starts a new execution.
func TestFrontendsMerge(t *testing.T) {
	connect := embeddedJS(t)
	f1 := NewFrontend(connect(), loader{}, cache.NewMemoryStore(), prometheus.NewRegistry(), nil)
	f2 := NewFrontend(connect(), loader{}, cache.NewMemoryStore(), prometheus.NewRegistry(), nil)
	ctx := context.Background()
	a := action(1)
	begin := time.Now()
	wa, err := f1.Submit(ctx, execution.Request{ActionDigest: a, Owner: "alice"})
	if err != nil {
		t.Fatal(err)
	}
	wb, err := f2.Submit(ctx, execution.Request{ActionDigest: a, Owner: "bob"})
	if err != nil {
		t.Fatal(err)
	}
	if n := messages(t, f1.c); n != 1 || testutil.ToFloat64(f2.mMerged) != 1 || wa.Name() == wb.Name() {
		t.Fatalf("%d work messages, %v merged, operations %s %s", n, testutil.ToFloat64(f2.mMerged), wa.Name(), wb.Name())
	}
	if _, err := f2.Wait(ctx, wa.Name(), "bob"); status.Code(err) != codes.NotFound {
		t.Fatalf("bob waits on alice's operation: %v", err)
	}
	wa2, err := f2.Wait(ctx, wa.Name(), "alice")
	if err != nil {
		t.Fatal(err)
	}
	s := newSched()
	worker(t, connect, s, time.Second)
	<-s.started
	held := time.Now()
	if op, err := f1.Get(ctx, wb.Name(), "bob"); err != nil || op.GetDone() {
		t.Fatalf("bob's operation while it runs: %v %v", op, err)
	}
	if err := f1.Delete(ctx, wb.Name(), "bob"); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("delete a running operation: %v", err)
	}
	time.Sleep(100 * time.Millisecond)
	close(s.release)
	held2 := time.Now()
	for _, w := range []execution.Watch{wa, wb, wa2} {
		if r := response(t, w); string(r.GetResult().GetStdoutRaw()) != "ran "+a.Hash {
			t.Fatalf("%s: %v", w.Name(), r)
		}
	}
	// The path time is the queueing frontend's, once, and leaves the worker's run out:
	// at most the whole time less the part of the run this test held.
	total := time.Since(begin)
	if n, sum := histogram(t, f1.mPath); n != 1 || sum <= 0 || sum > (total-held2.Sub(held)).Seconds() {
		t.Errorf("path time at the queueing frontend: %d observations, sum %.4f s; the whole took %v, the run was held %v", n, sum, total, held2.Sub(held))
	}
	if n, _ := histogram(t, f2.mPath); n != 0 {
		t.Errorf("the joining frontend observed the path time %d times", n)
	}
	if s.runs.Load() != 1 {
		t.Fatalf("%d runs", s.runs.Load())
	}
	if err := f1.Delete(ctx, wb.Name(), "bob"); err != nil {
		t.Fatal(err)
	}
	if _, err := f2.Get(ctx, wb.Name(), "bob"); status.Code(err) != codes.NotFound {
		t.Fatalf("deleted operation: %v", err)
	}
	// Done (and not cached, by this fake): the next Execute is a new execution.
	wc, err := f2.Submit(ctx, execution.Request{ActionDigest: a})
	if err != nil {
		t.Fatal(err)
	}
	response(t, wc)
	if s.runs.Load() != 2 {
		t.Fatalf("%d runs, want 2", s.runs.Load())
	}
}

// TestCancelStopsTheRun: cancelling every operation on an execution stops its run on
// the worker; the operation ends CANCELLED and the work message is gone.
func TestCancelStopsTheRun(t *testing.T) {
	connect := embeddedJS(t)
	f := NewFrontend(connect(), loader{}, cache.NewMemoryStore(), nil, nil)
	s := newSched()
	worker(t, connect, s, time.Second)
	ctx := context.Background()
	w, err := f.Submit(ctx, execution.Request{ActionDigest: action(2)})
	if err != nil {
		t.Fatal(err)
	}
	<-s.started
	if err := f.Cancel(ctx, w.Name(), ""); err != nil {
		t.Fatal(err)
	}
	if r := response(t, w); codes.Code(r.GetStatus().GetCode()) != codes.Canceled {
		t.Fatalf("cancelled operation: %v", r)
	}
	deadline := time.Now().Add(10 * time.Second)
	for s.cancelled.Load() == 0 || messages(t, f.c) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("run cancelled %d, %d work messages left", s.cancelled.Load(), messages(t, f.c))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestCancelledWhileQueued: an execution cancelled before a worker took it ends
// CANCELLED and leaves the queue, even though a first delivery starts running before
// its record is read (and this fake run ends at once).
func TestCancelledWhileQueued(t *testing.T) {
	connect := embeddedJS(t)
	f := NewFrontend(connect(), loader{}, cache.NewMemoryStore(), nil, nil)
	ctx := context.Background()
	w, err := f.Submit(ctx, execution.Request{ActionDigest: action(4)})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Cancel(ctx, w.Name(), ""); err != nil {
		t.Fatal(err)
	}
	s := newSched()
	close(s.release)
	worker(t, connect, s, time.Second)
	if r := response(t, w); codes.Code(r.GetStatus().GetCode()) != codes.Canceled {
		t.Fatalf("operation cancelled while queued: %v", r)
	}
	deadline := time.Now().Add(10 * time.Second)
	for messages(t, f.c) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d work messages left", messages(t, f.c))
		}
		time.Sleep(10 * time.Millisecond)
	}
	var x execRecord
	op, _ := f.Get(ctx, w.Name(), "")
	if _, err := f.c.getRecord(ctx, execKey(execOf(t, f, w)), &x); err != nil || !x.done() || x.Ran != 0 {
		t.Fatalf("the cancelled execution's record: %+v, %v (operation %v)", x, err, op)
	}
}

// execOf returns the execution id of watch w's operation.
func execOf(t *testing.T, f *Frontend, w execution.Watch) string {
	t.Helper()
	_, op, err := f.lookup(context.Background(), w.Name(), "")
	if err != nil {
		t.Fatal(err)
	}
	return op.Exec
}

// TestWorkerHandsBack: a worker told to stop hands its running action back after its
// grace; another worker completes it; the client's one operation gets the answer.
func TestWorkerHandsBack(t *testing.T) {
	connect := embeddedJS(t)
	f := NewFrontend(connect(), loader{}, cache.NewMemoryStore(), nil, nil)
	s1 := newSched()
	stop, done := worker(t, connect, s1, 100*time.Millisecond)
	ctx := context.Background()
	w, err := f.Submit(ctx, execution.Request{ActionDigest: action(3)})
	if err != nil {
		t.Fatal(err)
	}
	<-s1.started
	stop()
	if err := <-done; err != nil {
		t.Fatalf("worker: %v", err)
	}
	done <- nil // for the cleanup
	if s1.cancelled.Load() != 1 || messages(t, f.c) != 1 {
		t.Fatalf("after the grace: run cancelled %d, %d work messages", s1.cancelled.Load(), messages(t, f.c))
	}
	s2 := newSched()
	close(s2.release)
	worker(t, connect, s2, time.Second)
	if r := response(t, w); r.GetStatus().GetCode() != 0 || s2.runs.Load() != 1 {
		t.Fatalf("after the hand-back: %v, %d runs", r, s2.runs.Load())
	}
}

// TestNotAdmitted: a worker whose key is not in the trust set does not start.
func TestNotAdmitted(t *testing.T) {
	c := embeddedJS(t)()
	w := NewWorker(c, newSched(), cache.NewMemoryStore(), nil, WorkerConfig{KeyID: "0123"})
	if err := w.Run(context.Background()); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "not admitted") {
		t.Fatalf("unadmitted worker: %v", err)
	}
}

// TestFrontendValidatesInputTree (issue 19, case 6, in a cluster): a frontend reads and
// validates an execution's input tree before it queues it, so a 21-blob tree claiming
// 2^20 directories is refused after reading each distinct blob once and never reaches
// a worker; a tree beyond the client's memory share is RESOURCE_EXHAUSTED; a valid one
// is queued.
func TestFrontendValidatesInputTree(t *testing.T) {
	var reads *cachetest.CountingStore
	env := executortest.NewEnv(t, func(c *executor.ExecutorConfig) {
		reads = &cachetest.CountingStore{BlobStore: c.CAS}
		c.CAS = reads
	})
	mem := limits.NewBudget(64<<20, 1<<20)
	f := NewFrontend(embeddedJS(t)(), env.Exec, env.CAS, nil, nil).Limit(mem, limits.NewWork(1, false), 0)
	ctx := context.Background()

	root := env.Put(t, &repb.Directory{Files: []*repb.FileNode{{Name: "leaf", Digest: cache.EmptyDigest.Proto()}}})
	for i := 0; i < 20; i++ {
		root = env.Put(t, &repb.Directory{Directories: []*repb.DirectoryNode{{Name: "a", Digest: root.Proto()}, {Name: "b", Digest: root.Proto()}}})
	}
	hostile := env.Action(t, &repb.Command{Arguments: []string{"true"}}, root, nil)
	before := reads.N.Load()
	_, err := f.Submit(ctx, execution.Request{ActionDigest: hostile, Client: "attacker"})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), "more than") {
		t.Fatalf("hostile tree: %v, want INVALID_ARGUMENT before it is queued", err)
	}
	if n := reads.N.Load() - before; n > 3+21 {
		t.Fatalf("validating a 21-blob tree read %d blobs: shared subtrees must be read and counted once", n)
	}

	big := &repb.Directory{}
	for i := 0; i < 10_000; i++ {
		big.Files = append(big.Files, &repb.FileNode{Name: fmt.Sprintf("f%05d", i), Digest: cache.EmptyDigest.Proto()})
	}
	greedy := env.Action(t, &repb.Command{Arguments: []string{"true"}}, env.Put(t, big), nil)
	if _, err := f.Submit(ctx, execution.Request{ActionDigest: greedy, Client: "greedy"}); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a tree beyond the client's memory share: %v", err)
	}
	if n := messages(t, f.c); n != 0 {
		t.Fatalf("%d work messages queued for refused executions", n)
	}

	small := env.Put(t, &repb.Directory{Files: []*repb.FileNode{{Name: "f", Digest: cache.EmptyDigest.Proto()}}})
	w, err := f.Submit(ctx, execution.Request{ActionDigest: env.Action(t, &repb.Command{Arguments: []string{"true"}}, small, nil), Client: "honest"})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if n, used := messages(t, f.c), mem.Used(""); n != 1 || used != 0 {
		t.Fatalf("valid execution: %d work messages, %d bytes still charged", n, used)
	}
}

// TestFrontendClientQueuedLimit: one client may have --client-max-queued executions queued
// through a frontend; the next is refused RESOURCE_EXHAUSTED while another client's is
// queued; a client that leaves does not free its slots (its executions stay queued),
// a worker taking them does.
func TestFrontendClientQueuedLimit(t *testing.T) {
	connect := embeddedJS(t)
	f := NewFrontend(connect(), loader{}, cache.NewMemoryStore(), nil, nil).Limit(nil, nil, 2)
	ctx := context.Background()
	submit := func(client string, n byte) (execution.Watch, error) {
		return f.Submit(ctx, execution.Request{ActionDigest: action(n), Client: client})
	}
	var ws []execution.Watch
	for n := byte(10); n < 12; n++ {
		w, err := submit("attacker", n)
		if err != nil {
			t.Fatal(err)
		}
		ws = append(ws, w)
	}
	if _, err := submit("attacker", 12); status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "--client-max-queued") {
		t.Fatalf("a third queued execution of a client limited to two: %v", err)
	}
	honest, err := submit("honest", 13)
	if err != nil {
		t.Fatalf("another client while the first is at its limit: %v", err)
	}
	for _, w := range ws {
		w.Close() // the attacker leaves; its executions stay queued
	}
	time.Sleep(100 * time.Millisecond)
	if _, err := submit("attacker", 12); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("after the client left, with its executions still queued: %v", err)
	}
	s := newSched()
	close(s.release)
	worker(t, connect, s, time.Second)
	response(t, honest)
	deadline := time.Now().Add(20 * time.Second)
	for f.queued.InUse("attacker") != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d slots still held after a worker took the executions", f.queued.InUse("attacker"))
		}
		time.Sleep(20 * time.Millisecond)
	}
	w, err := submit("attacker", 12)
	if err != nil {
		t.Fatalf("after a worker took its executions: %v", err)
	}
	response(t, w)
}
