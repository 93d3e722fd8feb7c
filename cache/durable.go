package cache

import (
	"bytes"
	"context"
	"io"

	"github.com/kilnbuild/kiln/internal/grpcerr"
	"golang.org/x/sync/errgroup"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// durableCopy keeps a second copy of what is written in a store that never evicts.
type durableCopy struct {
	BlobStore
	durable BlobStore
}

// WithDurableCopy wraps s so that every Put also lands in durable (a store with no
// eviction or lifecycle, e.g. the attestations prefix of a bucket) and a blob s has
// lost is still read, and found, from durable. Signed links go through it: they are
// evidence and must outlive the cache entries that reference them.
func WithDurableCopy(s, durable BlobStore) BlobStore { return durableCopy{s, durable} }

// smallDurableCopy is the largest blob Put writes to both stores at once, from memory
// (a signed link's envelope is a few KiB): one store's round trip instead of a write,
// a lookup and a second write one after another.
const smallDurableCopy = 1 << 20

func (c durableCopy) Put(ctx context.Context, d Digest, r io.Reader) error {
	if d.Size <= smallDurableCopy {
		// Verified before either store sees it; each store checks it again on its way
		// in, and Put succeeds only once both hold it.
		var b bytes.Buffer
		b.Grow(int(d.Size))
		if err := CopyVerified(&b, r, d); err != nil {
			return err
		}
		g, gctx := errgroup.WithContext(ctx)
		g.Go(func() error { return c.BlobStore.Put(gctx, d, bytes.NewReader(b.Bytes())) })
		g.Go(func() error {
			return grpcerr.Wrap(c.durable.Put(gctx, d, bytes.NewReader(b.Bytes())), "durable copy of %s", d)
		})
		return g.Wait()
	}
	if err := c.BlobStore.Put(ctx, d, r); err != nil {
		return err
	}
	if m, err := c.durable.FindMissing(ctx, []Digest{d}); err != nil || len(m) == 0 {
		return err
	}
	// Copied from what s verified and holds, so r is read once.
	rc, err := c.BlobStore.Get(ctx, d, 0)
	if err != nil {
		return grpcerr.Wrap(err, "durable copy of %s", d)
	}
	defer rc.Close()
	return c.durable.Put(ctx, d, rc)
}

func (c durableCopy) Get(ctx context.Context, d Digest, offset int64) (io.ReadCloser, error) {
	r, err := c.BlobStore.Get(ctx, d, offset)
	if status.Code(err) == codes.NotFound {
		return c.durable.Get(ctx, d, offset)
	}
	return r, err
}

func (c durableCopy) FindMissing(ctx context.Context, ds []Digest) ([]Digest, error) {
	missing, err := c.BlobStore.FindMissing(ctx, ds)
	if err != nil || len(missing) == 0 {
		return missing, err
	}
	return c.durable.FindMissing(ctx, missing)
}
