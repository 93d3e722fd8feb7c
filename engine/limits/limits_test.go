package limits

import (
	"context"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/internal/clock"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestBudget: charges beyond a client's share or the total are refused with
// RESOURCE_EXHAUSTED and leave the accounting as it was; another client still fits;
// idle state is reclaimed before a refusal; releases give everything back.
func TestBudget(t *testing.T) {
	b := NewBudget(100, 60)
	a1, err := b.Charge("a", "x", 50)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Charge("a", "x", 20); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("over the client's share: %v", err)
	}
	c1, err := b.Charge("c", "x", 40)
	if err != nil {
		t.Fatalf("another client within the total: %v", err)
	}
	if err := c1.Grow(20); status.Code(err) != codes.ResourceExhausted || c1.Size() != 40 {
		t.Fatalf("over the total: %v, charge now %d", err, c1.Size())
	}
	// A reclaimer that frees a's charge lets c grow.
	calls := 0
	b.OnShortage(func(client string) bool {
		calls++
		if client != "" || a1.Size() == 0 {
			return false
		}
		a1.Release()
		return true
	})
	if err := c1.Grow(20); err != nil || calls == 0 {
		t.Fatalf("grow after reclaiming: %v (%d reclaims)", err, calls)
	}
	if b.Used("") != 60 || b.Used("a") != 0 || b.Used("c") != 60 {
		t.Fatalf("used %d, a %d, c %d", b.Used(""), b.Used("a"), b.Used("c"))
	}
	c1.Shrink(100)
	c1.Release()
	a1.Release()
	if b.Used("") != 0 {
		t.Fatalf("%d bytes held after every release", b.Used(""))
	}
	var nilBudget *Budget
	if c, err := nilBudget.Charge("a", "x", 1<<62); err != nil || c.Grow(1<<62) != nil {
		t.Fatal("a nil budget bounds nothing")
	}
}

// TestSlots: a client at its limit is refused while another is not; the total bounds
// everyone; a reclaimer can make room; release is idempotent.
func TestSlots(t *testing.T) {
	s := NewSlots(NewBudget(1, 1), "uploads", "uploads", "--client-max-uploads", 2, 3)
	r1, _ := s.Acquire("a")
	r2, _ := s.Acquire("a")
	if _, err := s.Acquire("a"); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("third for a client limited to two: %v", err)
	}
	r3, err := s.Acquire("b")
	if err != nil {
		t.Fatalf("another client: %v", err)
	}
	if _, err := s.Acquire("c"); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("over the total: %v", err)
	}
	s.OnShortage(func(client string) bool {
		if client == "" {
			r1()
			return true
		}
		return false
	})
	r4, err := s.Acquire("c")
	if err != nil {
		t.Fatalf("after reclaiming: %v", err)
	}
	r1()
	for _, r := range []func(){r2, r3, r4} {
		r()
		r()
	}
	if s.InUse("") != 0 {
		t.Fatalf("%d slots in use after every release", s.InUse(""))
	}
}

func TestBytes(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1536: "1.5 KiB", 64 << 20: "64.0 MiB", 6 << 30: "6.0 GiB"} {
		if got := Bytes(n); got != want {
			t.Errorf("Bytes(%d) = %q, want %q", n, got, want)
		}
	}
}

