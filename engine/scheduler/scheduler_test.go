package scheduler

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/execution"
	"github.com/kilnbuild/kiln/engine/executor/executortest"
	"github.com/kilnbuild/kiln/internal/clock"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// testEnv is a scheduler over an executor that runs the fake sandbox, on a fake clock.
type testEnv struct {
	*executortest.Env
	sched *Scheduler
	clock *clock.Fake
}

func newTestEnv(t *testing.T, conc int) *testEnv {
	t.Helper()
	e := &testEnv{Env: executortest.NewEnv(t, nil), clock: clock.NewFake(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))}
	e.sched = NewScheduler(e.Exec, SchedulerConfig{Concurrency: conc, MaxQueue: 4, CancelGrace: time.Minute, Clock: e.clock})
	return e
}

// blocked makes the fake sandbox hold every run until Release is closed (reporting
// each start on Started) and stores an action that writes output o, on an empty root.
func (e *testEnv) blocked(t *testing.T) (root, action cache.Digest) {
	t.Helper()
	e.Sandbox.Release = make(chan struct{})
	e.Sandbox.Started = make(chan string, 16)
	root = e.Put(t, &repb.Directory{})
	return root, e.Action(t, &repb.Command{Arguments: []string{"block", "write", "o", "x"}, OutputFiles: []string{"o"}}, root, nil)
}

// submit submits action d and fails t if the scheduler refuses it.
func (e *testEnv) submit(t *testing.T, d cache.Digest) execution.Watch {
	t.Helper()
	w, err := e.sched.Submit(context.Background(), execution.Request{ActionDigest: d})
	if err != nil {
		t.Fatal(err)
	}
	return w
}

