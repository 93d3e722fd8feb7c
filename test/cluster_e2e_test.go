package test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/tlog"
	"github.com/kilnbuild/kiln/internal/testpki"
	"github.com/kilnbuild/kiln/test/harness"
	"golang.org/x/mod/sumdb/note"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
)

// The cluster's failure tests: real nats-server, real versitygw, real kiln frontends,
// workers and sequencer, killed for real. After each, every Execute got exactly one
// COMPLETED answer, its action-cache entry and outputs exist, kiln attest verify passes
// on its outputs, and the log holds each distinct link exactly once (checkAll).

var (
	busyboxOnce           sync.Once
	busyboxTar, busyboxBB string
)

// sharedBusybox builds the busybox toolchain once per test process and exports it as
// an OCI archive, which each cluster imports into its bucket with --storage.
func sharedBusybox(t *testing.T) (string, string) {
	t.Helper()
	busyboxOnce.Do(func() {
		dir, err := os.MkdirTemp("", "kiln-cluster-bb-")
		if err != nil {
			t.Fatal(err)
		}
		busyboxBB = harness.RecipeToolchain(t, filepath.Join(dir, "data"), "busybox")
		busyboxTar = filepath.Join(dir, "busybox.tar")
		if r := harness.Run(t, "toolchain", "export", "--data", filepath.Join(dir, "data"), busyboxBB, busyboxTar); r.Code != 0 {
			t.Fatalf("toolchain export: %s", r.Stderr)
		}
	})
	if busyboxTar == "" {
		t.Fatal("the busybox toolchain could not be built")
	}
	return busyboxTar, busyboxBB
}

type clusterOpts struct {
	frontends, workers int
	ackWait            string // worker --ack-wait
	maxDeliver         int
	noSequencer        bool
	sealAfter          string // sequencer --seal-after
}

// clusterEnv is one cluster: a bucket, nats-server, frontends, workers, a sequencer.
type clusterEnv struct {
	s3        *harness.S3
	storage   string
	nats      *harness.NATS
	bb        string
	frontends []*harness.Server
	workers   []*harness.Proc
	seq       *harness.Proc
	seqData   string
	// workerData is each worker's data dir (its key), in the order of workers.
	workerData []string
	opts       clusterOpts
}

var (
	workerReady = regexp.MustCompile(`msg="kiln worker taking work"`)
	seqReady    = regexp.MustCompile(`msg="kiln sequencer appending`)
)

func newCluster(t *testing.T, opts clusterOpts) *clusterEnv {
	t.Helper()
	harness.RequireRoot(t)
	s3, url := sharedBucket(t, "c")
	tar, bb := sharedBusybox(t)
	if opts.ackWait == "" {
		opts.ackWait = "3s"
	}
	if opts.maxDeliver == 0 {
		opts.maxDeliver = 3
	}
	e := &clusterEnv{s3: s3, storage: url, nats: harness.StartNATS(t), bb: bb, opts: opts}
	// The toolchain reaches every worker through shared storage only.
	if r := harness.Run(t, "toolchain", "import", "--data", t.TempDir(), "--storage", url, tar); r.Code != 0 {
		t.Fatalf("toolchain import --storage: %s", r.Stderr)
	}
	if !opts.noSequencer {
		e.seqData = t.TempDir()
		args := []string{"sequencer", "--cluster", e.nats.URL, "--storage", url, "--data", e.seqData, "--poll", "200ms", "--log-level", "debug"}
		if opts.sealAfter != "" {
			args = append(args, "--seal-after", opts.sealAfter)
		}
		e.seq = harness.StartKiln(t, "sequencer", seqReady, args...)
	}
	for range opts.frontends {
		e.addFrontend(t)
	}
	for i := range opts.workers {
		e.addWorker(t, fmt.Sprintf("w%d", i+1))
	}
	return e
}

func (e *clusterEnv) addFrontend(t *testing.T) *harness.Server {
	t.Helper()
	s := harness.StartServer(t, "--cluster", e.nats.URL, "--storage", e.storage)
	e.frontends = append(e.frontends, s)
	return s
}

// admit admits the executor key of data dir to the cluster.
func (e *clusterEnv) admit(t *testing.T, data string) {
	t.Helper()
	r := harness.Run(t, "attest", "pubkey", "--data", data, "--json")
	if r.Code != 0 {
		t.Fatalf("attest pubkey: %s", r.Stderr)
	}
	pem := filepath.Join(t.TempDir(), "key.json")
	os.WriteFile(pem, []byte(r.Stdout), 0o644)
	if r := harness.Run(t, "cluster", "admit-key", "--cluster", e.nats.URL, pem); r.Code != 0 {
		t.Fatalf("cluster admit-key: %s", r.Stderr)
	}
}

