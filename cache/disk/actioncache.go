package disk

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io/fs"
	"os"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// maxActionResult bounds an action-cache entry; results with large inline data are refused.
const maxActionResult = 16 << 20

// ActionCache returns the store's action cache. Entries are partitioned by instance
// name: the file name is the SHA-256 of the instance name and the action digest.
func (s *Store) ActionCache() cache.ActionCache { return actionCache{s} }

type actionCache struct{ s *Store }

// acKey hashes an ActionKey into the entry's file name.
func acKey(k cache.ActionKey) string {
	h := sha256.New()
	h.Write([]byte(k.Instance))
	h.Write([]byte{0})
	h.Write([]byte(k.Action.String()))
	return hex.EncodeToString(h.Sum(nil))
}

// Entries are stored as the SHA-256 of the serialized ActionResult followed by the
// serialized ActionResult, so a damaged entry is detected and dropped, not served.
func (a actionCache) Get(_ context.Context, k cache.ActionKey) (*repb.ActionResult, error) {
	kh := acKey(k)
	path := a.s.acPath(kh)
	b, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			a.s.forget("a" + kh)
			return nil, status.Errorf(codes.NotFound, "no cached result for action %s", k.Action)
		}
		return nil, status.Errorf(codes.Internal, "read action cache entry: %v", err)
	}
	if len(b) < sha256.Size {
		return nil, a.drop(path, kh, k)
	}
	sum := sha256.Sum256(b[sha256.Size:])
	if !bytes.Equal(sum[:], b[:sha256.Size]) {
		return nil, a.drop(path, kh, k)
	}
	r := &repb.ActionResult{}
	if err := proto.Unmarshal(b[sha256.Size:], r); err != nil {
		return nil, a.drop(path, kh, k)
	}
	a.s.touch("a"+kh, path, int64(len(b)))
	return r, nil
}

func (a actionCache) drop(path, kh string, k cache.ActionKey) error {
	if info, err := os.Stat(path); err == nil {
		a.s.removeCorrupt(path, "a"+kh, info)
	}
	return status.Errorf(codes.NotFound, "no cached result for action %s (a damaged entry was removed)", k.Action)
}

func (a actionCache) Put(ctx context.Context, k cache.ActionKey, r *repb.ActionResult) error {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(r)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "action result: %v", err)
	}
	if len(b) > maxActionResult {
		return status.Errorf(codes.InvalidArgument, "action result for %s is %d bytes, over the %d-byte limit", k.Action, len(b), maxActionResult)
	}
	sum := sha256.Sum256(b)
	kh := acKey(k)
	tmp, err := a.s.createTemp(0o444)
	if err != nil {
		return err
	}
	if _, err := tmp.Write(append(sum[:], b...)); err != nil {
		discard(tmp)
		return status.Errorf(codes.Internal, "write action cache entry: %v", err)
	}
	if err := ctx.Err(); err != nil {
		discard(tmp)
		return status.FromContextError(err).Err()
	}
	if err := a.s.commit(tmp, "a"+kh, a.s.acPath(kh), int64(len(b)+sha256.Size)); err != nil {
		discard(tmp)
		return err
	}
	return nil
}