// waitDone waits until the operation called name is done (its run ended: the fake
// sandbox answers cancellation at once) and returns its response.
func (e *testEnv) waitDone(t *testing.T, name string) *repb.ExecuteResponse {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		op, err := e.sched.Get(context.Background(), name, "")
		if err != nil {
			t.Fatal(err)
		}
		if op.GetDone() {
			resp := &repb.ExecuteResponse{}
			if err := op.GetResponse().UnmarshalTo(resp); err != nil {
				t.Fatal(err)
			}
			return resp
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("operation %s still running after 10 s", name)
	return nil
}

func (e *testEnv) run(t *testing.T, d cache.Digest) (*repb.ExecuteResponse, error) {
	t.Helper()
	w, err := e.sched.Submit(context.Background(), execution.Request{ActionDigest: d})
	if err != nil {
		return nil, err
	}
	defer w.Close()
	return execution.Response(context.Background(), w)
}

// TestCacheHitRunsNothing: an action already in the action cache is answered from it,
// done at once, and runs nothing; skip_cache_lookup runs it again.
func TestCacheHitRunsNothing(t *testing.T) {
	e := newTestEnv(t, 1)
	d := e.Action(t, &repb.Command{Arguments: []string{"write", "o", "x"}, OutputFiles: []string{"o"}}, e.Put(t, &repb.Directory{}), nil)
	if resp, err := e.run(t, d); err != nil || resp.GetCachedResult() || e.Sandbox.Runs.Load() != 1 {
		t.Fatalf("first execute: %v %v, %d runs", resp, err, e.Sandbox.Runs.Load())
	}
	resp, err := e.run(t, d)
	if err != nil || !resp.GetCachedResult() || len(resp.GetResult().GetOutputFiles()) != 1 || e.Sandbox.Runs.Load() != 1 {
		t.Fatalf("second execute: %v %v, %d runs; want the cached result and no run", resp, err, e.Sandbox.Runs.Load())
	}
	w, err := e.sched.Submit(context.Background(), execution.Request{ActionDigest: d, SkipCacheLookup: true})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if resp, err := execution.Response(context.Background(), w); err != nil || resp.GetCachedResult() || e.Sandbox.Runs.Load() != 2 {
		t.Fatalf("skip_cache_lookup: %v %v, %d runs", resp, err, e.Sandbox.Runs.Load())
	}
}

// TestMergeAndCancel: identical actions in flight run once; an execution whose every
// client leaves is cancelled; a full queue pushes back.
func TestMergeAndCancel(t *testing.T) {
	e := newTestEnv(t, 1)
	root, d := e.blocked(t)
	var ws []execution.Watch
	for i := 0; i < 5; i++ {
		w, err := e.sched.Submit(context.Background(), execution.Request{ActionDigest: d})
		if err != nil {
			t.Fatal(err)
		}
		ws = append(ws, w)
	}
	<-e.Sandbox.Started
	close(e.Sandbox.Release)
	var wg sync.WaitGroup
	for _, w := range ws {
		wg.Add(1)
		go func(w execution.Watch) {
			defer wg.Done()
			defer w.Close()
			resp, err := execution.Response(context.Background(), w)
			if err != nil || len(resp.GetResult().GetOutputFiles()) != 1 {
				t.Errorf("merged waiter: %v %v", err, resp)
			}
		}(w)
	}
	wg.Wait()
	if n := e.Sandbox.Runs.Load(); n != 1 {
		t.Fatalf("5 identical actions ran %d times", n)
	}

	// Cancellation: one client, it leaves, the running action is killed.
	e.Sandbox.Release = make(chan struct{})
	d2 := e.Action(t, &repb.Command{Arguments: []string{"block", "echo", "2"}}, root, nil)
	w, err := e.sched.Submit(context.Background(), execution.Request{ActionDigest: d2})
	if err != nil {
		t.Fatal(err)
	}
	<-e.Sandbox.Started
	w2, _ := e.sched.Wait(context.Background(), w.Name(), "")
	w.Close()
	w2.Close()
	e.clock.Advance(time.Minute) // the cancel grace
	if resp := e.waitDone(t, w.Name()); resp.GetResult().GetExitCode() != 137 && codes.Code(resp.GetStatus().GetCode()) != codes.Canceled {
		t.Fatalf("execution whose clients all left ended with %v, want it killed", resp)
	}

	// Backpressure: one running, MaxQueue (4) waiting, the next is refused.
	e.Sandbox.Release = make(chan struct{})
	var held []execution.Watch
	defer func() { // let every run finish before the test's directories go
		close(e.Sandbox.Release)
		for _, w := range held {
			execution.Response(context.Background(), w)
			w.Close()
		}
	}()
	for i := 0; i < 5; i++ {
		w, err := e.sched.Submit(context.Background(), execution.Request{ActionDigest: e.Action(t, &repb.Command{Arguments: []string{"block", "echo", fmt.Sprint("q", i)}}, root, nil)})
		if err != nil {
			t.Fatalf("submit %d: %v", i, err)
		}
		held = append(held, w)
		if i == 0 {
			<-e.Sandbox.Started
		}
	}
	_, err = e.sched.Submit(context.Background(), execution.Request{ActionDigest: e.Action(t, &repb.Command{Arguments: []string{"echo", "overflow"}}, root, nil)})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("queue over its bound: %v, want RESOURCE_EXHAUSTED", err)
	}
}