// TestWork: a client's work waits for one of its own tokens, never for another
// client's; beyond its rate it waits out what it owes (an idle client does not shed its
// debt by pausing); a cancelled wait gives up; clients that owe nothing are forgotten.
func TestWork(t *testing.T) {
	w := NewWork(1, false)
	clk := &testClock{now: time.Unix(1000, 0), advance: true}
	w.clock = clk
	w.cpu = clk.cpu // every moment of the test clock is work
	ctx := context.Background()
	rel, err := w.Acquire(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	relB, err := w.Acquire(ctx, "b")
	if err != nil {
		t.Fatalf("another client waited for a's token: %v", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := w.Acquire(cctx, "a"); status.Code(err) != codes.Canceled {
		t.Fatalf("second token of a client limited to one, cancelled: %v", err)
	}
	clk.now = clk.now.Add(workBurst + time.Second) // a works 1 s more than its burst
	rel()
	rel() // once
	relB()
	r, err := w.Acquire(ctx, "a")
	if err != nil || len(clk.slept) != 1 || clk.slept[0] != time.Second {
		t.Fatalf("a's next work waited %v (%v), want the 1 s it owes at 1 core", clk.slept, err)
	}
	r()
	if _, err := w.Acquire(ctx, "b"); err != nil || len(clk.slept) != 1 {
		t.Fatalf("b waited for a's debt: %v %v", clk.slept, err)
	}
	clk.now = clk.now.Add(time.Minute)
	w.mu.Lock()
	w.leaves = 1023
	w.mu.Unlock()
	w.leave("x", &workTokens{users: 1})
	if len(w.clients) != 1 { // b still holds its token
		t.Fatalf("%d clients kept, want only the one at work", len(w.clients))
	}
	// A WorkReader holds the token between reads of its input, not while it waits.
	w = NewWork(1, false)
	r2 := &WorkReader{R: strings.NewReader("abc"), W: w, Client: "a", Ctx: ctx}
	buf := make([]byte, 1)
	r2.Read(buf)
	if _, err := w.Acquire(cctx, "a"); err == nil {
		t.Fatal("the reader's token was free while its data was processed")
	}
	r2.Done()
	if rel, err := w.Acquire(ctx, "a"); err != nil {
		t.Fatal(err)
	} else {
		rel()
	}
}

// TestWorkAlone: a client alone on the server (the only one with a call in progress or
// ended within workQuiet) is not held to its rate and its debt is forgiven; once
// another client has a call in progress, and until it has been quiet for workQuiet,
// the rate holds again; a client that never entered is never alone.
func TestWorkAlone(t *testing.T) {
	w := NewWork(1, false)
	clk := &testClock{now: time.Unix(1000, 0), advance: true}
	w.clock = clk
	w.cpu = clk.cpu
	ctx := context.Background()
	overwork := func(client string) { // work 1 s beyond the burst
		t.Helper()
		rel, err := w.Acquire(ctx, client)
		if err != nil {
			t.Fatal(err)
		}
		clk.now = clk.now.Add(workBurst + time.Second)
		rel()
	}
	leaveA := w.Enter("a")
	overwork("a")
	overwork("a")
	if len(clk.slept) != 0 {
		t.Fatalf("a client alone waited %v", clk.slept)
	}
	leaveB := w.Enter("b")
	overwork("a") // forgiven: a owes only this 1 s from now
	rel, err := w.Acquire(ctx, "a")
	if err != nil || len(clk.slept) != 1 || clk.slept[0] != time.Second {
		t.Fatalf("with b's call in progress a waited %v (%v), want the 1 s it owes", clk.slept, err)
	}
	rel()
	leaveB()
	leaveB()      // once
	overwork("a") // b ended its call 1.5 s ago, less than workQuiet
	if _, err := w.Acquire(ctx, "a"); err != nil || len(clk.slept) != 2 {
		t.Fatalf("b ended its call just now: a waited %v, want a second wait (%v)", clk.slept, err)
	}
	// The token is still held; free it for the next acquisition.
	<-w.clients["a"].ch
	w.clients["a"].users--
	clk.now = clk.now.Add(workQuiet)
	overwork("a")
	if _, ok := w.present["b"]; ok {
		t.Fatal("b was kept after going quiet")
	}
	n := len(clk.slept)
	if rel, err := w.Acquire(ctx, "a"); err != nil || len(clk.slept) != n {
		t.Fatalf("b quiet for %v: a waited %v (%v)", workQuiet, clk.slept[n:], err)
	} else {
		rel()
	}
	leaveA()
	overwork("c") // c never entered: never alone
	if _, err := w.Acquire(ctx, "c"); err != nil || len(clk.slept) != n+1 {
		t.Fatalf("a client without a call in progress was not held to its rate: waited %v", clk.slept[n:])
	}
	// The metrics: the waits so far (1 s, 1 s, 1 s) and the clients present (x, with a
	// call in progress; a left 2.5 s ago, b long before).
	defer w.Enter("x")()
	if got := testutil.ToFloat64(w.waited); got != 3 {
		t.Fatalf("kiln_client_cpu_wait_seconds_total %v, want 3", got)
	}
	reg := prometheus.NewRegistry()
	w.Register(reg)
	if err := testutil.GatherAndCompare(reg, strings.NewReader("# HELP kiln_clients_present Clients with a call in progress or ended in the last 2 s: while more than one, --client-max-cpus holds.\n# TYPE kiln_clients_present gauge\nkiln_clients_present 1\n"), "kiln_clients_present"); err != nil {
		t.Fatal(err)
	}
	// --client-max-cpus-always: alone or not, the rate holds.
	w = NewWork(1, true)
	w.clock, w.cpu = clk, clk.cpu
	defer w.Enter("a")()
	overwork("a")
	n = len(clk.slept)
	if _, err := w.Acquire(ctx, "a"); err != nil || len(clk.slept) != n+1 || w.Alone("a") {
		t.Fatalf("held even alone: a waited %v (%v)", clk.slept[n:], err)
	}
}

// TestCalls: calls beyond a client's rate wait their turn, spaced at the rate; another
// client does not wait; beyond maxWaiting the client's calls are refused; a cancelled
// wait gives its turn back.
func TestCalls(t *testing.T) {
	c := NewCalls(NewBudget(1, 1), 10)
	clk := &testClock{now: time.Unix(1000, 0)}
	c.clock = clk
	ctx := context.Background()
	for i := 0; i < 20; i++ { // the burst: twice the rate
		if err := c.Wait(ctx, "a"); err != nil || len(clk.slept) != 0 {
			t.Fatalf("call %d within the burst: %v, waited %v", i, err, clk.slept)
		}
	}
	c.Wait(ctx, "a")
	c.Wait(ctx, "a")
	if len(clk.slept) != 2 || clk.slept[0] != 100*time.Millisecond || clk.slept[1] != 200*time.Millisecond {
		t.Fatalf("calls beyond the burst waited %v, want 100 ms and 200 ms (10 per second)", clk.slept)
	}
	if err := c.Wait(ctx, "b"); err != nil || len(clk.slept) != 2 {
		t.Fatalf("another client waited: %v %v", clk.slept, err)
	}
	c.maxWaiting = 0
	if err := c.Wait(ctx, "a"); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a call with too many waiting: %v", err)
	}
	c.maxWaiting = 10
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	before := c.clients["a"].tokens
	if err := c.Wait(cancelled, "a"); status.Code(err) != codes.Canceled || c.clients["a"].tokens != before {
		t.Fatalf("cancelled wait: %v, tokens %v -> %v", err, before, c.clients["a"].tokens)
	}
	clk.now = clk.now.Add(time.Hour)
	c.Wait(ctx, "b")
	if len(c.clients) != 1 {
		t.Fatalf("%d clients kept an hour later, want the one just seen", len(c.clients))
	}
}

// TestWorkRunsNiced: while a token is held, the goroutine runs on a thread at nice
// WorkNice; after release the thread has its priority back (as root).
func TestWorkRunsNiced(t *testing.T) {
	niceOf := func() int {
		raw, err := unix.Getpriority(unix.PRIO_PROCESS, 0)
		if err != nil {
			t.Fatal(err)
		}
		return 20 - raw
	}
	runtime.LockOSThread() // stay on one thread to compare before and after
	defer runtime.UnlockOSThread()
	before := niceOf()
	w := NewWork(1, false)
	release, err := w.Acquire(context.Background(), "a")
	if err != nil {
		t.Fatal(err)
	}
	if got := niceOf(); got != max(before, WorkNice) {
		t.Fatalf("nice %d while working, want %d", got, max(before, WorkNice))
	}
	release()
	if os.Geteuid() == 0 && niceOf() != before {
		t.Fatalf("nice %d after the work, want %d back", niceOf(), before)
	}
}

// TestWorkCountsCPU: what a client is charged is the CPU time its work took, not the
// time it held a token: a long wait for a CPU (or for the network, with a token held)
// costs the client nothing; the CPU time of work done beside the holder (Also) counts.
func TestWorkCountsCPU(t *testing.T) {
	w := NewWork(1, false)
	clk := &testClock{now: time.Unix(1000, 0), advance: true}
	w.clock = clk
	ctx := context.Background()
	rel, err := w.Acquire(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	clk.now = clk.now.Add(time.Hour) // an hour holding the token, hardly any CPU
	rel()
	if rel, err := w.Acquire(ctx, "a"); err != nil || len(clk.slept) != 0 {
		t.Fatalf("a client that held its token an hour without working waited %v (%v)", clk.slept, err)
	} else {
		rel()
	}
	// Work beside the holder, on another goroutine, measured by a clock that counts the
	// test clock as CPU on every thread but the holder's.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	holder := unix.Gettid()
	w.cpu = func() time.Duration {
		if unix.Gettid() == holder {
			return threadCPU()
		}
		return clk.cpu()
	}
	rel, err = w.Acquire(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	ran := false
	done := make(chan struct{})
	go func() {
		defer close(done)
		w.Also("a", func() { ran = true; clk.now = clk.now.Add(workBurst + 2*time.Second) })
	}()
	<-done
	rel()
	if !ran {
		t.Fatal("Also did not run its work")
	}
	if rel, err := w.Acquire(ctx, "a"); err != nil || len(clk.slept) != 1 || clk.slept[0] < 2*time.Second || clk.slept[0] > 2*time.Second+workBurst {
		// (plus the holder's own few microseconds of CPU)
		t.Fatalf("after 2 s of work beside the holder beyond the burst, the next work waited %v (%v), want 2 s", clk.slept, err)
	} else {
		rel()
	}
	var nilWork *Work
	ran = false
	nilWork.Also("a", func() { ran = true })
	if !ran {
		t.Fatal("a nil Work's Also did not run its work")
	}
}

// testClock records how long it was asked to sleep, and moves only when told (or, with
// advance, by each sleep).
type testClock struct {
	now     time.Time
	slept   []time.Duration
	advance bool
}

func (c *testClock) Now() time.Time { return c.now }

// cpu is a thread CPU clock that counts every moment of c as work.
func (c *testClock) cpu() time.Duration { return c.now.Sub(time.Unix(0, 0)) }

func (c *testClock) Sleep(ctx context.Context, d time.Duration) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	c.slept = append(c.slept, d)
	if c.advance {
		c.now = c.now.Add(d)
	}
	return nil
}

func (c *testClock) AfterFunc(time.Duration, func()) clock.Timer { panic("not used") }
