package auth

import (
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// RequesterTypeURL is the type URL of the google.protobuf.Any that kiln puts in
// ActionResult.execution_metadata.auxiliary_metadata to record who caused the result
// (the identity's string form in a google.protobuf.StringValue): the action cache keeps
// it with the result.
const RequesterTypeURL = "kiln.build/auth/requested-by/google.protobuf.StringValue"

// RecordRequester records identity (a string form) in md, replacing an earlier record.
func RecordRequester(md *repb.ExecutedActionMetadata, identity string) {
	kept := md.AuxiliaryMetadata[:0]
	for _, a := range md.AuxiliaryMetadata {
		if a.GetTypeUrl() != RequesterTypeURL {
			kept = append(kept, a)
		}
	}
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(wrapperspb.String(identity))
	if err != nil {
		panic(err) // a StringValue always marshals
	}
	md.AuxiliaryMetadata = append(kept, &anypb.Any{TypeUrl: RequesterTypeURL, Value: b})
}

// Requester returns the identity recorded in r, if any.
func Requester(r *repb.ActionResult) (string, bool) {
	for _, a := range r.GetExecutionMetadata().GetAuxiliaryMetadata() {
		if a.GetTypeUrl() != RequesterTypeURL {
			continue
		}
		var s wrapperspb.StringValue
		if proto.Unmarshal(a.GetValue(), &s) == nil {
			return s.GetValue(), true
		}
	}
	return "", false
}
