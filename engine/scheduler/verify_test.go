package scheduler

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/executor"
	"github.com/kilnbuild/kiln/engine/executor/executortest"
	"github.com/kilnbuild/kiln/internal/clock"
	"github.com/kilnbuild/kiln/sandbox"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// variantSandbox is the fake sandbox with $HOST in arguments replaced by the run's
// host name, and a count of how many runs overlap.
type variantSandbox struct {
	executortest.Sandbox
	running, most atomic.Int64
}

func (v *variantSandbox) Run(ctx context.Context, j executor.Job) (executor.JobResult, error) {
	n := v.running.Add(1)
	defer v.running.Add(-1)
	for m := v.most.Load(); n > m && !v.most.CompareAndSwap(m, n); m = v.most.Load() {
	}
	host := sandbox.DefaultHostname
	if j.Variation != nil && j.Variation.Hostname != "" {
		host = j.Variation.Hostname
	}
	args := make([]string, len(j.Args))
	for i, a := range j.Args {
		args[i] = strings.ReplaceAll(a, "$HOST", host)
	}
	j.Args = args
	time.Sleep(time.Millisecond) // let concurrent runs overlap if the scheduler allowed it
	return v.Sandbox.Run(ctx, j)
}

// noteAttester records what each execution's link would say.
type noteAttester struct {
	mu    sync.Mutex
	notes [][]string
}

func (a *noteAttester) Attest(_ context.Context, rec *executor.Record) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.notes = append(a.notes, append([]string(nil), rec.Notes...))
	return nil
}

type verifyEnv struct {
	*testEnv
	vsb   *variantSandbox
	att   *noteAttester
	sched *Scheduler
}

func newVerifyEnv(t *testing.T, conc int, rate float64) *verifyEnv {
	t.Helper()
	vsb := &variantSandbox{}
	att := &noteAttester{}
	e := &testEnv{Env: executortest.NewEnv(t, func(c *executor.ExecutorConfig) { c.Sandbox, c.Attester = vsb, att })}
	s := NewScheduler(e.Exec, SchedulerConfig{Concurrency: conc, MaxQueue: 100, VerifyRate: rate, Registerer: prometheus.NewRegistry(),
		Clock: clock.NewFake(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))})
	e.sched = s
	return &verifyEnv{testEnv: e, vsb: vsb, att: att, sched: s}
}

func (e *verifyEnv) verifyAction(t *testing.T, runs int, args ...string) cache.Digest {
	t.Helper()
	var props []*repb.Platform_Property
	if runs > 0 {
		props = []*repb.Platform_Property{{Name: executor.PropVerify, Value: fmt.Sprint(runs)}}
	}
	cmd := &repb.Command{Arguments: args, OutputFiles: []string{"out"}}
	return e.Action(t, cmd, e.Put(t, &repb.Directory{}), func(a *repb.Action) { a.Platform = &repb.Platform{Properties: props} })
}

func (e *verifyEnv) cached(t *testing.T, d cache.Digest) bool {
	t.Helper()
	_, err := e.AC.Get(context.Background(), cache.ActionKey{Action: d})
	if err != nil && status.Code(err) != codes.NotFound {
		t.Fatal(err)
	}
	return err == nil
}

func TestServerVerifyDeterministicIsCached(t *testing.T) {
	e := newVerifyEnv(t, 2, 0)
	d := e.verifyAction(t, 3, "write", "out", "same")
	resp, err := e.run(t, d)
	if err != nil || resp.GetStatus().GetCode() != 0 || resp.GetResult().GetExitCode() != 0 {
		t.Fatalf("%v %v", err, resp)
	}
	if n := e.vsb.Runs.Load(); n != 3 {
		t.Fatalf("%d sandbox runs, want 3", n)
	}
	if !e.cached(t, d) || resp.GetMessage() != "" {
		t.Fatalf("deterministic result not cached (message %q)", resp.GetMessage())
	}
	// One link, for the execution returned; variation runs are checks, not builds.
	if len(e.att.notes) != 1 || len(e.att.notes[0]) != 1 || !strings.HasPrefix(e.att.notes[0][0], "kiln-verify: 3 runs, deterministic") {
		t.Fatalf("link notes %q", e.att.notes)
	}
	wantCount(t, e.sched.verify.mOutcome.WithLabelValues("deterministic"), 1, "deterministic outcome")
	wantCount(t, e.sched.verify.mNondet, 0, "nondeterministic")
}

