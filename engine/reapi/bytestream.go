package reapi

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/limits"
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
	// uploadIdle is how long an interrupted upload waits to be resumed before it is
	// dropped; it is dropped sooner when another upload needs its memory or slot.
	uploadIdle = time.Minute
	// DefaultClientUploads and DefaultMaxUploads bound uploads in progress (attached or
	// waiting to resume) per client and in all; each holds a temp file and a buffer.
	DefaultClientUploads = 512
	DefaultMaxUploads    = 4096
	// maxZstdWindow bounds the window of a client's zstd frames (the decoder allocates it).
	maxZstdWindow = 64 << 20
	// uploadCost is what an upload holds besides its data and decoder: the store's copy
	// buffer, the pipe and the bookkeeping.
	uploadCost = 320 << 10
	// zstdEncoderCost is what a compressed read's encoder holds (fastest level, low
	// memory mode: about 3 MiB measured).
	zstdEncoderCost = 4 << 20
)

// byteStream implements google.bytestream.ByteStream over the CAS, with resumable
// uploads: each upload hands its messages to one cache Put running in the background,
// so an upload whose stream breaks can continue on a new stream from committed_size.
// What uploads and reads hold is charged to the memory budget, and each client may
// have a bounded number of uploads in progress; uploads waiting to be resumed are the
// first to go when memory or slots are short.
type byteStream struct {
	bytestream.UnimplementedByteStreamServer
	cas   cache.BlobStore
	log   *slog.Logger
	now   func() time.Time
	mem   *limits.Budget
	slots *limits.Slots
	space *limits.Budget // declared sizes of uploads in progress
	work  *limits.Work   // CPU-heavy work per client
	// maxWindow bounds the window of a client's zstd frames (maxZstdWindow).
	maxWindow int64

	mu      sync.Mutex
	uploads map[string]*upload // by full resource name
	stop    chan struct{}
	stopped sync.Once
}

// upload is one blob being written, possibly across several Write streams.
type upload struct {
	name       string
	res        resource
	client     string   // who started it: its memory and slot are that client's
	pipe       *handoff // the stream's messages to the Put
	committed  int64    // bytes accepted: compressed bytes for compressed uploads
	attached   bool     // a stream is writing it now
	lastActive time.Time
	done       chan struct{} // closed when the Put has returned and everything is released
	err        error         // the Put's result, valid after done
	mem        *limits.Charge
	space      *limits.Charge
	slot       func()
	// charging is set while the upload's decoder waits for memory: such an upload is
	// never reclaimed to make room (two uploads reclaiming each other would deadlock).
	charging atomic.Bool
	// ctx is the Put's; cancel ends it, also while it waits for the client's work token.
	ctx    context.Context
	cancel context.CancelFunc
}

// stop aborts the upload: its Put ends with err and stores nothing.
func (u *upload) stop(err error) {
	u.cancel()
	u.pipe.CloseWithError(err)
}

func newByteStream(cas cache.BlobStore, log *slog.Logger, mem *limits.Budget, clientUploads, maxUploads int) *byteStream {
	b := &byteStream{cas: cas, log: log, now: time.Now, mem: mem, maxWindow: maxZstdWindow, uploads: map[string]*upload{}, stop: make(chan struct{})}
	b.slots = limits.NewSlots(mem, "uploads", "uploads", "--client-max-uploads", clientUploads, maxUploads)
	b.slots.OnShortage(b.reclaim)
	mem.OnShortage(b.reclaim)
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
				u.stop(status.Error(codes.Unavailable, "server shutting down"))
			}
			b.mu.Unlock()
			return
		case <-t.C:
		}
		cutoff := b.now().Add(-uploadIdle)
		b.mu.Lock()
		for name, u := range b.uploads {
			if !u.attached && u.lastActive.Before(cutoff) {
				u.stop(status.Error(codes.Aborted, "upload abandoned"))
				delete(b.uploads, name)
			}
		}
		b.mu.Unlock()
	}
}

// reclaim drops the upload that has waited longest to be resumed, client's own (or
// anyone's, for ""), to make room for another; it reports whether there was one.
func (b *byteStream) reclaim(client string) bool {
	b.mu.Lock()
	var victim *upload
	for _, u := range b.uploads {
		if u.attached || u.charging.Load() || (client != "" && u.client != client) {
			continue
		}
		if victim == nil || u.lastActive.Before(victim.lastActive) {
			victim = u
		}
	}
	if victim != nil {
		delete(b.uploads, victim.name)
	}
	b.mu.Unlock()
	if victim == nil {
		return false
	}
	b.log.Debug("dropped an interrupted upload to make room", "resource", victim.name, "client", victim.client)
	victim.stop(status.Error(codes.Aborted, "interrupted upload dropped to make room for others"))
	<-victim.done
	return true
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
	remaining := d.Size - off
	if limit > 0 && limit < remaining {
		remaining = limit
	}
	cost := min(readChunk, max(remaining, 1))
	if res.compressor == "zstd" {
		cost = readChunk + zstdEncoderCost
	}
	mem, err := b.mem.Charge(ClientID(ctx), "ByteStream.Read", cost)
	if err != nil {
		return err
	}
	defer mem.Release()
	r, err := b.cas.Get(ctx, d, off)
	if err != nil {
		return err
	}
	defer r.Close()
	if res.compressor == "zstd" {
		return b.readZstd(r, stream)
	}
	bp := readBufs.Get().(*[]byte)
	defer readBufs.Put(bp)
	buf := (*bp)[:cost]
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
	client := ClientID(ctx)
	u, err := b.attach(client, name, res, req.GetWriteOffset())
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
			// The message is held until the Put is through with it: it counts too.
			held, err := b.mem.Charge(client, "ByteStream.Write data", int64(len(data)))
			if err != nil {
				return err // the upload waits to be resumed (or is reclaimed)
			}
			if err := u.pipe.Give(data, held.Release); err != nil {
				// The Put gave up (bad data, no room, or it was aborted): report its error.
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
			// The stream must end with this message (the spec: anything sent after
			// finish_write is an error); only then is the blob committed.
			if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
				b.abort(u, nil)
				if err != nil {
					return err
				}
				return status.Errorf(codes.InvalidArgument, "Write stream for %s: a message after finish_write; nothing was stored", name)
			}
			u.pipe.Close()
			<-u.done
			b.remove(u)
			if u.err != nil {
				return u.err
			}
			return stream.SendAndClose(&bytestream.WriteResponse{CommittedSize: u.committed})
		}
		req, err = stream.Recv()
		if errors.Is(err, io.EOF) {
			// A clean end without finish_write is a client error, not an interruption:
			// nothing is kept for it.
			b.abort(u, nil)
			return status.Errorf(codes.InvalidArgument, "Write stream for %s closed at byte %d without finish_write; the upload was dropped, start again from write_offset 0", name, u.committed)
		}
		if err != nil {
			return err // interrupted: the upload waits to be resumed
		}
	}
}

