package disk

import (
	"context"
	"errors"
	"io/fs"
	"os"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ActionCache returns the store's action cache. Entries are partitioned by instance
// name: the file name is the SHA-256 of the instance name and the action digest.
func (s *Store) ActionCache() cache.ActionCache { return actionCache{s} }

type actionCache struct{ s *Store }

// Entries are stored as the SHA-256 of the serialized ActionResult followed by the
// serialized ActionResult, so a damaged entry is detected and dropped, not served.
func (a actionCache) Get(_ context.Context, k cache.ActionKey) (*repb.ActionResult, error) {
	kh := cache.ActionKeyHash(k)
	path := a.s.acPath(kh)
	b, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			a.s.forget("a" + kh)
			return nil, status.Errorf(codes.NotFound, "no cached result for action %s", k.Action)
		}
		return nil, status.Errorf(codes.Internal, "read action cache entry: %v", err)
	}
	r, ok := cache.DecodeActionResult(b)
	if !ok {
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
	b, err := cache.EncodeActionResult(k, r)
	if err != nil {
		return err
	}
	kh := cache.ActionKeyHash(k)
	tmp, err := a.s.createTemp(0o444)
	if err != nil {
		return err
	}
	if _, err := tmp.Write(b); err != nil {
		discard(tmp)
		return status.Errorf(codes.Internal, "write action cache entry: %v", err)
	}
	if err := ctx.Err(); err != nil {
		discard(tmp)
		return status.FromContextError(err).Err()
	}
	if err := a.s.commit(tmp, "a"+kh, a.s.acPath(kh), int64(len(b))); err != nil {
		discard(tmp)
		return err
	}
	return nil
}
