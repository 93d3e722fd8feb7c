package cache

import (
	"bytes"
	"context"
	"io"
)

// emptyBlobStore makes the empty blob always present, as REAPI requires, whatever the
// store beneath holds.
type emptyBlobStore struct{ BlobStore }

// WithEmptyBlob wraps s so the empty blob is always present and never stored.
func WithEmptyBlob(s BlobStore) BlobStore { return emptyBlobStore{s} }

func (e emptyBlobStore) Get(ctx context.Context, d Digest, offset int64) (io.ReadCloser, error) {
	if d.IsEmpty() && offset == 0 {
		return io.NopCloser(bytes.NewReader(nil)), nil
	}
	return e.BlobStore.Get(ctx, d, offset)
}

func (e emptyBlobStore) Put(ctx context.Context, d Digest, r io.Reader) error {
	if d.Size == 0 {
		return CopyVerified(io.Discard, r, d)
	}
	return e.BlobStore.Put(ctx, d, r)
}

func (e emptyBlobStore) FindMissing(ctx context.Context, ds []Digest) ([]Digest, error) {
	rest := ds[:0:0]
	for _, d := range ds {
		if !d.IsEmpty() {
			rest = append(rest, d)
		}
	}
	if len(rest) == 0 {
		return nil, nil
	}
	return e.BlobStore.FindMissing(ctx, rest)
}