// TestCancelOperationMerged: clients merged into one run each get their own
// operation; one client's CancelOperation ends its own wait only, the run goes on for
// the others, and it is cancelled when the last one cancels.
func TestCancelOperationMerged(t *testing.T) {
	e := newTestEnv(t, 1)
	root, d := e.blocked(t)
	a := e.submit(t, d)
	defer a.Close()
	<-e.Sandbox.Started
	b := e.submit(t, d)
	defer b.Close()
	if a.Name() == b.Name() {
		t.Fatalf("merged clients share the operation name %s: one could cancel the other's", a.Name())
	}
	// A second watch on b's operation (WaitExecution) follows b's cancellation too.
	b2, err := e.sched.Wait(context.Background(), b.Name(), "")
	if err != nil {
		t.Fatal(err)
	}
	defer b2.Close()
	srv := execution.NewServer(e.sched, nil, nil)
	if _, err := srv.CancelOperation(context.Background(), &longrunningpb.CancelOperationRequest{Name: b.Name()}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, w := range []execution.Watch{b, b2} {
		resp, err := execution.Response(ctx, w)
		if err != nil || codes.Code(resp.GetStatus().GetCode()) != codes.Canceled {
			t.Fatalf("the cancelled operation answered %v %v, want CANCELLED", resp, err)
		}
	}
	op, err := srv.GetOperation(context.Background(), &longrunningpb.GetOperationRequest{Name: a.Name()})
	if err != nil || op.GetDone() {
		t.Fatalf("the other client's operation after one cancel: %v %v, want still running", op, err)
	}
	close(e.Sandbox.Release)
	resp, err := execution.Response(ctx, a)
	if err != nil || resp.GetStatus().GetCode() != 0 || len(resp.GetResult().GetOutputFiles()) != 1 {
		t.Fatalf("the client that did not cancel got %v %v, want the run's outputs", resp, err)
	}
	if n := e.Sandbox.Runs.Load(); n != 1 {
		t.Fatalf("the merged action ran %d times", n)
	}
	// Cancelling a finished operation does nothing; an unknown one is NOT_FOUND.
	if _, err := srv.CancelOperation(context.Background(), &longrunningpb.CancelOperationRequest{Name: a.Name()}); err != nil {
		t.Fatalf("cancel of a finished operation: %v", err)
	}
	if resp, _ := execution.Response(ctx, a); resp.GetStatus().GetCode() != 0 {
		t.Fatalf("a finished operation changed on cancel: %v", resp)
	}
	if _, err := srv.CancelOperation(context.Background(), &longrunningpb.CancelOperationRequest{Name: "operations/nope"}); status.Code(err) != codes.NotFound {
		t.Fatalf("cancel of an unknown operation: %v, want NOT_FOUND", err)
	}

	// The last client to cancel cancels the run: the blocked action is killed.
	e.Sandbox.Release = make(chan struct{})
	defer close(e.Sandbox.Release)
	d2 := e.Action(t, &repb.Command{Arguments: []string{"block", "echo", "2"}}, root, nil)
	c, err := e.sched.Submit(context.Background(), execution.Request{ActionDigest: d2})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	<-e.Sandbox.Started
	if _, err := srv.CancelOperation(context.Background(), &longrunningpb.CancelOperationRequest{Name: c.Name()}); err != nil {
		t.Fatal(err)
	}
	for {
		e.sched.mu.Lock()
		resp := e.sched.ops[c.Name()].exec.resp
		e.sched.mu.Unlock()
		if resp != nil {
			// The fake's "block" answers its ctx ending with a kill.
			if codes.Code(resp.GetStatus().GetCode()) != codes.Canceled && resp.GetResult().GetExitCode() != 137 {
				t.Fatalf("run of a cancelled sole client ended with %v, want it killed or CANCELLED", resp)
			}
			break
		}
		if ctx.Err() != nil {
			t.Fatal("the run was not cancelled when its only client cancelled")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestOperationRetention: a finished operation answers WaitExecution for Retain, then
// is forgotten (NOT_FOUND).
func TestOperationRetention(t *testing.T) {
	e := newTestEnv(t, 1)
	e.sched = NewScheduler(e.Exec, SchedulerConfig{Concurrency: 1, Retain: 200 * time.Millisecond, Clock: e.clock})
	root := e.Put(t, &repb.Directory{})
	run := func(word string) string {
		w, err := e.sched.Submit(context.Background(), execution.Request{ActionDigest: e.Action(t, &repb.Command{Arguments: []string{"echo", word}}, root, nil)})
		if err != nil {
			t.Fatal(err)
		}
		defer w.Close()
		if _, err := execution.Response(context.Background(), w); err != nil {
			t.Fatal(err)
		}
		return w.Name()
	}
	first := run("a")
	if w, err := e.sched.Wait(context.Background(), first, ""); err != nil {
		t.Fatalf("finished operation within its retention: %v", err)
	} else {
		w.Close()
	}
	e.clock.Advance(300 * time.Millisecond)
	run("b") // finishing another operation forgets the expired ones
	if _, err := e.sched.Wait(context.Background(), first, ""); status.Code(err) != codes.NotFound {
		t.Fatalf("operation past its retention: %v, want NOT_FOUND", err)
	}
}

// TestOperationOwner: an operation answers only the client that started it; to
// another it is NOT_FOUND, as if it did not exist.
func TestOperationOwner(t *testing.T) {
	e := newTestEnv(t, 1)
	e.Sandbox.Release = make(chan struct{})
	root := e.Put(t, &repb.Directory{})
	d := e.Action(t, &repb.Command{Arguments: []string{"block", "echo", "owned"}}, root, nil)
	w, err := e.sched.Submit(context.Background(), execution.Request{ActionDigest: d, Owner: "ci-a"})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { // let the run finish before the test's directories go
		close(e.Sandbox.Release)
		execution.Response(context.Background(), w)
		w.Close()
	}()
	if _, err := e.sched.Wait(context.Background(), w.Name(), "ci-b"); status.Code(err) != codes.NotFound {
		t.Errorf("WaitExecution by another client: %v, want NOT_FOUND", err)
	}
	if _, err := e.sched.Get(context.Background(), w.Name(), "ci-b"); status.Code(err) != codes.NotFound {
		t.Errorf("GetOperation by another client: %v, want NOT_FOUND", err)
	}
	if err := e.sched.Cancel(context.Background(), w.Name(), "ci-b"); status.Code(err) != codes.NotFound {
		t.Errorf("CancelOperation by another client: %v, want NOT_FOUND", err)
	}
	if err := e.sched.Delete(context.Background(), w.Name(), "ci-b"); status.Code(err) != codes.NotFound {
		t.Errorf("DeleteOperation by another client: %v, want NOT_FOUND", err)
	}
	if op, err := e.sched.Get(context.Background(), w.Name(), "ci-a"); err != nil || op.GetDone() {
		t.Fatalf("the owner's GetOperation: %v %v, want it running", op, err)
	}
	w2, err := e.sched.Wait(context.Background(), w.Name(), "ci-a")
	if err != nil {
		t.Fatalf("the owner's WaitExecution: %v", err)
	}
	w2.Close()
}

// TestCancelGrace: a client whose stream dropped (its only watch closed) and that comes
// back with WaitExecution within the grace period finds its execution still running and
// gets the result; nothing ran twice. One that does not come back within it has its
// execution cancelled.
func TestCancelGrace(t *testing.T) {
	e := newTestEnv(t, 1)
	e.sched = NewScheduler(e.Exec, SchedulerConfig{Concurrency: 1, CancelGrace: time.Hour, Clock: e.clock})
	root, d := e.blocked(t)
	w := e.submit(t, d)
	<-e.Sandbox.Started
	w.Close() // the stream dropped
	e.clock.Advance(59 * time.Minute)
	back, err := e.sched.Wait(context.Background(), w.Name(), "")
	if err != nil {
		t.Fatalf("WaitExecution after the stream dropped: %v", err)
	}
	defer back.Close()
	close(e.Sandbox.Release)
	resp, err := execution.Response(context.Background(), back)
	if err != nil || resp.GetStatus().GetCode() != 0 || len(resp.GetResult().GetOutputFiles()) != 1 {
		t.Fatalf("the client that came back got %v %v, want the run's result", resp, err)
	}
	if n := e.Sandbox.Runs.Load(); n != 1 {
		t.Fatalf("ran %d times", n)
	}

	// Gone for the whole grace: cancelled, and only then.
	e.Sandbox.Release = make(chan struct{})
	defer close(e.Sandbox.Release)
	w, err = e.sched.Submit(context.Background(), execution.Request{ActionDigest: e.Action(t, &repb.Command{Arguments: []string{"block", "echo", "gone"}}, root, nil)})
	if err != nil {
		t.Fatal(err)
	}
	<-e.Sandbox.Started
	w.Close()
	e.clock.Advance(time.Hour - time.Second)
	if op, err := e.sched.Get(context.Background(), w.Name(), ""); err != nil || op.GetDone() {
		t.Fatalf("before the grace ran out: %v %v, want it running", op, err)
	}
	e.clock.Advance(time.Second)
	if resp := e.waitDone(t, w.Name()); resp.GetResult().GetExitCode() != 137 && codes.Code(resp.GetStatus().GetCode()) != codes.Canceled {
		t.Fatalf("after the grace: %v, want it killed", resp)
	}
}

// TestCachedRetention: operations answered from the action cache are kept a minute,
// others for Retain.
func TestCachedRetention(t *testing.T) {
	s := &Scheduler{cfg: SchedulerConfig{Retain: 10 * time.Minute}}
	cached := &operation{exec: &flight{resp: &repb.ExecuteResponse{CachedResult: true}}}
	ran := &operation{exec: &flight{resp: &repb.ExecuteResponse{}}}
	if got := s.retention(cached); got != cachedRetain {
		t.Errorf("cached: %v, want %v", got, cachedRetain)
	}
	if got := s.retention(ran); got != 10*time.Minute {
		t.Errorf("executed: %v, want 10m", got)
	}
}

// TestObserveAndActionURL: every finished execution and cache hit is reported with its
// client and outcome; an execution that ends in an error names the action's page and
// keeps its code and MISSING details.
func TestObserveAndActionURL(t *testing.T) {
	e := newTestEnv(t, 1)
	var mu sync.Mutex
	var seen []Finished
	e.sched = NewScheduler(e.Exec, SchedulerConfig{Concurrency: 1, Clock: e.clock,
		Observe:   func(f Finished) { mu.Lock(); seen = append(seen, f); mu.Unlock() },
		ActionURL: func(d cache.Digest) string { return "https://kiln.example/action/" + d.Hash },
	})
	run := func(d cache.Digest) *repb.ExecuteResponse {
		w, err := e.sched.Submit(context.Background(), execution.Request{ActionDigest: d, Owner: "ci-1"})
		if c := status.Code(err); c == codes.FailedPrecondition || c == codes.InvalidArgument {
			// Refused before it was queued: the Execute service answers it so.
			return &repb.ExecuteResponse{Status: status.Convert(err).Proto()}
		}
		if err != nil {
			t.Fatal(err)
		}
		defer w.Close()
		resp, err := execution.Response(context.Background(), w)
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	ok := e.Action(t, &repb.Command{Arguments: []string{"write", "o", "x"}, OutputFiles: []string{"o"}}, e.Put(t, &repb.Directory{}), nil)
	run(ok)
	run(ok)
	absent := cache.DigestOf([]byte("an input root nobody uploaded"))
	bad := e.Action(t, &repb.Command{Arguments: []string{"write", "o", "y"}, OutputFiles: []string{"o"}}, absent, nil)
	resp := run(bad)
	st := status.FromProto(resp.GetStatus())
	if st.Code() != codes.FailedPrecondition || len(st.Details()) == 0 || !strings.HasSuffix(st.Message(), "(the action's page: https://kiln.example/action/"+bad.Hash+")") {
		t.Fatalf("error status %v %q %v: want FAILED_PRECONDITION with its details and the page", st.Code(), st.Message(), st.Details())
	}
	mu.Lock()
	defer mu.Unlock()
	var got []string
	for _, f := range seen {
		got = append(got, fmt.Sprintf("%s %s %v", f.Action.Hash[:6], f.Outcome, f.Owners))
	}
	want := []string{ok.Hash[:6] + " ok [ci-1]", ok.Hash[:6] + " cached [ci-1]", bad.Hash[:6] + " error [ci-1]"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("observed %v, want %v", got, want)
	}
}
