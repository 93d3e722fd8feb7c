package attest

import (
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// LinkTypeURL is the type URL of the google.protobuf.Any that kiln puts in
// ActionResult.execution_metadata.auxiliary_metadata to reference an action's link: the
// Any holds a build.bazel.remote.execution.v2.Digest, the digest of the DSSE envelope in
// the CAS. The URL's last segment is the message's full name, so any protobuf runtime
// decodes it as a Digest; the kiln.build prefix tells it apart from other Digests.
const LinkTypeURL = "kiln.build/attest/link-envelope/build.bazel.remote.execution.v2.Digest"

// AuxiliaryMetadata returns the Any that references envelope env.
func AuxiliaryMetadata(env cache.Digest) *anypb.Any {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(env.Proto())
	if err != nil {
		panic(err) // a Digest always marshals
	}
	return &anypb.Any{TypeUrl: LinkTypeURL, Value: b}
}

// AttachToResult records envelope env in r's execution metadata (replacing an earlier
// kiln link reference), so a cached result keeps its link.
func AttachToResult(r *repb.ActionResult, env cache.Digest) {
	if r.ExecutionMetadata == nil {
		r.ExecutionMetadata = &repb.ExecutedActionMetadata{}
	}
	md := r.ExecutionMetadata
	kept := md.AuxiliaryMetadata[:0]
	for _, a := range md.AuxiliaryMetadata {
		if a.GetTypeUrl() != LinkTypeURL {
			kept = append(kept, a)
		}
	}
	md.AuxiliaryMetadata = append(kept, AuxiliaryMetadata(env))
}

// LinkFromResult returns the envelope digest recorded in r, if any; a malformed kiln
// entry is INVALID_ARGUMENT.
func LinkFromResult(r *repb.ActionResult) (cache.Digest, bool, error) {
	for _, a := range r.GetExecutionMetadata().GetAuxiliaryMetadata() {
		if a.GetTypeUrl() != LinkTypeURL {
			continue
		}
		var d repb.Digest
		if err := proto.Unmarshal(a.GetValue(), &d); err != nil {
			return cache.Digest{}, false, status.Errorf(codes.InvalidArgument, "link reference in action result: %v", err)
		}
		cd, err := cache.FromProto(&d)
		if err != nil {
			return cache.Digest{}, false, status.Errorf(codes.InvalidArgument, "link reference in action result: %v", status.Convert(err).Message())
		}
		return cd, true, nil
	}
	return cache.Digest{}, false, nil
}
