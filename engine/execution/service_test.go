package execution_test

import (
	"context"
	"errors"
	"io"
	"sync"
	"testing"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/execution"
	"github.com/kilnbuild/kiln/internal/grpctest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// fakeScheduler answers from a script and records what it was asked: the service
// must work over any execution.Scheduler, not only the local one.
type fakeScheduler struct {
	mu        sync.Mutex
	submitted []execution.Request
	calls     []string // "get NAME OWNER", ...
	submitErr error
	stages    []repb.ExecutionStage_Value // what a watch goes through before done
}

type fakeWatch struct {
	name   string
	action cache.Digest
	stages []repb.ExecutionStage_Value
	closed *bool
}

func (w *fakeWatch) Name() string { return w.name }

func (w *fakeWatch) Next(_ context.Context, seen *repb.ExecutionStage_Value) (*longrunningpb.Operation, error) {
	for _, st := range w.stages {
		if st > *seen {
			*seen = st
			var resp *repb.ExecuteResponse
			if st == repb.ExecutionStage_COMPLETED {
				resp = &repb.ExecuteResponse{Result: &repb.ActionResult{ExitCode: 7}, Status: execution.StatusProto(nil)}
			}
			return execution.Operation(w.name, w.action, st, resp)
		}
	}
	return nil, errors.New("no further stage")
}

func (w *fakeWatch) Close() { *w.closed = true }

func (f *fakeScheduler) watch(name string, d cache.Digest) *fakeWatch {
	return &fakeWatch{name: name, action: d, stages: f.stages, closed: new(bool)}
}

func (f *fakeScheduler) Submit(_ context.Context, req execution.Request) (execution.Watch, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.submitted = append(f.submitted, req)
	if f.submitErr != nil {
		return nil, f.submitErr
	}
	return f.watch("operations/fake-1", req.ActionDigest), nil
}

func (f *fakeScheduler) record(what, name, owner string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, what+" "+name+" "+owner)
}

func (f *fakeScheduler) Wait(_ context.Context, name, owner string) (execution.Watch, error) {
	f.record("wait", name, owner)
	if name != "operations/fake-1" {
		return nil, status.Error(codes.NotFound, "no such operation")
	}
	return f.watch(name, cache.DigestOf([]byte("a"))), nil
}

func (f *fakeScheduler) Get(_ context.Context, name, owner string) (*longrunningpb.Operation, error) {
	f.record("get", name, owner)
	return execution.Operation(name, cache.DigestOf([]byte("a")), repb.ExecutionStage_EXECUTING, nil)
}

func (f *fakeScheduler) Cancel(_ context.Context, name, owner string) error {
	f.record("cancel", name, owner)
	return nil
}

func (f *fakeScheduler) Delete(_ context.Context, name, owner string) error {
	f.record("delete", name, owner)
	return status.Error(codes.FailedPrecondition, "still running")
}

func serve(t *testing.T, s execution.Scheduler) *grpc.ClientConn {
	t.Helper()
	return grpctest.Serve(t, func(g *grpc.Server) { execution.NewServer(s, nil, nil).Register(g) })
}

func collect(t *testing.T, stream interface {
	Recv() (*longrunningpb.Operation, error)
}) []*longrunningpb.Operation {
	t.Helper()
	var ops []*longrunningpb.Operation
	for {
		op, err := stream.Recv()
		if err == io.EOF {
			return ops
		}
		if err != nil {
			t.Fatal(err)
		}
		ops = append(ops, op)
	}
}

