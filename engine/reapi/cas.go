package reapi

import (
	"bytes"
	"context"
	"io"
	"sync"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/klauspost/compress/zstd"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// casServer implements ContentAddressableStorage; the chunking methods added in REAPI
// 2.4 (SplitBlob, SpliceBlob, ...) answer UNIMPLEMENTED, as kiln does not advertise them.
type casServer struct {
	repb.UnimplementedContentAddressableStorageServer
	s *Server
}

func digests(ps []*repb.Digest) ([]cache.Digest, error) {
	ds := make([]cache.Digest, len(ps))
	for i, p := range ps {
		d, err := cache.FromProto(p)
		if err != nil {
			return nil, err
		}
		ds[i] = d
	}
	return ds, nil
}

func (c casServer) FindMissingBlobs(ctx context.Context, req *repb.FindMissingBlobsRequest) (*repb.FindMissingBlobsResponse, error) {
	if err := CheckInstance(req.GetInstanceName()); err != nil {
		return nil, err
	}
	if err := checkDigestFunction(req.GetDigestFunction()); err != nil {
		return nil, err
	}
	ds, err := digests(req.GetBlobDigests())
	if err != nil {
		return nil, err
	}
	missing, err := c.s.cas.FindMissing(ctx, ds)
	if err != nil {
		return nil, err
	}
	resp := &repb.FindMissingBlobsResponse{MissingBlobDigests: make([]*repb.Digest, len(missing))}
	for i, d := range missing {
		resp.MissingBlobDigests[i] = d.Proto()
	}
	return resp, nil
}

func statusProto(err error) *rpcstatus.Status {
	if err == nil {
		return &rpcstatus.Status{}
	}
	return status.Convert(err).Proto()
}

// maxBatchEntries bounds the blobs of one batch request: even empty blobs cost a
// response each.
const maxBatchEntries = 10000

// checkBatch refuses a batch whose declared sizes total more than MaxBatchSize. Sizes
// are summed only once every digest is known to be well formed: a negative size must
// not offset the others.
func checkBatch(ps []*repb.Digest) error {
	if len(ps) > maxBatchEntries {
		return status.Errorf(codes.InvalidArgument, "batch of %d blobs is over the limit of %d per request", len(ps), maxBatchEntries)
	}
	var total int64
	for _, p := range ps {
		if p.GetSizeBytes() < 0 {
			return status.Errorf(codes.InvalidArgument, "digest %s/%d: negative size", p.GetHash(), p.GetSizeBytes())
		}
		total += p.GetSizeBytes()
		if total > MaxBatchSize {
			return status.Errorf(codes.InvalidArgument, "batch of more than %d bytes is over max_batch_total_size_bytes; use ByteStream for large blobs", MaxBatchSize)
		}
	}
	return nil
}

// batchParallel bounds the blobs of one BatchUpdateBlobs stored at once.
const batchParallel = 16

func (c casServer) BatchUpdateBlobs(ctx context.Context, req *repb.BatchUpdateBlobsRequest) (*repb.BatchUpdateBlobsResponse, error) {
	if err := CheckInstance(req.GetInstanceName()); err != nil {
		return nil, err
	}
	if err := checkDigestFunction(req.GetDigestFunction()); err != nil {
		return nil, err
	}
	ps := make([]*repb.Digest, len(req.GetRequests()))
	for i, r := range req.GetRequests() {
		ps[i] = r.GetDigest()
	}
	if err := checkBatch(ps); err != nil {
		return nil, err
	}
	// The request is held until every blob is stored, and one zstd decoder at a time.
	cost := int64(proto.Size(req))
	for _, r := range req.GetRequests() {
		if r.GetCompressor() == repb.Compressor_ZSTD {
			cost += zstdDecoderFixed + zstdWindowCost(batchZstdMemory)
			break
		}
	}
	client := ClientID(ctx)
	mem, err := c.s.opts.Memory.Charge(client, "BatchUpdateBlobs", cost)
	if err != nil {
		return nil, err
	}
	defer mem.Release()
	release, err := c.s.opts.Work.Acquire(ctx, client)
	if err != nil {
		return nil, err
	}
	defer release()
	resp := &repb.BatchUpdateBlobsResponse{Responses: make([]*repb.BatchUpdateBlobsResponse_Response, len(req.GetRequests()))}
	// A few blobs at once: a store whose writes wait on the network (shared storage)
	// would otherwise take one round trip per blob in turn. Each of the few storers
	// takes every batchParallel-th blob, and its CPU time, metered once for them all
	// (a meter costs a few syscalls: as much as storing a small blob), is the client's
	// work too.
	reqs := req.GetRequests()
	var wg sync.WaitGroup
	for k := range min(batchParallel, len(reqs)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.s.opts.Work.Also(client, func() {
				for i := k; i < len(reqs); i += batchParallel {
					err := c.updateOne(ctx, reqs[i])
					resp.Responses[i] = &repb.BatchUpdateBlobsResponse_Response{Digest: reqs[i].GetDigest(), Status: statusProto(err)}
				}
			})
		}()
	}
	wg.Wait()
	return resp, nil
}

