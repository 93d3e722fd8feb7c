package reapi

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/klauspost/compress/zstd"
	"google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const (
	// readChunk is the data size of one ReadResponse: just under 1 MiB, so that the
	// marshalled message fits gRPC's largest pooled buffer (1 MiB; a larger message
	// gets a fresh, zeroed allocation every time).
	readChunk = 1<<20 - 1<<10
	// uploadIdle is how long an interrupted upload waits to be resumed before it is dropped.
	uploadIdle = 5 * time.Minute
	// maxUploads bounds uploads in progress (attached or waiting to resume).
	maxUploads = 4096
	// maxZstdWindow bounds the memory a client's zstd stream can make the server use.
	maxZstdWindow = 64 << 20
)

// byteStream implements google.bytestream.ByteStream over the CAS, with resumable
// uploads: each upload pipes its bytes into one cache Put running in the background,
// so an upload whose stream breaks can continue on a new stream from committed_size.
type byteStream struct {
	bytestream.UnimplementedByteStreamServer
	cas cache.BlobStore
	log *slog.Logger
	now func() time.Time

	mu      sync.Mutex
	uploads map[string]*upload // by full resource name
	stop    chan struct{}
	stopped sync.Once
}

// upload is one blob being written, possibly across several Write streams.
type upload struct {
	name       string
	res        resource
	pw         *io.PipeWriter
	committed  int64 // bytes accepted: compressed bytes for compressed uploads
	attached   bool  // a stream is writing it now
	lastActive time.Time
	done       chan struct{} // closed when the Put has returned
	err        error         // the Put's result, valid after done
}

func newByteStream(cas cache.BlobStore, log *slog.Logger) *byteStream {
	b := &byteStream{cas: cas, log: log, now: time.Now, uploads: map[string]*upload{}, stop: make(chan struct{})}
	go b.expire()
	return b
}

func (b *byteStream) close() { b.stopped.Do(func() { close(b.stop) }) }

// expire drops uploads nobody resumed within uploadIdle.
func (b *byteStream) expire() {
	t := time.NewTicker(uploadIdle / 10)
	defer t.Stop()
	for {
		select {
		case <-b.stop:
			b.mu.Lock()
			for _, u := range b.uploads {
				u.pw.CloseWithError(status.Error(codes.Unavailable, "server shutting down"))
			}
			b.mu.Unlock()
			return
		case <-t.C:
		}
		cutoff := b.now().Add(-uploadIdle)
		b.mu.Lock()
		for name, u := range b.uploads {
			if !u.attached && u.lastActive.Before(cutoff) {
				u.pw.CloseWithError(status.Error(codes.Aborted, "upload abandoned"))
				delete(b.uploads, name)
			}
		}
		b.mu.Unlock()
	}
}

func (b *byteStream) present(ctx context.Context, d cache.Digest) bool {
	m, err := b.cas.FindMissing(ctx, []cache.Digest{d})
	return err == nil && len(m) == 0
}

// Read streams a blob, or its zstd compression, from read_offset.
func (b *byteStream) Read(req *bytestream.ReadRequest, stream bytestream.ByteStream_ReadServer) error {
	ctx := stream.Context()
	res, err := parseReadResource(req.GetResourceName())
	if err != nil {
		return err
	}
	d := res.digest
	off, limit := req.GetReadOffset(), req.GetReadLimit()
	if off < 0 || off > d.Size {
		return status.Errorf(codes.OutOfRange, "read_offset %d outside blob %s", off, d)
	}
	if limit < 0 {
		return status.Errorf(codes.InvalidArgument, "negative read_limit %d", limit)
	}
	if res.compressor != "" && limit != 0 {
		return status.Error(codes.InvalidArgument, "read_limit must be 0 for compressed-blobs reads")
	}
	r, err := b.cas.Get(ctx, d, off)
	if err != nil {
		return err
	}
	defer r.Close()
	if res.compressor == "zstd" {
		return b.readZstd(r, stream)
	}
	remaining := d.Size - off
	if limit > 0 && limit < remaining {
		remaining = limit
	}
	bp := readBufs.Get().(*[]byte)
	defer readBufs.Put(bp)
	buf := (*bp)[:min(readChunk, max(remaining, 1))]
	for remaining > 0 {
		n, err := io.ReadFull(r, buf[:min(int64(len(buf)), remaining)])
		if n > 0 {
			if err := stream.Send(&bytestream.ReadResponse{Data: buf[:n]}); err != nil {
				return err
			}
			remaining -= int64(n)
		}
		if err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
				return status.Errorf(codes.DataLoss, "blob %s ended early", d)
			}
			return err
		}
	}
	if limit == 0 || limit >= d.Size-off {
		// Read to the end so the store verifies the whole blob: a damaged blob ends the
		// stream with DATA_LOSS instead of a silent OK.
		var one [1]byte
		if _, err := r.Read(one[:]); err != nil && !errors.Is(err, io.EOF) {
			return err
		}
	}
	return nil
}