// maxCompressedSize bounds the zstd encoding of n bytes (zstd's worst case is a few
// bytes per 128 KiB block plus frame headers), so a client cannot stream unbounded
// compressed data (e.g. endless empty frames) at one upload.
func maxCompressedSize(n int64) int64 {
	if n > math.MaxInt64/2 {
		return math.MaxInt64
	}
	return n + n/64 + 64<<10
}

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
// A new upload takes one of client's upload slots and its memory first.
func (b *byteStream) attach(client, name string, res resource, offset int64) (*upload, error) {
	if offset == 0 {
		return b.begin(client, name, res)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	u := b.uploads[name]
	if u == nil {
		return nil, status.Errorf(codes.InvalidArgument, "write_offset %d for %s, but no upload is in progress (QueryWriteStatus gives the committed size)", offset, name)
	}
	if u.attached {
		return nil, status.Errorf(codes.Aborted, "%s is being written by another stream", name)
	}
	if u.committed != offset {
		return nil, status.Errorf(codes.InvalidArgument, "write_offset %d for %s, but %d bytes are committed", offset, name, u.committed)
	}
	u.attached = true
	u.lastActive = b.now()
	return u, nil
}

// begin starts a new upload of name, replacing an interrupted one of that name.
func (b *byteStream) begin(client, name string, res resource) (*upload, error) {
	slot, err := b.slots.Acquire(client)
	if err != nil {
		return nil, err
	}
	cost := int64(uploadCost)
	if res.compressor != "" {
		cost += zstdDecoderFixed
	}
	mem, err := b.mem.Charge(client, "a ByteStream upload", cost)
	if err != nil {
		slot()
		return nil, err
	}
	space, err := b.space.Charge(client, "an upload of blob "+res.digest.String(), res.digest.Size)
	if err != nil {
		mem.Release()
		slot()
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	u := &upload{name: name, res: res, client: client, pipe: newHandoff(), done: make(chan struct{}), mem: mem, space: space, slot: slot,
		attached: true, lastActive: b.now(), ctx: ctx, cancel: cancel}
	b.mu.Lock()
	old := b.uploads[name]
	if old != nil && old.attached {
		b.mu.Unlock()
		cancel()
		space.Release()
		mem.Release()
		slot()
		return nil, status.Errorf(codes.Aborted, "%s is being written by another stream", name)
	}
	b.uploads[name] = u
	b.mu.Unlock()
	if old != nil {
		// A restart from zero replaces the interrupted upload.
		old.stop(status.Error(codes.Aborted, "upload restarted"))
	}
	b.start(u)
	return u, nil
}

// start launches the background Put that consumes an upload's pipe; when it returns,
// the upload's memory and slot are released.
func (b *byteStream) start(u *upload) {
	go func() {
		defer close(u.done)
		defer u.cancel()
		defer u.slot()
		defer u.mem.Release()
		defer u.space.Release()
		// Decompressing, hashing and writing what arrives is the client's work.
		in := &limits.WorkReader{R: u.pipe, W: b.work, Client: u.client, Ctx: u.ctx}
		defer in.Done()
		var body io.Reader = in
		var guard *windowGuard
		if u.res.compressor == "zstd" {
			var held int64
			guard = newWindowGuard(in, u.res.digest, b.maxWindow, func(cost int64) error {
				u.charging.Store(true)
				defer u.charging.Store(false)
				if err := u.mem.Grow(cost - held); err != nil {
					return err
				}
				held = cost
				return nil
			})
			dec, err := zstd.NewReader(guard, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(uint64(b.maxWindow)), zstd.WithDecoderLowmem(true))
			if err != nil {
				u.err = status.Errorf(codes.Internal, "zstd: %v", err)
				u.pipe.CloseRead(u.err)
				return
			}
			defer dec.Close()
			body = zstdErrors{dec, u.res.digest}
		}
		// The Put outlives any one stream; expiry or abort ends it (stop).
		u.err = b.cas.Put(u.ctx, u.res.digest, body)
		if u.err != nil && guard != nil && guard.err != nil {
			u.err = guard.err // the decoder may have wrapped it
		}
		if u.err != nil {
			u.pipe.CloseRead(u.err)
			b.log.Debug("upload refused", "resource", u.name, "client", u.client, "err", u.err)
			return
		}
		// Drain anything sent after the blob was complete, so a writer is never stuck.
		io.Copy(io.Discard, u.pipe)
	}()
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
	u.stop(err)
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