func TestServerVerifyNondeterministicIsNotCached(t *testing.T) {
	e := newVerifyEnv(t, 1, 0)
	d := e.verifyAction(t, 2, "write", "out", "built on $HOST")
	for i := 1; i <= 2; i++ {
		before := e.vsb.Runs.Load()
		resp, err := e.run(t, d)
		if err != nil || resp.GetStatus().GetCode() != 0 {
			t.Fatalf("%v %v", err, resp.GetStatus())
		}
		// The client gets the baseline's result: the build can go on.
		out := resp.GetResult().GetOutputFiles()
		if len(out) != 1 || resp.GetCachedResult() {
			t.Fatalf("result %v", resp.GetResult())
		}
		b, _ := cache.ReadAll(context.Background(), e.CAS, digestOf(out[0].GetDigest()), 0)
		if string(b) != "built on kiln" {
			t.Fatalf("returned output %q, want the baseline's", b)
		}
		msg := resp.GetMessage()
		if !strings.Contains(msg, "NONDETERMINISTIC") || !strings.Contains(msg, "out differs under hostname") || !strings.Contains(msg, "not cached") {
			t.Fatalf("message %q", msg)
		}
		if e.cached(t, d) {
			t.Fatal("a nondeterministic result was cached")
		}
		// Ran again (not from a cache): baseline, variation, control, narrowing.
		if e.vsb.Runs.Load()-before < 3 {
			t.Fatalf("execute %d ran %d times", i, e.vsb.Runs.Load()-before)
		}
		wantCount(t, e.sched.verify.mNondet, float64(i), fmt.Sprintf("kiln_nondeterministic_actions_total after %d", i))
	}
	if len(e.att.notes) != 2 || !strings.Contains(e.att.notes[0][0], "NONDETERMINISTIC: out differs under hostname") {
		t.Fatalf("link notes %q", e.att.notes)
	}
	if e.vsb.most.Load() != 1 {
		t.Fatalf("%d runs overlapped with one scheduler slot", e.vsb.most.Load())
	}
}

// TestServerVerifyTakesSlots: many verified actions at once never run more sandboxes
// than the scheduler's concurrency.
func TestServerVerifyTakesSlots(t *testing.T) {
	e := newVerifyEnv(t, 2, 0)
	var wg sync.WaitGroup
	for i := 0; i < 6; i++ {
		d := e.verifyAction(t, 3, "write", "out", fmt.Sprintf("%d on $HOST", i))
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := e.run(t, d); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if m := e.vsb.most.Load(); m > 2 {
		t.Fatalf("%d sandbox runs at once with concurrency 2", m)
	}
	wantCount(t, e.sched.verify.mNondet, 6, "nondeterministic")
}

func TestServerVerifyRateAndFailures(t *testing.T) {
	e := newVerifyEnv(t, 1, 1)
	d := e.verifyAction(t, 0, "write", "out", "x")
	if _, err := e.run(t, d); err != nil {
		t.Fatal(err)
	}
	if e.vsb.Runs.Load() != 2 || !e.cached(t, d) {
		t.Fatalf("rate 1: %d runs", e.vsb.Runs.Load())
	}
	// kiln-verify=1 does not opt out of the operator's sampling.
	d = e.verifyAction(t, 1, "write", "out", "$HOST")
	resp, _ := e.run(t, d)
	if !strings.Contains(resp.GetMessage(), "NONDETERMINISTIC") || e.cached(t, d) {
		t.Fatalf("kiln-verify=1 escaped the sampling: %q", resp.GetMessage())
	}
	// A failing action is not checked (it is not cached anyway).
	before := e.vsb.Runs.Load()
	resp, _ = e.run(t, e.verifyAction(t, 3, "write", "out", "$HOST", "exit", "1"))
	if e.vsb.Runs.Load()-before != 1 || resp.GetResult().GetExitCode() != 1 || resp.GetMessage() != "" {
		t.Fatalf("failing action ran %d times, message %q", e.vsb.Runs.Load()-before, resp.GetMessage())
	}
	wantCount(t, e.sched.verify.mOutcome.WithLabelValues("skipped"), 1, "skipped")
	// Rate 0: an action without the property runs once.
	e0 := newVerifyEnv(t, 1, 0)
	e0.run(t, e0.verifyAction(t, 0, "write", "out", "$HOST"))
	if e0.vsb.Runs.Load() != 1 {
		t.Fatalf("rate 0: %d runs", e0.vsb.Runs.Load())
	}
}

func TestSampledByDigest(t *testing.T) {
	picked := 0
	for i := 0; i < 1000; i++ {
		sum := sha256.Sum256([]byte(fmt.Sprint(i)))
		d := cache.Digest{Hash: hex.EncodeToString(sum[:]), Size: 10}
		if sampled(d, 0.25) {
			picked++
		}
		if sampled(d, 0) || !sampled(d, 1) {
			t.Fatal("rate 0 must pick nothing and rate 1 everything")
		}
		if sampled(d, 0.1) && !sampled(d, 0.25) {
			t.Fatal("a higher rate must include what a lower one picks")
		}
	}
	// sha256 of 0..999: a fixed set, so this count is fixed too.
	if picked < 200 || picked > 300 {
		t.Fatalf("rate 0.25 picked %d of 1000", picked)
	}
	if sampled(cache.Digest{Hash: "ffffffffffffffff" + strings.Repeat("0", 48)}, 0.999) ||
		!sampled(cache.Digest{Hash: strings.Repeat("0", 64)}, 0.001) {
		t.Fatal("bounds")
	}
}

// wantCount fails t unless counter c (what it counts) stands at want.
func wantCount(t *testing.T, c prometheus.Counter, want float64, what string) {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil || m.GetCounter().GetValue() != want {
		t.Fatalf("%s: %v (%v), want %v", what, m.GetCounter().GetValue(), err, want)
	}
}

func digestOf(p *repb.Digest) cache.Digest { d, _ := cache.FromProto(p); return d }