func (b *byteStream) readZstd(r io.Reader, stream bytestream.ByteStream_ReadServer) error {
	cw := &chunkSender{stream: stream, buf: make([]byte, 0, readChunk)}
	enc, err := zstd.NewWriter(cw, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1), zstd.WithLowerEncoderMem(true))
	if err != nil {
		return status.Errorf(codes.Internal, "zstd: %v", err)
	}
	if _, err := io.Copy(enc, r); err != nil {
		enc.Close()
		return err
	}
	if err := enc.Close(); err != nil {
		return err
	}
	return cw.flush()
}

// readBufs holds the buffers Read sends from (one readChunk each): a fresh one per
// read would be allocated and zeroed every time.
var readBufs = sync.Pool{New: func() any { b := make([]byte, readChunk); return &b }}

// chunkSender turns writes into ReadResponses of up to readChunk bytes.
type chunkSender struct {
	stream bytestream.ByteStream_ReadServer
	buf    []byte
}

func (c *chunkSender) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		k := min(cap(c.buf)-len(c.buf), len(p))
		c.buf = append(c.buf, p[:k]...)
		p = p[k:]
		if len(c.buf) == cap(c.buf) {
			if err := c.flush(); err != nil {
				return 0, err
			}
		}
	}
	return n, nil
}

func (c *chunkSender) flush() error {
	if len(c.buf) == 0 {
		return nil
	}
	err := c.stream.Send(&bytestream.ReadResponse{Data: c.buf})
	c.buf = c.buf[:0]
	return err
}

// Write stores a blob sent in one or more WriteRequests, resuming an interrupted
// upload when write_offset equals its committed size.
func (b *byteStream) Write(stream bytestream.ByteStream_WriteServer) error {
	ctx := stream.Context()
	req, err := stream.Recv()
	if err != nil {
		if errors.Is(err, io.EOF) {
			return status.Error(codes.InvalidArgument, "empty Write stream")
		}
		return err
	}
	name := req.GetResourceName()
	res, err := parseWriteResource(name)
	if err != nil {
		return err
	}
	if req.GetWriteOffset() < 0 {
		return status.Errorf(codes.InvalidArgument, "negative write_offset %d", req.GetWriteOffset())
	}
	if b.present(ctx, res.digest) {
		// Someone already stored it: end at once, as the spec asks.
		return stream.SendAndClose(&bytestream.WriteResponse{CommittedSize: b.fullSize(res)})
	}
	u, err := b.attach(name, res, req.GetWriteOffset())
	if err != nil {
		return err
	}
	defer b.detach(u)
	for {
		if req.GetResourceName() != "" && req.GetResourceName() != name {
			b.abort(u, nil)
			return status.Errorf(codes.InvalidArgument, "resource_name changed within one Write stream")
		}
		if req.GetWriteOffset() != u.committed {
			return status.Errorf(codes.InvalidArgument, "write_offset %d, but %d bytes of %s are committed", req.GetWriteOffset(), u.committed, name)
		}
		data := req.GetData()
		if res.compressor == "" && u.committed+int64(len(data)) > res.digest.Size {
			b.abort(u, nil)
			return status.Errorf(codes.InvalidArgument, "blob %s: got more than the declared %d bytes", res.digest, res.digest.Size)
		}
		if res.compressor != "" && u.committed+int64(len(data)) > maxCompressedSize(res.digest.Size) {
			b.abort(u, nil)
			return status.Errorf(codes.InvalidArgument, "blob %s: more compressed bytes than zstd can take to encode %d bytes", res.digest, res.digest.Size)
		}
		if len(data) > 0 {
			if _, err := u.pw.Write(data); err != nil {
				// The Put gave up (bad data, or it was aborted): report its error.
				<-u.done
				b.remove(u)
				return putError(u.err, err)
			}
			b.mu.Lock()
			u.committed += int64(len(data))
			u.lastActive = b.now()
			b.mu.Unlock()
		}
		if req.GetFinishWrite() {
			u.pw.Close()
			<-u.done
			b.remove(u)
			if u.err != nil {
				return u.err
			}
			return stream.SendAndClose(&bytestream.WriteResponse{CommittedSize: u.committed})
		}
		req, err = stream.Recv()
		if errors.Is(err, io.EOF) {
			return status.Errorf(codes.InvalidArgument, "Write stream for %s closed at byte %d without finish_write; resume from write_offset %d", name, u.committed, u.committed)
		}
		if err != nil {
			return err // interrupted: the upload waits to be resumed
		}
	}
}

