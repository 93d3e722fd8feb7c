package cache

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// MaxActionResult bounds a stored action-cache entry; results with large inline data
// are refused.
const MaxActionResult = 16 << 20

// ActionKeyHash names key's entry in a flat key space (a file name, an object key):
// the SHA-256 of the instance name, a NUL and the action digest, so instances
// partition the cache.
func ActionKeyHash(k ActionKey) string {
	h := sha256.New()
	h.Write([]byte(k.Instance))
	h.Write([]byte{0})
	h.Write([]byte(k.Action.String()))
	return hex.EncodeToString(h.Sum(nil))
}

// EncodeActionResult is r as stores keep it: the SHA-256 of the deterministically
// serialized ActionResult, then the serialization, so damage is detected on read.
// A result over MaxActionResult bytes is INVALID_ARGUMENT.
func EncodeActionResult(k ActionKey, r *repb.ActionResult) ([]byte, error) {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(r)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "action result: %v", err)
	}
	if len(b) > MaxActionResult {
		return nil, status.Errorf(codes.InvalidArgument, "action result for %s is %d bytes, over the %d-byte limit", k.Action, len(b), MaxActionResult)
	}
	sum := sha256.Sum256(b)
	return append(sum[:], b...), nil
}

// DecodeActionResult parses an entry EncodeActionResult made; false if it is damaged.
func DecodeActionResult(b []byte) (*repb.ActionResult, bool) {
	if len(b) < sha256.Size {
		return nil, false
	}
	sum := sha256.Sum256(b[sha256.Size:])
	r := &repb.ActionResult{}
	if !bytes.Equal(sum[:], b[:sha256.Size]) || proto.Unmarshal(b[sha256.Size:], r) != nil {
		return nil, false
	}
	return r, true
}
