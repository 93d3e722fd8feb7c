package auth

import (
	"context"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
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
	dropRequester(md)
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(wrapperspb.String(identity))
	if err != nil {
		panic(err) // a StringValue always marshals
	}
	md.AuxiliaryMetadata = append(md.AuxiliaryMetadata, &anypb.Any{TypeUrl: RequesterTypeURL, Value: b})
}

// dropRequester removes any requester record from md.
func dropRequester(md *repb.ExecutedActionMetadata) {
	kept := md.AuxiliaryMetadata[:0]
	for _, a := range md.AuxiliaryMetadata {
		if a.GetTypeUrl() != RequesterTypeURL {
			kept = append(kept, a)
		}
	}
	md.AuxiliaryMetadata = kept
}

// RecordWrites returns ac such that every result a client writes (UpdateActionResult)
// records the caller of ctx as its requester, replacing whatever record the client
// put there itself (an anonymous caller's is removed): a client cannot name another.
func RecordWrites(ac cache.ActionCache) cache.ActionCache { return recordingAC{ac} }

type recordingAC struct{ cache.ActionCache }

func (r recordingAC) Put(ctx context.Context, key cache.ActionKey, res *repb.ActionResult) error {
	c, _ := CallerFrom(ctx)
	_, claimed := Requester(res)
	if c.Primary().IsAnonymous() && !claimed {
		return r.ActionCache.Put(ctx, key, res)
	}
	res = proto.Clone(res).(*repb.ActionResult)
	if res.ExecutionMetadata == nil {
		res.ExecutionMetadata = &repb.ExecutedActionMetadata{}
	}
	if c.Primary().IsAnonymous() {
		dropRequester(res.ExecutionMetadata)
	} else {
		RecordRequester(res.ExecutionMetadata, c.String())
	}
	return r.ActionCache.Put(ctx, key, res)
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
