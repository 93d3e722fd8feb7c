package scheduler

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/cachetest"
	"github.com/kilnbuild/kiln/engine/execution"
	"github.com/kilnbuild/kiln/engine/executor"
	"github.com/kilnbuild/kiln/engine/executor/executortest"
	"github.com/kilnbuild/kiln/engine/limits"
	"github.com/kilnbuild/kiln/internal/clock"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// newLimitedEnv is newTestEnv with the scheduler's configuration changed by mod, and
// the executor's CAS counting the blobs read through it.
func newLimitedEnv(t *testing.T, conc int, mod func(*SchedulerConfig)) (*testEnv, *cachetest.CountingStore) {
	t.Helper()
	var reads *cachetest.CountingStore
	env := executortest.NewEnv(t, func(c *executor.ExecutorConfig) {
		reads = &cachetest.CountingStore{BlobStore: c.CAS}
		c.CAS = reads
	})
	e := &testEnv{Env: env, clock: clock.NewFake(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))}
	cfg := SchedulerConfig{Concurrency: conc, MaxQueue: 1000, CancelGrace: time.Minute, Clock: e.clock}
	if mod != nil {
		mod(&cfg)
	}
	e.sched = NewScheduler(e.Exec, cfg)
	return e, reads
}

// doublingDAG stores issue 19's hostile input root: levels+1 Directory blobs, each
// level two children pointing at the next, claiming 2^levels directories.
func doublingDAG(t *testing.T, e *testEnv, levels int) cache.Digest {
	t.Helper()
	d := e.Put(t, &repb.Directory{Files: []*repb.FileNode{{Name: "leaf", Digest: cache.EmptyDigest.Proto()}}})
	for i := 0; i < levels; i++ {
		d = e.Put(t, &repb.Directory{Directories: []*repb.DirectoryNode{{Name: "a", Digest: d.Proto()}, {Name: "b", Digest: d.Proto()}}})
	}
	return d
}

// blocker runs an action that holds the only execution slot until release is called.
func blocker(t *testing.T, e *testEnv) (release func()) {
	t.Helper()
	_, d := e.blocked(t)
	w := e.submit(t, d)
	<-e.Sandbox.Started
	return func() {
		close(e.Sandbox.Release)
		execution.Response(context.Background(), w)
		w.Close()
	}
}

// TestHostileTreeNeverTakesASlot (issue 19, case 6): an input tree the executor would
// refuse (a 21-blob DAG claiming 2^20 directories) is refused when it is submitted,
// while the only execution slot is busy, after reading each distinct blob once; it
// never waits for, nor takes, a slot.
func TestHostileTreeNeverTakesASlot(t *testing.T) {
	e, reads := newLimitedEnv(t, 1, nil)
	root := doublingDAG(t, e, 20)
	release := blocker(t, e)
	defer release()
	for i := 0; i < 20; i++ {
		d := e.Action(t, &repb.Command{Arguments: []string{"write", "o", fmt.Sprint(i)}}, root, nil)
		before := reads.N.Load()
		_, err := e.sched.Submit(context.Background(), execution.Request{ActionDigest: d, Client: "attacker"})
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), "more than") {
			t.Fatalf("hostile tree %d, with the only slot busy: %v, want INVALID_ARGUMENT at once", i, err)
		}
		if n := reads.N.Load() - before; n > 2+21 {
			t.Fatalf("validating a 21-blob tree read %d blobs: shared subtrees must be read and counted once", n)
		}
	}
	if n := e.sched.queuedSlots.InUse(""); n != 0 {
		t.Fatalf("%d queue slots held by refused executions", n)
	}
}

// TestClientQueuedLimit (issue 19, case 6): one client may have ClientQueued
// executions waiting; beyond it RESOURCE_EXHAUSTED, while another client's are queued;
// and what a queued input tree costs is charged to its client's memory.
func TestClientQueuedLimit(t *testing.T) {
	mem := limits.NewBudget(64<<20, 1<<20)
	e, _ := newLimitedEnv(t, 1, func(c *SchedulerConfig) { c.ClientQueued = 3; c.Memory = mem })
	release := blocker(t, e)
	root := e.Put(t, &repb.Directory{Files: []*repb.FileNode{{Name: "f", Digest: cache.EmptyDigest.Proto()}}})
	submit := func(client string, i int) (execution.Watch, error) {
		d := e.Action(t, &repb.Command{Arguments: []string{"write", "o", client + fmt.Sprint(i)}}, root, nil)
		return e.sched.Submit(context.Background(), execution.Request{ActionDigest: d, Client: client})
	}
	var ws []execution.Watch
	for i := 0; i < 3; i++ {
		w, err := submit("attacker", i)
		if err != nil {
			t.Fatal(err)
		}
		ws = append(ws, w)
	}
	if mem.Used("attacker") == 0 {
		t.Fatal("queued input trees are not charged to their client")
	}
	if _, err := submit("attacker", 3); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("fourth queued execution of a client limited to three: %v", err)
	}
	w, err := submit("honest", 0)
	if err != nil {
		t.Fatalf("another client while the first is at its limit: %v", err)
	}
	ws = append(ws, w)
	// A tree whose expanded form costs more than the client's 1 MiB share is refused.
	big := &repb.Directory{}
	for i := 0; i < 10_000; i++ {
		big.Files = append(big.Files, &repb.FileNode{Name: fmt.Sprintf("f%05d", i), Digest: cache.EmptyDigest.Proto()})
	}
	d := e.Action(t, &repb.Command{Arguments: []string{"echo"}}, e.Put(t, big), nil)
	if _, err := e.sched.Submit(context.Background(), execution.Request{ActionDigest: d, Client: "greedy"}); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a tree beyond the client's memory share: %v", err)
	}
	release()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, w := range ws {
		if resp, err := execution.Response(ctx, w); err != nil || resp.GetStatus().GetCode() != 0 {
			t.Fatalf("queued execution: %v %v", err, resp.GetStatus())
		}
		w.Close()
	}
	if n, used := e.sched.queuedSlots.InUse(""), mem.Used(""); n != 0 || used != 0 {
		t.Fatalf("after the executions %d queue slots and %d bytes are still held", n, used)
	}
}

