package cache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"hash"
	"io"
	"sync"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// BlobStore is content-addressed storage: get, put and find-missing, nothing more, so
// behaviour (metrics, the empty blob, quarantine, ...) is added by wrapping it.
type BlobStore interface {
	// Get opens blob d for reading from offset; NOT_FOUND if absent, OUT_OF_RANGE if
	// offset > d.Size. A reader that reaches the end of a blob that does not match its
	// digest fails with DATA_LOSS, and the store no longer holds the blob.
	Get(ctx context.Context, d Digest, offset int64) (io.ReadCloser, error)
	// Put stores the bytes read from r until EOF as blob d. Data that does not match d
	// (hash, or more or fewer bytes than d.Size) is INVALID_ARGUMENT and nothing is stored.
	Put(ctx context.Context, d Digest, r io.Reader) error
	// FindMissing returns those of ds that the store does not hold, in the order given.
	FindMissing(ctx context.Context, ds []Digest) ([]Digest, error)
}

// ActionKey names one action-cache entry: an action digest within an instance name.
type ActionKey struct {
	Instance string
	Action   Digest
}

// ActionCache maps actions to their results.
type ActionCache interface {
	// Get returns the stored result for key, NOT_FOUND if there is none.
	Get(ctx context.Context, key ActionKey) (*repb.ActionResult, error)
	// Put stores r as the result for key, replacing any earlier one.
	Put(ctx context.Context, key ActionKey, r *repb.ActionResult) error
}

// ReadAll reads the whole of blob d, refusing blobs larger than limit (RESOURCE_EXHAUSTED).
func ReadAll(ctx context.Context, s BlobStore, d Digest, limit int64) ([]byte, error) {
	if limit > 0 && d.Size > limit {
		return nil, status.Errorf(codes.ResourceExhausted, "blob %s is larger than the %d-byte limit for this read", d, limit)
	}
	r, err := s.Get(ctx, d, 0)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	buf := bytes.NewBuffer(make([]byte, 0, d.Size))
	if _, err := io.Copy(buf, r); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// PutBytes stores data and returns its digest.
func PutBytes(ctx context.Context, s BlobStore, data []byte) (Digest, error) {
	d := DigestOf(data)
	return d, s.Put(ctx, d, bytes.NewReader(data))
}

// ReadProto reads blob d and unmarshals it into m; a blob that does not parse is INVALID_ARGUMENT.
func ReadProto(ctx context.Context, s BlobStore, d Digest, m proto.Message, limit int64) error {
	b, err := ReadAll(ctx, s, d, limit)
	if err != nil {
		return err
	}
	if err := proto.Unmarshal(b, m); err != nil {
		return status.Errorf(codes.InvalidArgument, "blob %s is not a valid %T: %v", d, m, err)
	}
	return nil
}

// PutProto marshals m deterministically, stores it and returns its digest.
func PutProto(ctx context.Context, s BlobStore, m proto.Message) (Digest, error) {
	b, d, err := DigestOfProto(m)
	if err != nil {
		return Digest{}, err
	}
	return d, s.Put(ctx, d, bytes.NewReader(b))
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, 256<<10); return &b }}

// CopyVerified copies r to w until EOF and checks that exactly the bytes of d went
// through: more or fewer bytes, or another hash, is INVALID_ARGUMENT.
func CopyVerified(w io.Writer, r io.Reader, d Digest) error {
	h := sha256.New()
	var n int64
	var err error
	if wt, ok := r.(io.WriterTo); ok {
		// The source hands its bytes over as they are (a ByteStream upload's messages):
		// no copy into a buffer, and whatever goes beyond the declared size is refused
		// before it is written.
		lw := &limitedWriter{w: io.MultiWriter(w, h), left: d.Size}
		n, err = wt.WriteTo(lw)
		if errors.Is(err, errTooLong) {
			n, err = d.Size+1, nil
		}
	} else {
		bp := bufPool.Get().(*[]byte)
		defer bufPool.Put(bp)
		// Read at most one byte beyond the declared size so an overlong stream is caught
		// without reading it all.
		n, err = io.CopyBuffer(io.MultiWriter(w, h), io.LimitReader(r, d.Size+1), *bp)
	}
	if err != nil {
		if _, ok := status.FromError(err); ok && status.Code(err) != codes.Unknown {
			return err
		}
		return status.Errorf(codes.Internal, "copy blob %s: %v", d, err)
	}
	return checkSum(h, n, d)
}

// errTooLong ends a copy into a limitedWriter that got more than its limit.
var errTooLong = errors.New("more than the declared size")

// limitedWriter passes writes on to w up to left bytes in all; a write beyond that
// passes nothing on and fails with errTooLong.
type limitedWriter struct {
	w    io.Writer
	left int64
}

func (l *limitedWriter) Write(p []byte) (int, error) {
	if int64(len(p)) > l.left {
		return 0, errTooLong
	}
	n, err := l.w.Write(p)
	l.left -= int64(n)
	return n, err
}

func checkSum(h hash.Hash, n int64, d Digest) error {
	if n > d.Size {
		return status.Errorf(codes.InvalidArgument, "blob %s: got more than the declared %d bytes", d, d.Size)
	}
	if n < d.Size {
		return status.Errorf(codes.InvalidArgument, "blob %s: got %d of the declared %d bytes", d, n, d.Size)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != d.Hash {
		return status.Errorf(codes.InvalidArgument, "blob %s: data hashes to %s", d, got)
	}
	return nil
}

// VerifyingReader hashes what is read through it and, at EOF, fails with DATA_LOSS
// (after calling onCorrupt) if the bytes were not blob d. The hashing of any skipped
// prefix is the caller's job: prefix is added to the hash first.
type VerifyingReader struct {
	r         io.Reader
	c         io.Closer
	d         Digest
	h         hash.Hash
	n         int64
	onCorrupt func()
	err       error
}

// NewVerifyingReader wraps rc, whose first byte is at offset off of blob d; h already
// holds the hash of bytes [0, off).
func NewVerifyingReader(rc io.ReadCloser, d Digest, h hash.Hash, off int64, onCorrupt func()) *VerifyingReader {
	if h == nil {
		h = sha256.New()
	}
	return &VerifyingReader{r: rc, c: rc, d: d, h: h, n: off, onCorrupt: onCorrupt}
}

// Read implements io.Reader.
func (v *VerifyingReader) Read(p []byte) (int, error) {
	if v.err != nil {
		return 0, v.err
	}
	n, err := v.r.Read(p)
	v.h.Write(p[:n])
	v.n += int64(n)
	if v.n > v.d.Size {
		v.err = v.corrupt("blob %s is longer than its digest says", v.d)
		return 0, v.err
	}
	if errors.Is(err, io.EOF) {
		if v.n != v.d.Size || hex.EncodeToString(v.h.Sum(nil)) != v.d.Hash {
			v.err = v.corrupt("blob %s failed verification on read and was removed", v.d)
			return n, v.err
		}
		v.err = io.EOF
	}
	return n, err
}

func (v *VerifyingReader) corrupt(format string, args ...any) error {
	if v.onCorrupt != nil {
		v.onCorrupt()
	}
	return status.Errorf(codes.DataLoss, format, args...)
}

// Close implements io.Closer.
func (v *VerifyingReader) Close() error { return v.c.Close() }