func (e *clusterEnv) workerArgs(name, data string, extra ...string) []string {
	return append([]string{"worker", "--cluster", e.nats.URL, "--storage", e.storage, "--data", data, "--name", name,
		"--concurrency", "1", "--prestart", "0", "--ack-wait", e.opts.ackWait, "--max-deliver", fmt.Sprint(e.opts.maxDeliver), "--grace", "10s"}, extra...)
}

func (e *clusterEnv) addWorker(t *testing.T, name string, extra ...string) *harness.Proc {
	t.Helper()
	data := t.TempDir()
	e.admit(t, data)
	w := harness.StartKiln(t, name, workerReady, e.workerArgs(name, data, extra...)...)
	e.workers = append(e.workers, w)
	e.workerData = append(e.workerData, data)
	return w
}

// clusterAction is an action uploaded to the cluster.
type clusterAction struct {
	digest *repb.Digest
	output string
}

// upload stores an action running script in busybox, declaring one output file.
func (e *clusterEnv) upload(t *testing.T, conn *grpc.ClientConn, script, output string) clusterAction {
	t.Helper()
	cmd := &repb.Command{Arguments: []string{"/bin/sh", "-c", script}, OutputFiles: []string{output},
		Platform: &repb.Platform{Properties: []*repb.Platform_Property{{Name: "container-image", Value: "docker://kiln/busybox@" + e.bb}}}}
	cb, cd := protoBlob(t, cmd)
	rb, rd := protoBlob(t, &repb.Directory{})
	ab, ad := protoBlob(t, &repb.Action{CommandDigest: cd, InputRootDigest: rd})
	req := &repb.BatchUpdateBlobsRequest{}
	for _, b := range []struct {
		d    *repb.Digest
		data []byte
	}{{cd, cb}, {rd, rb}, {ad, ab}} {
		req.Requests = append(req.Requests, &repb.BatchUpdateBlobsRequest_Request{Digest: b.d, Data: b.data})
	}
	ctx := harness.Context(t, time.Minute)
	resp, err := repb.NewContentAddressableStorageClient(conn).BatchUpdateBlobs(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range resp.GetResponses() {
		if r.GetStatus().GetCode() != 0 {
			t.Fatalf("upload %s: %v", r.GetDigest().GetHash(), r.GetStatus())
		}
	}
	return clusterAction{digest: ad, output: output}
}

func protoBlob(t *testing.T, m proto.Message) ([]byte, *repb.Digest) {
	t.Helper()
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b, digestOf(b)
}

// execution is one Execute call followed to its end.
type execution struct {
	name  string
	done  []*longrunningpb.Operation // every done operation received (exactly one expected)
	resp  *repb.ExecuteResponse
	err   error
	first chan struct{} // closed at the first operation (the name is known)
	wait  chan struct{} // closed when the stream ended
}

// execute calls Execute and follows the stream in the background.
func execute(ctx context.Context, conn *grpc.ClientConn, a clusterAction) *execution {
	x := &execution{first: make(chan struct{}), wait: make(chan struct{})}
	stream, err := repb.NewExecutionClient(conn).Execute(ctx, &repb.ExecuteRequest{ActionDigest: a.digest})
	if err != nil {
		x.err = err
		close(x.first)
		close(x.wait)
		return x
	}
	x.follow(stream)
	return x
}

// follow reads a stream of operations until it ends.
func (x *execution) follow(stream interface {
	Recv() (*longrunningpb.Operation, error)
}) {
	go func() {
		defer close(x.wait)
		once := sync.Once{}
		defer once.Do(func() { close(x.first) })
		for {
			op, err := stream.Recv()
			if err != nil {
				if x.resp == nil {
					x.err = err
				}
				return
			}
			x.name = op.GetName()
			once.Do(func() { close(x.first) })
			if op.GetDone() {
				x.done = append(x.done, op)
				r := &repb.ExecuteResponse{}
				if err := op.GetResponse().UnmarshalTo(r); err != nil {
					x.err = err
				}
				x.resp = r
			}
		}
	}()
}

// check fails unless the execution got exactly one COMPLETED answer with exit 0.
func (x *execution) check(t *testing.T, what string) {
	t.Helper()
	select {
	case <-x.wait:
	case <-time.After(3 * time.Minute):
		t.Fatalf("%s: no answer within 3 minutes", what)
	}
	if x.err != nil || len(x.done) != 1 {
		t.Fatalf("%s: %d done answers, err %v", what, len(x.done), x.err)
	}
	if x.resp.GetStatus().GetCode() != 0 || x.resp.GetResult().GetExitCode() != 0 {
		t.Fatalf("%s: status %v, exit %d, message %q", what, x.resp.GetStatus(), x.resp.GetResult().GetExitCode(), x.resp.GetMessage())
	}
}

// checkAll checks the guarantees for every finished action: its action-cache entry and
// outputs exist (read through conn), kiln attest verify passes on each output (on a
// fresh data dir, as on a machine that is none of the cluster's: the log is the one
// the sequencer published in the bucket), and that log holds each distinct link
// exactly once.
func (e *clusterEnv) checkAll(t *testing.T, conn *grpc.ClientConn, actions []clusterAction) {
	t.Helper()
	ctx := harness.Context(t, 2*time.Minute)
	ac := repb.NewActionCacheClient(conn)
	links := map[string]bool{}
	var outputs []*repb.Digest
	for _, a := range actions {
		r, err := ac.GetActionResult(ctx, &repb.GetActionResultRequest{ActionDigest: a.digest})
		if err != nil {
			t.Fatalf("action %s: no action-cache entry: %v", a.digest.GetHash(), err)
		}
		if len(r.GetOutputFiles()) != 1 {
			t.Fatalf("action %s: outputs %v", a.digest.GetHash(), r.GetOutputFiles())
		}
		outputs = append(outputs, r.GetOutputFiles()[0].GetDigest())
	}
	if missing, err := findMissing(ctx, conn, outputs...); err != nil || len(missing) > 0 {
		t.Fatalf("outputs missing from the CAS: %v %v", missing, err)
	}
	e.waitLinksLogged(t)
	elsewhere := t.TempDir()
	for _, d := range outputs {
		r := harness.Run(t, "attest", "verify", "--cluster", e.nats.URL, "--data", elsewhere, "--storage", e.storage, "--subject", "sha256:"+d.GetHash(), "--json")
		if r.Code != 0 {
			t.Fatalf("kiln attest verify of output %s: exit %d\n%s%s\n%s", d.GetHash(), r.Code, r.Stdout, r.Stderr, e.sequencerReport())
		}
		var v struct {
			Links []struct{ Envelope string } `json:"links"`
		}
		json.Unmarshal([]byte(r.Stdout), &v)
		for _, l := range v.Links {
			links[l.Envelope] = true
		}
	}
	e.checkLogUnique(t, links)
}

// waitLinksLogged waits until the bucket's pending/ prefix is empty (the sequencer has
// logged every link the workers left).
func (e *clusterEnv) waitLinksLogged(t *testing.T) {
	t.Helper()
	dir := filepath.Join(e.s3.Dir, "kiln-cache", "c", "pending")
	deadline := time.Now().Add(time.Minute)
	for {
		ents, _ := os.ReadDir(dir)
		if len(ents) == 0 {
			return
		}
		if time.Now().After(deadline) {
			log := "(sequencer in kiln serve)"
			if e.seq != nil {
				log = e.seq.Log()
			}
			t.Fatalf("%d links still pending after a minute:\n%s", len(ents), log)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// sequencerReport lists the links the sequencer refused (rejected/ in the bucket, with
// the reason) and its log, for a failure message.
func (e *clusterEnv) sequencerReport() string {
	var b strings.Builder
	dir := filepath.Join(e.s3.Dir, "kiln-cache", "c", "rejected")
	ents, _ := os.ReadDir(dir)
	fmt.Fprintf(&b, "%d links rejected\n", len(ents))
	for _, ent := range ents {
		why, _ := os.ReadFile(filepath.Join(dir, ent.Name()))
		fmt.Fprintf(&b, "  %s: %s", ent.Name(), why)
	}
	if e.seq != nil {
		b.WriteString("sequencer log:\n" + e.seq.Log())
	}
	return b.String()
}

// bucketLog reads the log the sequencer published in the bucket, from versitygw's
// files (the same paths as a log directory), with the sequencer's log key.
func (e *clusterEnv) bucketLog(t *testing.T) *tlog.Reader {
	t.Helper()
	return tlog.NewReader(filepath.Join(e.s3.Dir, "kiln-cache", "c", "log"), e.logVerifier(t))
}

// logVerifier returns the sequencer's log key.
func (e *clusterEnv) logVerifier(t *testing.T) note.Verifier {
	t.Helper()
	r := harness.Run(t, "attest", "pubkey", "--all", "--json", "--data", e.seqData)
	var exp struct {
		Log struct{ VKey string } `json:"log"`
	}
	if err := json.Unmarshal([]byte(r.Stdout), &exp); err != nil {
		t.Fatalf("sequencer log key: %v %s", err, r.Stderr)
	}
	v, err := note.NewVerifier(exp.Log.VKey)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// checkLogUnique reads the whole log published in the bucket: no link appears twice,
// and every link in want is there.
func (e *clusterEnv) checkLogUnique(t *testing.T, want map[string]bool) {
	t.Helper()
	ctx := harness.Context(t, time.Minute)
	rd := e.bucketLog(t)
	var cp *tlog.Checkpoint
	var err error
	deadline := time.Now().Add(30 * time.Second)
	seen := map[string]int{}
	for {
		if cp, err = rd.Checkpoint(ctx); err != nil {
			t.Fatal(err)
		}
		clear(seen)
		if err := rd.Scan(ctx, cp.Size, func(_ uint64, e []byte) bool {
			if d, ok := attest.ParseLinkLogEntry(e); ok {
				seen[d.String()]++
			}
			return true
		}); err != nil {
			t.Fatal(err)
		}
		all := true
		for l := range want {
			if seen[l] == 0 {
				all = false
			}
		}
		if all || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	for l := range want {
		if seen[l] == 0 {
			t.Errorf("link %s is not in the log (checkpoint size %d)", l, cp.Size)
		}
	}
	for l, n := range seen {
		if n != 1 {
			t.Errorf("link %s is in the log %d times", l, n)
		}
	}
	if t.Failed() && e.seq != nil {
		t.Logf("sequencer:\n%s", e.seq.Log())
	}
}

// runningOn waits until one of the workers logs that it executes the action and
// returns that worker.
func (e *clusterEnv) runningOn(t *testing.T, a clusterAction, within time.Duration) *harness.Proc {
	t.Helper()
	re := regexp.MustCompile(`msg=executing .*action=` + a.digest.GetHash())
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		for _, w := range e.workers {
			if re.MatchString(w.Log()) {
				return w
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	var logs strings.Builder
	for _, w := range e.workers {
		logs.WriteString(w.Name + ":\n" + w.Log())
	}
	t.Fatalf("no worker ran action %s within %v:\n%s", a.digest.GetHash(), within, logs.String())
	return nil
}

// TestClusterWorkerKilled: kill -9 the worker running an action; the other worker
// completes it, and the client's one Execute gets one answer.
func TestClusterWorkerKilled(t *testing.T) {
	e := newCluster(t, clusterOpts{frontends: 1, workers: 2})
	conn := dial(t, e.frontends[0].Addr)
	a := e.upload(t, conn, "sleep 3; echo survived > out.txt", "out.txt")
	ctx := harness.Context(t, 3*time.Minute)
	x := execute(ctx, conn, a)
	w := e.runningOn(t, a, time.Minute)
	w.Kill()
	x.check(t, "the action whose worker was killed")
	e.checkAll(t, conn, []clusterAction{a})
}

func digestOf(b []byte) *repb.Digest {
	d := cache.DigestOf(b)
	return d.Proto()
}

// executeAll uploads n actions made by script(i) and executes them all at once.
func (e *clusterEnv) executeAll(t *testing.T, ctx context.Context, conn *grpc.ClientConn, n int, script func(i int) string) ([]clusterAction, []*execution) {
	t.Helper()
	var as []clusterAction
	var xs []*execution
	for i := range n {
		a := e.upload(t, conn, script(i), "out.txt")
		as = append(as, a)
		xs = append(xs, execute(ctx, conn, a))
	}
	return as, xs
}

// clusterStatus runs kiln cluster status --json.
func (e *clusterEnv) clusterStatus(t *testing.T) (st struct {
	Workers   []struct{ Name string }
	Platforms []struct {
		Platform         string
		Pending, Running int
	}
	InFlight int `json:"in_flight"`
}) {
	t.Helper()
	r := harness.Run(t, "cluster", "status", "--cluster", e.nats.URL, "--json")
	if r.Code != 0 {
		t.Fatalf("cluster status: %s", r.Stderr)
	}
	if err := json.Unmarshal([]byte(r.Stdout), &st); err != nil {
		t.Fatalf("cluster status: %v\n%s", err, r.Stdout)
	}
	return st
}

// TestClusterNATSKilled: kill -9 nats-server with 10 actions queued or running and
// start it again on the same store: all 10 complete, each Execute with one answer.
func TestClusterNATSKilled(t *testing.T) {
	e := newCluster(t, clusterOpts{frontends: 1, workers: 2})
	conn := dial(t, e.frontends[0].Addr)
	ctx := harness.Context(t, 4*time.Minute)
	as, xs := e.executeAll(t, ctx, conn, 10, func(i int) string { return fmt.Sprintf("sleep 1; echo %d > out.txt", i) })
	// Every Execute is accepted (queued in the cluster) before the kill: one that reached
	// the frontend while NATS was down would be refused with UNAVAILABLE, for the
	// client to retry.
	for i, x := range xs {
		<-x.first
		if x.name == "" {
			t.Fatalf("action %d was not accepted before the kill: %v", i, x.err)
		}
	}
	e.runningOn(t, as[0], time.Minute)
	if st := e.clusterStatus(t); st.InFlight < 2 {
		t.Fatalf("before the kill: %+v, want the 10 actions queued or running", st)
	}
	e.nats.Kill()
	time.Sleep(2 * time.Second) // workers finish their actions and find nobody to report to
	e.nats.Start(t)
	for i, x := range xs {
		x.check(t, fmt.Sprintf("action %d", i))
	}
	e.checkAll(t, conn, as)
}

// TestClusterLeaseLost: SIGSTOP the worker running a nondeterministic action past
// AckWait: another worker runs it and its result is the one answer; after SIGCONT the
// first run completes too, is compared with the first completion, and the difference is
// reported in the log, a metric and the operation's result; the action cache keeps the
// first completion.
func TestClusterLeaseLost(t *testing.T) {
	e := newCluster(t, clusterOpts{frontends: 1, workers: 1})
	conn := dial(t, e.frontends[0].Addr)
	a := e.upload(t, conn, "sleep 1; head -c 16 /dev/urandom | od -An -tx1 > out.txt", "out.txt")
	ctx := harness.Context(t, 3*time.Minute)
	x := execute(ctx, conn, a)
	w1 := e.runningOn(t, a, time.Minute)
	w1.Signal(syscall.SIGSTOP)
	e.addWorker(t, "w2", "--http-listen", "127.0.0.1:0")
	x.check(t, "the action whose worker stopped")
	w1.Signal(syscall.SIGCONT)
	w1.WaitLog(t, regexp.MustCompile(`msg="a second run of the execution produced different outputs`), time.Minute)
	// The operation's result says so.
	ops := longrunningpb.NewOperationsClient(conn)
	deadline := time.Now().Add(30 * time.Second)
	for {
		op, err := ops.GetOperation(ctx, &longrunningpb.GetOperationRequest{Name: x.name})
		if err != nil {
			t.Fatal(err)
		}
		r := &repb.ExecuteResponse{}
		op.GetResponse().UnmarshalTo(r)
		if strings.Contains(r.GetMessage(), "ran twice") && strings.Contains(r.GetMessage(), "differ") {
			if r.GetResult().GetOutputFiles()[0].GetDigest().GetHash() != x.resp.GetResult().GetOutputFiles()[0].GetDigest().GetHash() {
				t.Fatalf("the recorded result changed: %v, answered %v", r.GetResult(), x.resp.GetResult())
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the operation's result has no note of the difference: %q", r.GetMessage())
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The first completion stays in the action cache.
	r, err := repb.NewActionCacheClient(conn).GetActionResult(ctx, &repb.GetActionResultRequest{ActionDigest: a.digest})
	if err != nil || r.GetOutputFiles()[0].GetDigest().GetHash() != x.resp.GetResult().GetOutputFiles()[0].GetDigest().GetHash() {
		t.Fatalf("action cache holds %v (%v), the answer was %v", r.GetOutputFiles(), err, x.resp.GetResult().GetOutputFiles())
	}
	e.checkAll(t, conn, []clusterAction{a})
}

// TestClusterFrontendKilled: kill -9 the frontend a client waits on; WaitExecution on
// another frontend returns the result.
func TestClusterFrontendKilled(t *testing.T) {
	e := newCluster(t, clusterOpts{frontends: 2, workers: 1})
	c1, c2 := dial(t, e.frontends[0].Addr), dial(t, e.frontends[1].Addr)
	a := e.upload(t, c1, "sleep 3; echo waited > out.txt", "out.txt")
	ctx := harness.Context(t, 3*time.Minute)
	x := execute(ctx, c1, a)
	<-x.first
	if x.name == "" {
		t.Fatalf("no operation: %v", x.err)
	}
	e.frontends[0].Kill()
	<-x.wait
	if len(x.done) != 0 {
		t.Fatal("the killed frontend answered")
	}
	stream, err := repb.NewExecutionClient(c2).WaitExecution(ctx, &repb.WaitExecutionRequest{Name: x.name})
	if err != nil {
		t.Fatal(err)
	}
	y := &execution{first: make(chan struct{}), wait: make(chan struct{})}
	y.follow(stream)
	y.check(t, "WaitExecution on the other frontend")
	e.checkAll(t, c2, []clusterAction{a})
}

// TestClusterStorageKilled: kill the S3 server while the action runs, so its outputs
// meet a dead bucket: the worker retries, holding the action, and acknowledges only
// after the bucket is back and everything is stored.
func TestClusterStorageKilled(t *testing.T) {
	e := newCluster(t, clusterOpts{frontends: 1, workers: 1})
	conn := dial(t, e.frontends[0].Addr)
	a := e.upload(t, conn, "sleep 2; head -c 20000000 /dev/zero | tr '\\0' k > out.txt", "out.txt")
	ctx := harness.Context(t, 3*time.Minute)
	x := execute(ctx, conn, a)
	w := e.runningOn(t, a, time.Minute)
	e.s3.Kill()
	w.WaitLog(t, regexp.MustCompile(`shared storage or the cluster is unavailable; running the action again`), time.Minute)
	time.Sleep(2 * e.ackWait()) // well past the lease: it is held, not lost
	select {
	case <-x.wait:
		t.Fatalf("answered while the bucket was down: %v %v", x.resp, x.err)
	default:
	}
	if st := e.clusterStatus(t); len(st.Platforms) != 1 || st.Platforms[0].Running != 1 {
		t.Fatalf("while the bucket is down: %+v, want the action held by its worker, unacknowledged", st)
	}
	e.s3.Start(t)
	x.check(t, "the action whose outputs met a dead bucket")
	e.checkAll(t, conn, []clusterAction{a})
	if strings.Count(w.Log(), "msg=executing") != 1 {
		t.Fatalf("the action was handed out more than once:\n%s", w.Log())
	}
}

func (e *clusterEnv) ackWait() time.Duration {
	d, _ := time.ParseDuration(e.opts.ackWait)
	return d
}

// TestClusterSequencerKilled: kill -9 the sequencer; actions complete and their links
// wait in shared storage; started again, it logs every one of them, once.
func TestClusterSequencerKilled(t *testing.T) {
	e := newCluster(t, clusterOpts{frontends: 1, workers: 2})
	conn := dial(t, e.frontends[0].Addr)
	e.seq.Kill()
	ctx := harness.Context(t, 3*time.Minute)
	as, xs := e.executeAll(t, ctx, conn, 4, func(i int) string { return fmt.Sprintf("echo link-%d > out.txt", i) })
	for i, x := range xs {
		x.check(t, fmt.Sprintf("action %d", i))
	}
	pending, _ := os.ReadDir(filepath.Join(e.s3.Dir, "kiln-cache", "c", "pending"))
	if len(pending) != 4 {
		t.Fatalf("%d links pending in the bucket, want 4", len(pending))
	}
	e.seq.Restart(t, seqReady)
	e.checkAll(t, conn, as)
}

// TestClusterPoisonAction: an action whose worker dies every time it runs it fails
// after max-deliver deliveries with a message that says so; the other actions complete.
func TestClusterPoisonAction(t *testing.T) {
	e := newCluster(t, clusterOpts{frontends: 1, workers: 2, maxDeliver: 2})
	conn := dial(t, e.frontends[0].Addr)
	ctx := harness.Context(t, 4*time.Minute)
	poison := e.upload(t, conn, "sleep 60; echo never > out.txt", "out.txt")
	px := execute(ctx, conn, poison)
	// Kill whichever worker runs the poison action, and start it again.
	stop := make(chan struct{})
	killed := make(chan int, 1)
	go func() {
		n := 0
		defer func() { killed <- n }()
		re := regexp.MustCompile(`msg=executing .*action=` + poison.digest.GetHash())
		seen := map[*harness.Proc]int{}
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			for _, w := range e.workers {
				if c := len(re.FindAllString(w.Log(), -1)); c > seen[w] {
					seen[w] = c
					w.Kill()
					n++
					w.Restart(t, workerReady)
				}
			}
		}
	}()
	as, xs := e.executeAll(t, ctx, conn, 3, func(i int) string { return fmt.Sprintf("echo fine-%d > out.txt", i) })
	select {
	case <-px.wait:
	case <-time.After(3 * time.Minute):
		t.Fatal("the poison action never failed")
	}
	close(stop)
	if n := <-killed; n != 2 {
		t.Errorf("workers killed by the poison action: %d, want 2 (max-deliver)", n)
	}
	if len(px.done) != 1 || px.resp.GetStatus().GetCode() == 0 || !strings.Contains(px.resp.GetStatus().GetMessage(), "handed to a worker 2 times") {
		t.Fatalf("poison action: %d answers, status %v", len(px.done), px.resp.GetStatus())
	}
	for i, x := range xs {
		x.check(t, fmt.Sprintf("action %d", i))
	}
	e.checkAll(t, conn, as)
}

// TestClusterBazel: Debian's Bazel 4.2.3 builds examples/bazel-hello through one
// frontend with every action run remotely on two workers; after `bazel clean`, through
// the other frontend, every action is a remote cache hit.
func TestClusterBazel(t *testing.T) {
	e := newCluster(t, clusterOpts{frontends: 2, workers: 2})
	data := t.TempDir()
	digest := harness.RecipeToolchain(t, data, "debian-gcc")
	tar := filepath.Join(t.TempDir(), "gcc.tar")
	if r := harness.Run(t, "toolchain", "export", "--data", data, digest, tar); r.Code != 0 {
		t.Fatalf("toolchain export: %s", r.Stderr)
	}
	if r := harness.Run(t, "toolchain", "import", "--data", t.TempDir(), "--storage", e.storage, tar); r.Code != 0 {
		t.Fatalf("toolchain import --storage: %s", r.Stderr)
	}
	bz := harness.NewBazel(t, "examples/bazel-hello")
	build := func(f *harness.Server) map[string]int {
		t.Helper()
		out, err := bz.Run(t, "build", "--remote_executor=grpc://"+f.Addr, "--remote_default_exec_properties=container-image=docker://kiln/debian-gcc@"+digest, "--jobs=8", "//...")
		if err != nil {
			t.Fatalf("build through %s: %v\n%s", f.Addr, err, out)
		}
		return harness.Processes(out)
	}
	first := build(e.frontends[0])
	ran := first["total"] - first["internal"]
	if ran < 5 || first["remote"] != ran {
		t.Fatalf("first build: %v, want every non-internal action remote", first)
	}
	ranOn := 0
	for _, w := range e.workers {
		if strings.Contains(w.Log(), "msg=executing") {
			ranOn++
		}
	}
	if ranOn != 2 {
		t.Errorf("actions ran on %d of the 2 workers", ranOn)
	}
	if _, err := bz.Run(t, "clean"); err != nil {
		t.Fatal(err)
	}
	if second := build(e.frontends[1]); second["remote cache hit"] != ran {
		t.Fatalf("after clean, through the other frontend: %v, want all %d remote cache hits", second, ran)
	}
	hello, err := os.ReadFile(filepath.Join(bz.Workspace, "bazel-bin/app/hello"))
	if err != nil || len(hello) == 0 {
		t.Fatalf("built binary: %v", err)
	}
	e.waitLinksLogged(t)
	if r := harness.Run(t, "attest", "verify", "--cluster", e.nats.URL, "--data", e.seqData, "--storage", e.storage,
		"--subject", filepath.Join(bz.Workspace, "bazel-bin/app/hello")); r.Code != 0 {
		t.Fatalf("kiln attest verify of the binary: %s%s", r.Stdout, r.Stderr)
	}
}

// TestClusterEmbedded: kiln serve --cluster embedded runs JetStream and the sequencer
// itself; a worker connects to --cluster-listen; kiln cluster status and the queue
// metric see it.
func TestClusterEmbedded(t *testing.T) {
	harness.RequireRoot(t)
	s3, url := sharedBucket(t, "c")
	tar, bb := sharedBusybox(t)
	if r := harness.Run(t, "toolchain", "import", "--data", t.TempDir(), "--storage", url, tar); r.Code != 0 {
		t.Fatalf("toolchain import --storage: %s", r.Stderr)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	listen := l.Addr().String()
	l.Close()
	srv := harness.StartServer(t, "--cluster", "embedded", "--cluster-listen", listen, "--storage", url)
	e := &clusterEnv{s3: s3, storage: url, nats: &harness.NATS{URL: "nats://" + listen}, bb: bb, seqData: srv.Data, opts: clusterOpts{ackWait: "3s", maxDeliver: 3}}
	e.frontends = []*harness.Server{srv}
	e.addWorker(t, "w1")
	conn := dial(t, srv.Addr)
	ctx := harness.Context(t, 2*time.Minute)
	as, xs := e.executeAll(t, ctx, conn, 3, func(i int) string { return fmt.Sprintf("echo embedded-%d > out.txt", i) })
	for i, x := range xs {
		x.check(t, fmt.Sprintf("action %d", i))
	}
	e.checkAll(t, conn, as)
	st := e.clusterStatus(t)
	if len(st.Workers) != 1 || st.Workers[0].Name != "w1" || len(st.Platforms) != 1 || st.InFlight != 0 {
		t.Fatalf("cluster status: %+v", st)
	}
	if r := harness.Run(t, "cluster", "status", "--cluster", e.nats.URL); r.Code != 0 || !strings.Contains(r.Stdout, "linux-amd64") || !strings.Contains(r.Stdout, "w1") {
		t.Fatalf("cluster status: %s%s", r.Stdout, r.Stderr)
	}
	// The collector reads JetStream at most once a second, and the UI's sampler may
	// have scraped before the worker's consumer existed: wait for a fresh reading.
	const want = `kiln_cluster_queue_pending{platform="linux-amd64"} 0`
	var text string
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(250 * time.Millisecond) {
		if text = metricsText(t, srv); strings.Contains(text, want) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no queue metric %s:\n%s", want, text)
		}
	}
}

func metricsText(t *testing.T, s *harness.Server) string {
	t.Helper()
	resp, err := http.Get("http://" + s.HTTP + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// TestClusterStartErrors: what cannot work is one line on stderr and a non-zero exit.
func TestClusterStartErrors(t *testing.T) {
	harness.RequireRoot(t)
	_, url := sharedBucket(t, "c")
	nats := harness.StartNATS(t)
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"worker", "--cluster", nats.URL, "--storage", url, "--data", t.TempDir(), "--prestart", "0"}, 2, "is not admitted to the cluster"},
		{[]string{"worker", "--cluster", nats.URL, "--data", t.TempDir()}, 2, "--storage is required"},
		{[]string{"serve", "--cluster", nats.URL, "--data", t.TempDir()}, 2, "--cluster needs --storage"},
		{[]string{"serve", "--cluster", "embedded", "--storage", url, "--data", t.TempDir()}, 2, "needs --cluster-listen"},
		{[]string{"cluster", "status", "--cluster", "nats://kiln:secret@127.0.0.1:4222"}, 2, "no credentials in the URL"},
		{[]string{"cluster", "status", "--cluster", "nats://127.0.0.1:1"}, 2, "connect to the cluster at nats://127.0.0.1:1"},
		{[]string{"cluster", "retire-key", "--cluster", nats.URL, "0123"}, 2, "is not in the cluster's trust set"},
	} {
		r := harness.Run(t, c.args...)
		var errs []string // the error line (logs before it say what started)
		for _, l := range strings.Split(r.Stderr, "\n") {
			if strings.HasPrefix(l, "kiln: ") {
				errs = append(errs, l)
			}
		}
		if r.Code != c.code || len(errs) != 1 || !strings.Contains(errs[0], c.want) {
			t.Errorf("kiln %s: exit %d, stderr %q; want exit %d and one line with %q", strings.Join(c.args, " "), r.Code, r.Stderr, c.code, c.want)
		}
	}
}

// TestClusterTLS: kiln talks to a nats-server that requires TLS client certificates,
// with --cluster-tls-ca/-cert/-key; the files are read again at every reconnection: a
// frontend whose certificate is replaced by one the server refuses cannot reconnect
// after the server restarts, and reconnects once a good one is back in place.
func TestClusterTLS(t *testing.T) {
	_, url := sharedBucket(t, "c")
	ca, other := testpki.NewCA(t, "nats-ca"), testpki.NewCA(t, "other-ca")
	scert, skey := ca.Server(t, "nats")
	n := harness.StartNATS(t, "--tlsverify", "--tlscert", scert, "--tlskey", skey, "--tlscacert", ca.Cert)
	tlsURL := strings.Replace(n.URL, "nats://", "tls://", 1)
	ccert, ckey := ca.Client(t, "kiln")
	dir := t.TempDir()
	cert, key := filepath.Join(dir, "client.pem"), filepath.Join(dir, "client.key")
	install := func(c, k string) {
		for _, f := range [][2]string{{c, cert}, {k, key}} {
			b, err := os.ReadFile(f[0])
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(f[1], b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	install(ccert, ckey)
	tlsArgs := []string{"--cluster", tlsURL, "--cluster-tls-ca", ca.Cert, "--cluster-tls-cert", cert, "--cluster-tls-key", key}
	if r := harness.Run(t, append([]string{"cluster", "status"}, tlsArgs...)...); r.Code != 0 {
		t.Fatalf("cluster status over TLS: %s", r.Stderr)
	}
	if r := harness.Run(t, "cluster", "status", "--cluster", tlsURL, "--cluster-tls-ca", ca.Cert); r.Code == 0 {
		t.Fatal("a client without a certificate was let in")
	}
	srv := harness.StartServer(t, append([]string{"--storage", url}, tlsArgs...)...)
	badCert, badKey := other.Client(t, "intruder")
	install(badCert, badKey)
	n.Kill()
	n.Start(t)
	time.Sleep(3 * time.Second) // reconnection attempts with the refused certificate
	if strings.Contains(srv.Log(), "cluster connection back") {
		t.Fatalf("reconnected with a certificate the server refuses:\n%s", srv.Log())
	}
	install(ccert, ckey)
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(srv.Log(), "cluster connection back") {
		if time.Now().After(deadline) {
			t.Fatalf("no reconnection with the good certificate back in place:\n%s", srv.Log())
		}
		time.Sleep(100 * time.Millisecond)
	}
}
