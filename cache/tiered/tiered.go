// Package tiered puts a local disk store in front of a shared remote store (a bucket):
// every write reaches the remote before it succeeds and before the local tier offers
// the blob, reads come from the local tier (verified, as always) and fetch what it
// lacks from the remote, and FindMissing asks the remote, whose positive-existence
// cache answers for what this process wrote or saw recently.
package tiered

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/disk"
	"golang.org/x/sync/singleflight"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Remote is the shared tier: a BlobStore that can also upload from verified seekable
// data and knows, without a request, which blobs it holds fresh (cache/s3's CAS).
type Remote interface {
	cache.BlobStore
	// PutFile uploads blob d from data, already verified to be d; nil means the remote
	// holds the blob.
	PutFile(ctx context.Context, d cache.Digest, data io.ReaderAt) error
	// Fresh reports whether the remote is known to hold d, without asking it.
	Fresh(d cache.Digest) bool
}

// Options configures a Store.
type Options struct {
	// MaxLocalBlob is the largest blob kept in the local tier; larger ones live only in
	// the remote and are streamed from it (verified). 0 means half the local tier's
	// bound, or no limit if it has none.
	MaxLocalBlob int64
	// ActionCache is the action cache kept with the remote blobs (the bucket's); nil
	// means the local tier's.
	ActionCache cache.ActionCache
	Logger      *slog.Logger
}

// Store is a local disk tier in front of a remote. It implements cache.BlobStore and
// cache.LocalFiles.
type Store struct {
	local    *disk.Store
	remote   Remote
	ac       cache.ActionCache
	maxLocal int64
	fetches  singleflight.Group
	log      *slog.Logger
}

var (
	_ cache.Store      = (*Store)(nil)
	_ cache.LocalFiles = (*Store)(nil)
)

// New returns local in front of remote.
func New(local *disk.Store, remote Remote, opts Options) *Store {
	s := &Store{local: local, remote: remote, ac: opts.ActionCache, maxLocal: opts.MaxLocalBlob, log: opts.Logger}
	if s.ac == nil {
		s.ac = local.ActionCache()
	}
	if s.maxLocal <= 0 {
		s.maxLocal = local.MaxSize() / 2
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	return s
}

// Local is the local tier.
func (s *Store) Local() *disk.Store { return s.local }

// fits reports whether d may be kept in the local tier.
func (s *Store) fits(d cache.Digest) bool { return s.maxLocal <= 0 || d.Size <= s.maxLocal }

// Get implements cache.BlobStore: from the local tier, else fetched from the remote
// into it first (one fetch however many readers wait), else, for blobs too large for
// the local tier, streamed from the remote; every path verifies the bytes.
func (s *Store) Get(ctx context.Context, d cache.Digest, offset int64) (io.ReadCloser, error) {
	r, err := s.local.Get(ctx, d, offset)
	if status.Code(err) != codes.NotFound {
		return r, err
	}
	if !s.fits(d) {
		return s.remote.Get(ctx, d, offset)
	}
	if err := s.fetch(ctx, d); err != nil {
		return nil, err
	}
	r, err = s.local.Get(ctx, d, offset)
	if status.Code(err) == codes.NotFound {
		// Evicted the moment it arrived (a small tier under load): read the remote.
		return s.remote.Get(ctx, d, offset)
	}
	return r, err
}

// fetch copies blob d from the remote into the local tier. Concurrent callers share one
// download, which finishes even if the caller that started it goes away.
func (s *Store) fetch(ctx context.Context, d cache.Digest) error {
	ch := s.fetches.DoChan(d.Hash, func() (any, error) {
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Minute+time.Duration(d.Size/(10<<20))*time.Second)
		defer cancel()
		body, err := s.remote.Get(fctx, d, 0)
		if err != nil {
			return nil, err
		}
		defer body.Close()
		st, err := s.local.Stage(fctx, d, body)
		if err != nil {
			return nil, err
		}
		return nil, st.Commit()
	})
	select {
	case res := <-ch:
		return res.Err
	case <-ctx.Done():
		return status.FromContextError(ctx.Err()).Err()
	}
}

// Put implements cache.BlobStore: the bytes are verified into a temp file of the local
// tier, uploaded from it to the remote, and only then committed locally, so the local
// tier never offers a blob the remote lacks. A blob both tiers already hold is only
// verified.
func (s *Store) Put(ctx context.Context, d cache.Digest, r io.Reader) error {
	if s.remote.Fresh(d) && s.local.Has(d) {
		return cache.CopyVerified(io.Discard, r, d)
	}
	st, err := s.local.Stage(ctx, d, r)
	if err != nil {
		return err
	}
	defer st.Discard()
	f, err := st.Open()
	if err != nil {
		return err
	}
	defer f.Close()
	if err := s.remote.PutFile(ctx, d, f); err != nil {
		return err
	}
	if !s.fits(d) {
		return nil
	}
	return st.Commit()
}

// FindMissing implements cache.BlobStore. The remote answers: a local copy alone does
// not prove that other processes sharing the bucket can read the blob. Blobs this
// process wrote or read recently are answered from the remote's existence cache
// without a request.
func (s *Store) FindMissing(ctx context.Context, ds []cache.Digest) ([]cache.Digest, error) {
	return s.remote.FindMissing(ctx, ds)
}

// BlobFile implements cache.LocalFiles: the verified local file of blob d, fetched from
// the remote first if needed. A blob too large for the local tier has no local file:
// RESOURCE_EXHAUSTED, and the caller reads it through Get instead.
func (s *Store) BlobFile(ctx context.Context, d cache.Digest) (string, error) {
	p, err := s.local.BlobFile(ctx, d)
	if status.Code(err) != codes.NotFound {
		return p, err
	}
	if !s.fits(d) {
		return "", status.Errorf(codes.ResourceExhausted, "blob %s is larger than the local tier keeps (%d bytes); read it through the store", d, s.maxLocal)
	}
	if err := s.fetch(ctx, d); err != nil {
		return "", err
	}
	return s.local.BlobFile(ctx, d)
}

// AdoptFile implements cache.LocalFiles: f is uploaded to the remote, then linked into
// the local tier; success means both tiers hold the blob (only the remote, if it is too
// large for the local tier).
func (s *Store) AdoptFile(ctx context.Context, d cache.Digest, f *os.File) error {
	if err := s.remote.PutFile(ctx, d, f); err != nil {
		return err
	}
	if !s.fits(d) {
		return nil
	}
	return s.local.AdoptFile(ctx, d, f)
}

// ActionCache implements cache.Store: the remote's (Options.ActionCache). Wrap it in
// cache.WithCompletenessCheck over this store: its FindMissing asks the remote, so a
// hit needs every blob in the shared tier (and keeps old ones alive, see cache/s3).
func (s *Store) ActionCache() cache.ActionCache { return s.ac }

// Close implements cache.Store: it closes the local tier.
func (s *Store) Close() error { return s.local.Close() }

// String describes the store.
func (s *Store) String() string {
	return fmt.Sprintf("%s as the local tier of %s", s.local, s.remote)
}
