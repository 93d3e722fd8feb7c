package reapi

import (
	"context"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

type acServer struct{ s *Server }

func (a acServer) GetActionResult(ctx context.Context, req *repb.GetActionResultRequest) (*repb.ActionResult, error) {
	if err := CheckInstance(req.GetInstanceName()); err != nil {
		return nil, err
	}
	if err := checkDigestFunction(req.GetDigestFunction()); err != nil {
		return nil, err
	}
	d, err := cache.FromProto(req.GetActionDigest())
	if err != nil {
		return nil, err
	}
	r, err := a.s.ac.Get(ctx, cache.ActionKey{Instance: req.GetInstanceName(), Action: d})
	if err != nil {
		return nil, err
	}
	a.s.inline(ctx, r, req.GetInlineStdout(), req.GetInlineStderr(), req.GetInlineOutputFiles())
	return r, nil
}

// inline fills the raw fields a client asked for, within the server's inline budget;
// what does not fit is left to be fetched by digest, as the spec allows.
func (s *Server) inline(ctx context.Context, r *repb.ActionResult, stdout, stderr bool, files []string) {
	budget := s.opts.InlineLimit
	fill := func(p *repb.Digest) []byte {
		d, err := cache.FromProto(p)
		if err != nil || d.Size > budget {
			return nil
		}
		b, err := cache.ReadAll(ctx, s.cas, d, budget)
		if err != nil {
			return nil
		}
		budget -= d.Size
		return b
	}
	if stdout && r.GetStdoutDigest() != nil && r.StdoutRaw == nil {
		r.StdoutRaw = fill(r.GetStdoutDigest())
	}
	if stderr && r.GetStderrDigest() != nil && r.StderrRaw == nil {
		r.StderrRaw = fill(r.GetStderrDigest())
	}
	if len(files) > 0 {
		want := make(map[string]bool, len(files))
		for _, f := range files {
			want[f] = true
		}
		for _, f := range r.GetOutputFiles() {
			if want[f.GetPath()] && f.Contents == nil {
				f.Contents = fill(f.GetDigest())
			}
		}
	}
}

func (a acServer) UpdateActionResult(ctx context.Context, req *repb.UpdateActionResultRequest) (*repb.ActionResult, error) {
	if !a.s.opts.AllowClientACWrites {
		return nil, status.Error(codes.PermissionDenied, "this server does not accept action results from clients (only its executor writes the action cache); run kiln serve with --allow-client-ac-writes for a cache-only deployment")
	}
	if err := CheckInstance(req.GetInstanceName()); err != nil {
		return nil, err
	}
	if err := checkDigestFunction(req.GetDigestFunction()); err != nil {
		return nil, err
	}
	d, err := cache.FromProto(req.GetActionDigest())
	if err != nil {
		return nil, err
	}
	r := req.GetActionResult()
	if r == nil {
		return nil, status.Error(codes.InvalidArgument, "action_result missing")
	}
	if err := checkResultPaths(r); err != nil {
		return nil, err
	}
	if err := a.s.checkResultTrees(ctx, r); err != nil {
		return nil, err
	}
	r = proto.Clone(r).(*repb.ActionResult)
	if err := a.s.storeInline(ctx, r); err != nil {
		return nil, err
	}
	// Refuse results whose blobs are not all stored: such an entry could never be served
	// and would only hide a client bug.
	ds, err := cache.ReferencedDigests(ctx, a.s.cas, r)
	if err != nil {
		if status.Code(err) == codes.NotFound {
			return nil, cache.MissingBlobsError("action result references a Tree that is not in the CAS", nil)
		}
		return nil, status.Errorf(codes.InvalidArgument, "action result: %s", status.Convert(err).Message())
	}
	missing, err := a.s.cas.FindMissing(ctx, ds)
	if err != nil {
		return nil, err
	}
	if len(missing) > 0 {
		return nil, cache.MissingBlobsError("action result references blobs that are not in the CAS", missing)
	}
	if err := a.s.ac.Put(ctx, cache.ActionKey{Instance: req.GetInstanceName(), Action: d}, r); err != nil {
		return nil, err
	}
	return r, nil
}

// storeInline moves inline stdout/stderr/file contents into the CAS so action-cache
// entries stay small and every result is served the same way.
func (s *Server) storeInline(ctx context.Context, r *repb.ActionResult) error {
	put := func(raw []byte, dst **repb.Digest) error {
		if raw == nil {
			return nil
		}
		d, err := cache.PutBytes(ctx, s.cas, raw)
		if err != nil {
			return err
		}
		if *dst != nil && (*dst).GetHash() != d.Hash {
			return status.Error(codes.InvalidArgument, "inline data does not match its digest")
		}
		*dst = d.Proto()
		return nil
	}
	if err := put(r.StdoutRaw, &r.StdoutDigest); err != nil {
		return err
	}
	if err := put(r.StderrRaw, &r.StderrDigest); err != nil {
		return err
	}
	r.StdoutRaw, r.StderrRaw = nil, nil
	for _, f := range r.GetOutputFiles() {
		if err := put(f.Contents, &f.Digest); err != nil {
			return err
		}
		f.Contents = nil
	}
	return nil
}
