// Package execution is the REAPI Execution service and the google.longrunning
// Operations service, over any Scheduler: the local one (package scheduler) or
// another that keeps its queue and operations elsewhere (a cluster's).
package execution

import (
	"context"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
)

// Request is one Execute call, as a Scheduler is asked it.
type Request struct {
	Instance        string
	ActionDigest    cache.Digest
	SkipCacheLookup bool
	// Owner is the caller's identity (package engine/auth's string form; "" for an
	// anonymous caller): only it may wait on, get, cancel or delete the operation, and
	// the action-cache entry and the link of the execution record it.
	Owner string
	// Client names the caller for per-client limits (reapi.ClientID); "" for callers
	// that are not limited.
	Client string
}

// Scheduler runs executions and keeps the operations clients follow them by. Its
// errors are gRPC statuses; another owner's operation is NOT_FOUND, as is one that
// never existed or was forgotten.
type Scheduler interface {
	// Submit starts the execution of req, or joins an identical one in flight, and
	// returns a Watch on a new operation for it; an action-cache hit is a finished
	// operation at once. An action that cannot run is an error: INVALID_ARGUMENT, or
	// FAILED_PRECONDITION with a MISSING violation for each absent blob.
	Submit(ctx context.Context, req Request) (Watch, error)
	// Wait returns a new Watch on owner's operation called name (WaitExecution).
	Wait(ctx context.Context, name, owner string) (Watch, error)
	// Get returns owner's operation called name as it stands, without waiting.
	Get(ctx context.Context, name, owner string) (*longrunningpb.Operation, error)
	// Cancel ends owner's operation called name: its watches get CANCELLED. The
	// execution goes on while other operations merged into it wait. Cancelling a
	// finished operation does nothing.
	Cancel(ctx context.Context, name, owner string) error
	// Delete forgets owner's finished operation; a running one is FAILED_PRECONDITION.
	Delete(ctx context.Context, name, owner string) error
}

// Watch follows one operation for one client.
type Watch interface {
	// Name is the operation's name.
	Name() string
	// Next blocks until the operation's stage differs from *seen, then returns the
	// operation and updates *seen.
	Next(ctx context.Context, seen *repb.ExecutionStage_Value) (*longrunningpb.Operation, error)
	// Close detaches the client; when the last client of an unfinished execution has
	// left, the scheduler may cancel it.
	Close()
}

// Operation renders an operation on action at stage as a longrunning Operation;
// resp, once set, makes it done.
func Operation(name string, action cache.Digest, stage repb.ExecutionStage_Value, resp *repb.ExecuteResponse) (*longrunningpb.Operation, error) {
	md, err := anypb.New(&repb.ExecuteOperationMetadata{Stage: stage, ActionDigest: action.Proto()})
	if err != nil {
		return nil, status.Errorf(codes.Internal, "operation metadata: %v", err)
	}
	out := &longrunningpb.Operation{Name: name, Metadata: md}
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

// Response blocks until w's operation is done and returns its ExecuteResponse.
func Response(ctx context.Context, w Watch) (*repb.ExecuteResponse, error) {
	var seen repb.ExecutionStage_Value
	for {
		op, err := w.Next(ctx, &seen)
		if err != nil {
			return nil, err
		}
		if op.GetDone() {
			resp := &repb.ExecuteResponse{}
			if err := op.GetResponse().UnmarshalTo(resp); err != nil {
				return nil, status.Errorf(codes.Internal, "operation %s: response: %v", op.GetName(), err)
			}
			return resp, nil
		}
	}
}

// StatusProto is err as the google.rpc.Status of an ExecuteResponse (OK for nil).
func StatusProto(err error) *rpcstatus.Status {
	if err == nil {
		return &rpcstatus.Status{}
	}
	return status.Convert(err).Proto()
}
