package disk

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/kilnbuild/kiln/cache"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Staged is a verified blob in the store's temp dir that is not yet visible: a tier
// above the disk (a bucket) takes it first, and only then is it committed, so the disk
// never offers a blob the tier above lacks.
type Staged struct {
	s    *Store
	f    *os.File
	d    cache.Digest
	done bool
}

// Stage copies r into a temp file of the store, verified against d
// (INVALID_ARGUMENT if the bytes are not blob d, and nothing is kept). A blob larger
// than the free disk space is RESOURCE_EXHAUSTED before a byte is written.
func (s *Store) Stage(ctx context.Context, d cache.Digest, r io.Reader) (*Staged, error) {
	if err := s.reserve(d, false); err != nil {
		return nil, err
	}
	tmp, err := s.createTemp(0o444)
	if err != nil {
		s.unreserve(d.Size, false)
		return nil, err
	}
	st := &Staged{s: s, f: tmp, d: d}
	if err := cache.CopyVerified(tmp, r, d); err != nil {
		st.Discard()
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		st.Discard()
		return nil, status.FromContextError(err).Err()
	}
	return st, nil
}

// Open opens the staged file for reading; the handle stays valid after Commit or
// Discard (and after eviction), until closed.
func (st *Staged) Open() (*os.File, error) {
	name := st.f.Name()
	if name == "" { // an unnamed temp file (createTemp): reopened through its descriptor
		name = fmt.Sprintf("/proc/self/fd/%d", st.f.Fd())
	}
	f, err := os.Open(name)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "open staged blob %s: %v", st.d, err)
	}
	return f, nil
}

// Commit makes the staged blob visible in the store (atomically: a link or a rename).
func (st *Staged) Commit() error {
	if st.done {
		return status.Errorf(codes.Internal, "staged blob %s committed twice", st.d)
	}
	st.done = true
	defer st.s.unreserve(st.d.Size, false)
	if err := st.s.commit(st.f, "c"+st.d.Hash, st.s.casPath(st.d.Hash), st.d.Size); err != nil {
		discard(st.f)
		return err
	}
	return nil
}

// Discard drops the staged blob unless it was committed; it is safe to defer.
func (st *Staged) Discard() {
	if !st.done {
		st.done = true
		discard(st.f)
		st.s.unreserve(st.d.Size, false)
	}
}

// MaxSize is the bound on the store's size (0: none).
func (s *Store) MaxSize() int64 { return s.opts.MaxSize }
