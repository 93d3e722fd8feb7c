package toolchains

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// txn stages the blobs of one import or build in the content store's ingest area,
// uncommitted, until every blob of every image has been verified; then it commits them
// all and writes the records. Aborting leaves nothing behind: no blob, no record.
type txn struct {
	s       *Store
	id      string
	lock    *fileLock // tmp/ID.lock, held for the txn's life; GC sweeps staging of dead txns
	pending []pendingBlob
	have    map[digest.Digest]bool // blobs verified in this txn (pending or already stored)
}

type pendingBlob struct {
	ref  string
	w    content.Writer
	desc ocispec.Descriptor
}

// txnRefPrefix prefixes ingest refs so GC can tell which txn owns an ingest.
const txnRefPrefix = "kiln-txn-"

func (s *Store) begin(ctx context.Context) (*txn, error) {
	id := randomID()
	l, err := lockFile(ctx, filepath.Join(s.dir, "tmp", id+".lock"), false)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "toolchains: %v", err)
	}
	return &txn{s: s, id: id, lock: l, have: map[digest.Digest]bool{}}, nil
}

// stagingDir is a scratch directory owned by the txn (removed by abort and done).
func (t *txn) stagingDir() string { return filepath.Join(t.s.dir, "tmp", t.id) }

// put streams a blob into the ingest area through fill, which writes the blob's bytes
// to w. If want has a digest, the bytes must match it and its size; otherwise the
// digest is computed. It returns the descriptor of what was written (want's media type
// and annotations kept). A blob already in the store is only hashed, not rewritten.
func (t *txn) put(ctx context.Context, want ocispec.Descriptor, fill func(w io.Writer) error) (ocispec.Descriptor, error) {
	var (
		w   content.Writer
		ref string
		err error
	)
	known := want.Digest != ""
	if known && t.have[want.Digest] {
		w = nil // verify only
	} else {
		ref = fmt.Sprintf("%s%s-%d", txnRefPrefix, t.id, len(t.pending))
		opts := []content.WriterOpt{content.WithRef(ref)}
		if known {
			opts = append(opts, content.WithDescriptor(ocispec.Descriptor{Digest: want.Digest, Size: want.Size}))
		}
		w, err = t.s.content.Writer(ctx, opts...)
		if errdefs.IsAlreadyExists(err) {
			w, err = nil, nil // already stored: verify the source's bytes anyway
		}
		if err != nil {
			return ocispec.Descriptor{}, status.Errorf(codes.Internal, "toolchains: open ingest: %v", err)
		}
	}
	dg := digest.Canonical.Digester()
	cw := &countWriter{w: dg.Hash()}
	var dst io.Writer = cw
	if w != nil {
		dst = io.MultiWriter(w, cw)
	}
	fail := func(err error) (ocispec.Descriptor, error) {
		if w != nil {
			w.Close()
			_ = t.s.content.Abort(ctx, ref)
		}
		return ocispec.Descriptor{}, err
	}
	// fill drains its source even when it fails, so a digest mismatch (the clearest
	// diagnosis of a damaged blob) is reported in preference to a parse error.
	fillErr := fill(dst)
	got := ocispec.Descriptor{MediaType: want.MediaType, Digest: dg.Digest(), Size: cw.n, Annotations: want.Annotations, Platform: want.Platform}
	if fillErr != nil && cw.n == 0 {
		return fail(fillErr) // nothing read: the source lacks the blob
	}
	if known && (got.Digest != want.Digest || (want.Size != 0 && got.Size != want.Size)) {
		return fail(statusInvalid(
			"blob %s does not match its digest (read %d bytes hashing to %s): the image is corrupt or was altered",
			want.Digest, got.Size, got.Digest))
	}
	if fillErr != nil {
		return fail(fillErr)
	}
	if known && want.Size == 0 && got.Size != 0 {
		return fail(status.Errorf(codes.InvalidArgument, "blob %s: descriptor has size 0 but blob has %d bytes", want.Digest, got.Size))
	}
	if w != nil {
		if !known && t.have[got.Digest] {
			w.Close()
			_ = t.s.content.Abort(ctx, ref)
		} else {
			t.pending = append(t.pending, pendingBlob{ref: ref, w: w, desc: got})
		}
	}
	t.have[got.Digest] = true
	return got, nil
}

// commit makes the staged blobs part of the store, then calls records to write the
// index files, all under the shared store lock so GC cannot run in between.
func (t *txn) commit(ctx context.Context, records func() error) error {
	l, err := lockFile(ctx, t.s.storeLock(), true)
	if err != nil {
		return status.FromContextError(err).Err()
	}
	defer l.Unlock()
	for i, p := range t.pending {
		err := p.w.Commit(ctx, p.desc.Size, p.desc.Digest)
		if err != nil && !errdefs.IsAlreadyExists(err) {
			for _, q := range t.pending[i:] {
				q.w.Close()
				_ = t.s.content.Abort(ctx, q.ref)
			}
			t.pending = nil
			return status.Errorf(codes.Internal, "toolchains: commit blob %s: %v", p.desc.Digest, err)
		}
	}
	t.pending = nil
	// A blob found already stored by put may have been collected by a GC that ran
	// before this commit took the lock: check, so no record points at a missing blob.
	for d := range t.have {
		if _, err := t.s.content.Info(ctx, d); err != nil {
			return status.Errorf(codes.Aborted, "toolchains: blob %s vanished during the import (a concurrent gc?); retry", d)
		}
	}
	return records()
}

// done releases the txn: uncommitted blobs are aborted, staging is removed.
func (t *txn) done(ctx context.Context) {
	for _, p := range t.pending {
		p.w.Close()
		_ = t.s.content.Abort(ctx, p.ref)
	}
	t.pending = nil
	_ = removeTree(t.stagingDir())
	_ = os.Remove(filepath.Join(t.s.dir, "tmp", t.id+".lock"))
	t.lock.Unlock()
}

// txnOfRef returns the txn id of an ingest ref written by put, or "".
func txnOfRef(ref string) string {
	rest, ok := strings.CutPrefix(ref, txnRefPrefix)
	if !ok {
		return ""
	}
	id, _, _ := strings.Cut(rest, "-")
	return id
}

// writeImageRecords writes the image record, then its index aliases and names (so a
// name never points at a missing record). The caller holds the store lock (shared).
func (s *Store) writeImageRecords(img Image, indexes []digest.Digest, names []string) error {
	if err := writeJSONAtomic(s.imagePath(img.Digest), imageRecord{Schema: recordSchema, Image: img}); err != nil {
		return status.Errorf(codes.Internal, "toolchains: write record: %v", err)
	}
	for _, ix := range indexes {
		if err := writeJSONAtomic(s.indexPath(ix), indexRecord{Schema: recordSchema, Index: ix, Manifest: img.Digest}); err != nil {
			return status.Errorf(codes.Internal, "toolchains: write record: %v", err)
		}
	}
	for _, n := range names {
		if err := writeJSONAtomic(s.namePath(n), nameRecord{Schema: recordSchema, Name: n, Digest: img.Digest}); err != nil {
			return status.Errorf(codes.Internal, "toolchains: write name: %v", err)
		}
	}
	return nil
}

// countWriter counts bytes written through it.
type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// errLimit is returned when a small JSON blob is larger than we accept.
var errLimit = errors.New("blob too large")