// TestServiceOverAnyScheduler: Execute, WaitExecution and the Operations calls go
// through the Scheduler interface with the caller as owner; the stream follows the
// watch's stages to the response.
func TestServiceOverAnyScheduler(t *testing.T) {
	ctx := context.Background()
	f := &fakeScheduler{stages: []repb.ExecutionStage_Value{repb.ExecutionStage_QUEUED, repb.ExecutionStage_EXECUTING, repb.ExecutionStage_COMPLETED}}
	conn := serve(t, f)
	ex := repb.NewExecutionClient(conn)
	d := cache.DigestOf([]byte("action"))
	stream, err := ex.Execute(ctx, &repb.ExecuteRequest{InstanceName: "ci", ActionDigest: d.Proto(), SkipCacheLookup: true})
	if err != nil {
		t.Fatal(err)
	}
	ops := collect(t, stream)
	if len(ops) != 3 || !ops[2].GetDone() || ops[0].GetName() != "operations/fake-1" {
		t.Fatalf("operations %v", ops)
	}
	resp := &repb.ExecuteResponse{}
	if err := ops[2].GetResponse().UnmarshalTo(resp); err != nil || resp.GetResult().GetExitCode() != 7 {
		t.Fatalf("response %v %v", resp, err)
	}
	if len(f.submitted) != 1 || f.submitted[0] != (execution.Request{Instance: "ci", ActionDigest: d, SkipCacheLookup: true, Client: "peer:127.0.0.1"}) {
		t.Fatalf("submitted %+v", f.submitted)
	}
	wait, err := ex.WaitExecution(ctx, &repb.WaitExecutionRequest{Name: "operations/fake-1"})
	if err != nil {
		t.Fatal(err)
	}
	if ops := collect(t, wait); len(ops) != 3 {
		t.Fatalf("WaitExecution: %v", ops)
	}
	opc := longrunningpb.NewOperationsClient(conn)
	if op, err := opc.GetOperation(ctx, &longrunningpb.GetOperationRequest{Name: "operations/x"}); err != nil || op.GetName() != "operations/x" {
		t.Fatalf("GetOperation: %v %v", op, err)
	}
	if _, err := opc.CancelOperation(ctx, &longrunningpb.CancelOperationRequest{Name: "operations/x"}); err != nil {
		t.Fatal(err)
	}
	if _, err := opc.DeleteOperation(ctx, &longrunningpb.DeleteOperationRequest{Name: "operations/x"}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("DeleteOperation: %v, want the scheduler's FAILED_PRECONDITION", err)
	}
	want := []string{"wait operations/fake-1 ", "get operations/x ", "cancel operations/x ", "delete operations/x "}
	if len(f.calls) != len(want) {
		t.Fatalf("calls %q, want %q", f.calls, want)
	}
	for i := range want {
		if f.calls[i] != want[i] {
			t.Fatalf("calls %q, want %q", f.calls, want)
		}
	}
}

// TestServiceSubmitErrors: an action that cannot run is answered in the
// ExecuteResponse (with every MISSING violation), other errors end the call.
func TestServiceSubmitErrors(t *testing.T) {
	ctx := context.Background()
	gone := []cache.Digest{cache.DigestOf([]byte("x")), cache.DigestOf([]byte("y"))}
	f := &fakeScheduler{submitErr: cache.MissingBlobsError("missing", gone)}
	ex := repb.NewExecutionClient(serve(t, f))
	d := cache.DigestOf([]byte("action"))
	stream, err := ex.Execute(ctx, &repb.ExecuteRequest{ActionDigest: d.Proto()})
	if err != nil {
		t.Fatal(err)
	}
	ops := collect(t, stream)
	resp := &repb.ExecuteResponse{}
	if len(ops) != 1 || !ops[0].GetDone() || ops[0].GetResponse().UnmarshalTo(resp) != nil {
		t.Fatalf("operations %v", ops)
	}
	if got := cache.MissingFromError(status.ErrorProto(resp.GetStatus())); len(got) != 2 || got[0] != gone[0] || got[1] != gone[1] {
		t.Fatalf("missing %v, want %v", got, gone)
	}
	f.submitErr = status.Error(codes.ResourceExhausted, "queue full")
	stream, err = ex.Execute(ctx, &repb.ExecuteRequest{ActionDigest: d.Proto()})
	if err == nil {
		_, err = stream.Recv()
	}
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a full queue: %v, want RESOURCE_EXHAUSTED", err)
	}
}