// TestAdmissionWaitRunsNothingTwice: an Execute whose admission waited for its client's
// work while an identical execution ran and ended is answered from the action cache;
// the action does not run a second time.
func TestAdmissionWaitRunsNothingTwice(t *testing.T) {
	work := limits.NewWork(1, false)
	e, _ := newLimitedEnv(t, 1, func(c *SchedulerConfig) { c.Work = work })
	root := e.Put(t, &repb.Directory{})
	d := e.Action(t, &repb.Command{Arguments: []string{"write", "o", "x"}, OutputFiles: []string{"o"}}, root, nil)
	release, second := submitHeld(t, e, work, context.Background(), d)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	w, err := e.sched.Submit(ctx, execution.Request{ActionDigest: d, Client: "a"})
	if err != nil {
		t.Fatal(err)
	}
	if resp, err := execution.Response(ctx, w); err != nil || resp.GetStatus().GetCode() != 0 || resp.GetCachedResult() {
		t.Fatalf("first execution: %v %v", resp, err)
	}
	w.Close()
	release()
	s := <-second
	if s.err != nil {
		t.Fatal(s.err)
	}
	defer s.w.Close()
	resp, err := execution.Response(ctx, s.w)
	if err != nil || !resp.GetCachedResult() {
		t.Fatalf("the Execute that waited: %v %v, want the cached result", resp, err)
	}
	if n := e.Sandbox.Runs.Load(); n != 1 {
		t.Fatalf("the action ran %d times", n)
	}
}

// submitted is what a Submit made in the background returned.
type submitted struct {
	w   execution.Watch
	err error
}

// submitHeld submits d as client "b" in the background, its admission held by b's
// share of work until release is called, and returns once b waits there (past its
// first action-cache lookup, a miss).
func submitHeld(t *testing.T, e *testEnv, work *limits.Work, ctx context.Context, d cache.Digest) (release func(), second chan submitted) {
	t.Helper()
	release, err := work.Acquire(context.Background(), "b")
	if err != nil {
		t.Fatal(err)
	}
	second = make(chan submitted, 1)
	go func() {
		w, err := e.sched.Submit(ctx, execution.Request{ActionDigest: d, Client: "b"})
		second <- submitted{w, err}
	}()
	for deadline := time.Now().Add(30 * time.Second); e.sched.queuedSlots.InUse("b") == 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the second Execute never reached its admission")
		}
	}
	return release, second
}

// pausingAC pauses the n-th Get made with a context marked by pauseKey after the
// lookup, before answering: what a lookup slow to return (a completeness check over
// many outputs) looks like to its caller.
type pausingAC struct {
	cache.ActionCache
	n       int32
	calls   atomic.Int32
	entered chan struct{}
	resume  chan struct{}
}

type pauseKey struct{}

func (p *pausingAC) Get(ctx context.Context, key cache.ActionKey) (*repb.ActionResult, error) {
	r, err := p.ActionCache.Get(ctx, key)
	if ctx.Value(pauseKey{}) != nil && p.calls.Add(1) == p.n {
		close(p.entered)
		<-p.resume
	}
	return r, err
}

// TestFinishedDuringLookupRunsNothingTwice: an execution of the same action that ends
// while a second Execute's action-cache lookup is on its way back (a miss when it
// looked) is neither run again nor lost: the second joins the first or finds its result.
func TestFinishedDuringLookupRunsNothingTwice(t *testing.T) {
	ac := &pausingAC{n: 2, entered: make(chan struct{}), resume: make(chan struct{})}
	work := limits.NewWork(1, false)
	env := executortest.NewEnv(t, func(c *executor.ExecutorConfig) {
		ac.ActionCache = c.AC
		c.AC = ac
	})
	e := &testEnv{Env: env, clock: clock.NewFake(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))}
	e.sched = NewScheduler(e.Exec, SchedulerConfig{Concurrency: 1, MaxQueue: 1000, CancelGrace: time.Minute, Clock: e.clock, Work: work})
	_, d := e.blocked(t)
	release, second := submitHeld(t, e, work, context.WithValue(context.Background(), pauseKey{}, true), d)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	first, err := e.sched.Submit(ctx, execution.Request{ActionDigest: d, Client: "a"}) // a miss; runs and blocks
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	<-e.Sandbox.Started
	release()
	// b goes on. If it looks the cache up again before it checks what is in flight,
	// the first execution ends while that lookup's miss is on its way back.
	var s submitted
	select {
	case <-ac.entered:
		close(e.Sandbox.Release)
		if resp, err := execution.Response(ctx, first); err != nil || resp.GetStatus().GetCode() != 0 {
			t.Fatalf("first execution: %v %v", resp, err)
		}
		close(ac.resume)
		s = <-second
	case s = <-second:
		close(e.Sandbox.Release)
		close(ac.resume)
	}
	if s.err != nil {
		t.Fatal(s.err)
	}
	defer s.w.Close()
	if resp, err := execution.Response(ctx, s.w); err != nil || resp.GetStatus().GetCode() != 0 {
		t.Fatalf("the second Execute: %v %v", resp, err)
	}
	if n := e.Sandbox.Runs.Load(); n != 1 {
		t.Fatalf("the action ran %d times", n)
	}
}