// maxCompressedSize bounds the zstd encoding of n bytes (zstd's worst case is a few
// bytes per 128 KiB block plus frame headers), so a client cannot stream unbounded
// compressed data (e.g. endless empty frames) at one upload.
func maxCompressedSize(n int64) int64 { return n + n/64 + 64<<10 }

func putError(putErr, pipeErr error) error {
	if putErr != nil {
		return putErr
	}
	return status.Errorf(codes.Internal, "upload failed: %v", pipeErr)
}

// fullSize is the committed_size the spec asks for when a blob is already present.
func (b *byteStream) fullSize(res resource) int64 {
	if res.compressor != "" {
		return -1
	}
	return res.digest.Size
}

// attach finds or starts the upload for name at offset and marks it as being written.
func (b *byteStream) attach(name string, res resource, offset int64) (*upload, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	u := b.uploads[name]
	if u != nil && u.attached {
		return nil, status.Errorf(codes.Aborted, "%s is being written by another stream", name)
	}
	if offset != 0 {
		if u == nil {
			return nil, status.Errorf(codes.InvalidArgument, "write_offset %d for %s, but no upload is in progress (QueryWriteStatus gives the committed size)", offset, name)
		}
		if u.committed != offset {
			return nil, status.Errorf(codes.InvalidArgument, "write_offset %d for %s, but %d bytes are committed", offset, name, u.committed)
		}
	} else {
		if u != nil {
			// A restart from zero replaces the interrupted upload.
			u.pw.CloseWithError(status.Error(codes.Aborted, "upload restarted"))
			delete(b.uploads, name)
		}
		if len(b.uploads) >= maxUploads {
			return nil, status.Errorf(codes.ResourceExhausted, "too many uploads in progress (%d)", maxUploads)
		}
		u = b.start(name, res)
		b.uploads[name] = u
	}
	u.attached = true
	u.lastActive = b.now()
	return u, nil
}

// start launches the background Put that consumes an upload's pipe.
func (b *byteStream) start(name string, res resource) *upload {
	pr, pw := io.Pipe()
	u := &upload{name: name, res: res, pw: pw, done: make(chan struct{})}
	go func() {
		defer close(u.done)
		var body io.Reader = pr
		if res.compressor == "zstd" {
			dec, err := zstd.NewReader(pr, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(maxZstdWindow))
			if err != nil {
				u.err = status.Errorf(codes.Internal, "zstd: %v", err)
				pr.CloseWithError(u.err)
				return
			}
			defer dec.Close()
			body = zstdErrors{dec, res.digest}
		}
		// The Put outlives any one stream; expiry or abort ends it through the pipe.
		u.err = b.cas.Put(context.Background(), res.digest, body)
		if u.err != nil {
			pr.CloseWithError(u.err)
			b.log.Debug("upload refused", "resource", name, "err", u.err)
			return
		}
		// Drain anything sent after the blob was complete, so a writer is never stuck.
		io.Copy(io.Discard, pr)
	}()
	return u
}

func (b *byteStream) detach(u *upload) {
	b.mu.Lock()
	u.attached = false
	u.lastActive = b.now()
	b.mu.Unlock()
}

func (b *byteStream) remove(u *upload) {
	b.mu.Lock()
	if b.uploads[u.name] == u {
		delete(b.uploads, u.name)
	}
	b.mu.Unlock()
}

func (b *byteStream) abort(u *upload, err error) {
	if err == nil {
		err = status.Error(codes.Aborted, "upload aborted")
	}
	u.pw.CloseWithError(err)
	<-u.done
	b.remove(u)
}

// QueryWriteStatus reports how much of an upload is committed, or that the blob is complete.
func (b *byteStream) QueryWriteStatus(ctx context.Context, req *bytestream.QueryWriteStatusRequest) (*bytestream.QueryWriteStatusResponse, error) {
	res, err := parseWriteResource(req.GetResourceName())
	if err != nil {
		return nil, err
	}
	b.mu.Lock()
	u := b.uploads[req.GetResourceName()]
	var committed int64
	if u != nil {
		committed = u.committed
	}
	b.mu.Unlock()
	if b.present(ctx, res.digest) {
		return &bytestream.QueryWriteStatusResponse{CommittedSize: b.fullSize(res), Complete: true}, nil
	}
	if u == nil {
		return nil, status.Errorf(codes.NotFound, "no upload in progress for %s", req.GetResourceName())
	}
	return &bytestream.QueryWriteStatusResponse{CommittedSize: committed}, nil
}
