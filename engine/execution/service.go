package execution

import (
	"context"
	"errors"
	"log/slog"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/audit"
	"github.com/kilnbuild/kiln/engine/auth"
	"github.com/kilnbuild/kiln/engine/reapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
)

// Server implements the REAPI Execution service and google.longrunning Operations
// over a Scheduler.
type Server struct {
	longrunningpb.UnimplementedOperationsServer
	s     Scheduler
	log   *slog.Logger
	audit *audit.Log
}

// NewServer returns the services over s; every Execute call is recorded in the audit
// log al (nil: not recorded); log may be nil.
func NewServer(s Scheduler, log *slog.Logger, al *audit.Log) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{s: s, log: log, audit: al}
}

// Register adds the Execution and Operations services to g.
func (e *Server) Register(g grpc.ServiceRegistrar) {
	repb.RegisterExecutionServer(g, e)
	longrunningpb.RegisterOperationsServer(g, e)
}

// Execute implements repb.ExecutionServer.
func (e *Server) Execute(req *repb.ExecuteRequest, stream repb.Execution_ExecuteServer) error {
	ctx := stream.Context()
	if err := reapi.CheckInstance(req.GetInstanceName()); err != nil {
		return err
	}
	if f := req.GetDigestFunction(); f != repb.DigestFunction_UNKNOWN && f != repb.DigestFunction_SHA256 {
		return status.Errorf(codes.InvalidArgument, "digest function %v is not supported; kiln serves SHA256", f)
	}
	d, err := cache.FromProto(req.GetActionDigest())
	if err != nil {
		return err
	}
	w, err := e.s.Submit(ctx, Request{Instance: req.GetInstanceName(), ActionDigest: d, SkipCacheLookup: req.GetSkipCacheLookup(), Owner: owner(ctx), Client: reapi.ClientID(ctx)})
	e.record(ctx, d, w, err)
	if err != nil {
		if status.Code(err) == codes.FailedPrecondition || status.Code(err) == codes.InvalidArgument {
			// REAPI: errors about the action itself travel in the ExecuteResponse, so
			// clients see the MISSING violations and re-upload.
			return sendFailed(stream, d, err)
		}
		return err
	}
	e.log.Info("execute", "action", d.String(), "operation", w.Name(), "client", reapi.Client(ctx), "identity", callerOf(ctx).String())
	return e.follow(ctx, w, stream)
}

// record appends the audit line of one Execute call: who, from where, which action,
// which operation (or why none). A failing audit log is logged, not fatal to the call.
func (e *Server) record(ctx context.Context, d cache.Digest, w Watch, err error) {
	if e.audit == nil {
		return
	}
	c := callerOf(ctx)
	r := audit.Record{Event: audit.EventExecute, Identity: c.String(), Peer: c.Peer, Action: d.String(), By: "kiln serve"}
	if err != nil {
		r.Reason = status.Convert(err).Message()
	} else {
		r.Operation = w.Name()
	}
	if aerr := e.audit.Append(r); aerr != nil {
		e.log.Error("audit log", "err", aerr, "action", d.String())
	}
}

// WaitExecution implements repb.ExecutionServer.
func (e *Server) WaitExecution(req *repb.WaitExecutionRequest, stream repb.Execution_WaitExecutionServer) error {
	w, err := e.s.Wait(stream.Context(), req.GetName(), owner(stream.Context()))
	if err != nil {
		return err
	}
	return e.follow(stream.Context(), w, stream)
}

type opSender interface {
	Send(*longrunningpb.Operation) error
}

// follow streams the operation's stages until it is done or the client leaves.
func (e *Server) follow(ctx context.Context, w Watch, stream opSender) error {
	defer w.Close()
	var seen repb.ExecutionStage_Value
	for {
		op, err := w.Next(ctx, &seen)
		if err != nil {
			if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
				return status.FromContextError(err).Err()
			}
			return err
		}
		if err := stream.Send(op); err != nil {
			return err
		}
		if op.GetDone() {
			return nil
		}
	}
}

// sendFailed answers with one finished operation carrying err as its status.
func sendFailed(stream opSender, d cache.Digest, err error) error {
	p, perr := Operation("operations/failed", d, repb.ExecutionStage_COMPLETED, &repb.ExecuteResponse{Status: StatusProto(err)})
	if perr != nil {
		return perr
	}
	return stream.Send(p)
}

// GetOperation implements longrunningpb.OperationsServer.
func (e *Server) GetOperation(ctx context.Context, req *longrunningpb.GetOperationRequest) (*longrunningpb.Operation, error) {
	return e.s.Get(ctx, req.GetName(), owner(ctx))
}

// CancelOperation ends the caller's operation; an execution merged with other
// clients' goes on for them (see Scheduler.Cancel).
func (e *Server) CancelOperation(ctx context.Context, req *longrunningpb.CancelOperationRequest) (*emptypb.Empty, error) {
	if err := e.s.Cancel(ctx, req.GetName(), owner(ctx)); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

// DeleteOperation implements longrunningpb.OperationsServer.
func (e *Server) DeleteOperation(ctx context.Context, req *longrunningpb.DeleteOperationRequest) (*emptypb.Empty, error) {
	if err := e.s.Delete(ctx, req.GetName(), owner(ctx)); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

// owner names the caller for the operations it owns: its identity (package
// engine/auth), or "" for an anonymous caller.
func owner(ctx context.Context) string {
	c := callerOf(ctx)
	if c.Primary().IsAnonymous() {
		return ""
	}
	return c.String()
}

// callerOf is the caller the server's Authenticator established.
func callerOf(ctx context.Context) auth.Caller {
	c, _ := auth.CallerFrom(ctx)
	return c
}