func (c casServer) updateOne(ctx context.Context, r *repb.BatchUpdateBlobsRequest_Request) error {
	d, err := cache.FromProto(r.GetDigest())
	if err != nil {
		return err
	}
	var body io.Reader = bytes.NewReader(r.GetData())
	switch r.GetCompressor() {
	case repb.Compressor_IDENTITY:
	case repb.Compressor_ZSTD:
		dec, err := zstd.NewReader(body, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(batchZstdMemory))
		if err != nil {
			return status.Errorf(codes.InvalidArgument, "blob %s: bad zstd data: %v", d, err)
		}
		defer dec.Close()
		body = zstdErrors{dec, d}
	default:
		return status.Errorf(codes.InvalidArgument, "blob %s: unsupported compressor %v", d, r.GetCompressor())
	}
	return c.s.cas.Put(ctx, d, body)
}

// batchZstdMemory bounds a batch entry's decompressed size, and so its zstd window.
const batchZstdMemory = MaxBatchSize + 1<<20

// zstdErrors reports a corrupt compressed stream as INVALID_ARGUMENT (the client's
// fault), not as an internal error.
type zstdErrors struct {
	r io.Reader
	d cache.Digest
}

func (z zstdErrors) Read(p []byte) (int, error) {
	n, err := z.r.Read(p)
	if err != nil && err != io.EOF {
		if _, ok := status.FromError(err); !ok {
			err = status.Errorf(codes.InvalidArgument, "blob %s: bad zstd data: %v", z.d, err)
		}
	}
	return n, err
}

func (c casServer) BatchReadBlobs(ctx context.Context, req *repb.BatchReadBlobsRequest) (*repb.BatchReadBlobsResponse, error) {
	if err := CheckInstance(req.GetInstanceName()); err != nil {
		return nil, err
	}
	if err := checkDigestFunction(req.GetDigestFunction()); err != nil {
		return nil, err
	}
	if err := checkBatch(req.GetDigests()); err != nil {
		return nil, err
	}
	// The blobs are held twice: read, and in the marshalled response.
	var cost int64
	for _, p := range req.GetDigests() {
		cost += 2 * p.GetSizeBytes()
	}
	mem, err := c.s.opts.Memory.Charge(ClientID(ctx), "BatchReadBlobs", cost)
	if err != nil {
		return nil, err
	}
	defer mem.Release()
	resp := &repb.BatchReadBlobsResponse{Responses: make([]*repb.BatchReadBlobsResponse_Response, len(req.GetDigests()))}
	for i, p := range req.GetDigests() {
		out := &repb.BatchReadBlobsResponse_Response{Digest: p, Compressor: repb.Compressor_IDENTITY}
		d, err := cache.FromProto(p)
		if err == nil {
			out.Data, err = cache.ReadAll(ctx, c.s.cas, d, MaxBatchSize)
			if status.Code(err) == codes.DataLoss {
				err = status.Errorf(codes.NotFound, "blob %s not found (it failed verification and was removed)", d)
			}
		}
		out.Status = statusProto(err)
		resp.Responses[i] = out
	}
	return resp, nil
}
