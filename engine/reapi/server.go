// Package reapi serves the Remote Execution API v2 storage services (Capabilities,
// ContentAddressableStorage, ByteStream, ActionCache) over a cache.BlobStore and a
// cache.ActionCache.
package reapi

import (
	"log/slog"
	"strings"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/limits"
	"google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// MaxBatchSize is the advertised max_batch_total_size_bytes: the sum of blob sizes one
// BatchUpdateBlobs or BatchReadBlobs may carry. gRPC messages may be a little larger.
const MaxBatchSize = 4 << 20

// MaxMessageSize is the gRPC receive limit the server must be created with: room for
// batches somewhat over MaxBatchSize, so they get a clear INVALID_ARGUMENT.
const MaxMessageSize = 2*MaxBatchSize + 1<<20

// Options configures the storage services.
type Options struct {
	// AllowClientACWrites lets clients call UpdateActionResult. Cache-only deployments
	// (Bazel with --remote_cache) need it; executor deployments must not allow it, or any
	// client could plant a result for an action it never ran.
	AllowClientACWrites bool
	// InlineLimit bounds the bytes GetActionResult inlines when a client asks for it.
	InlineLimit int64
	// Logger receives request-level events.
	Logger *slog.Logger
	// ExecutionCapabilities, when set, is advertised (the engine sets it).
	ExecutionCapabilities *repb.ExecutionCapabilities
	// Memory is the server's memory budget, which uploads, reads and tree walks are
	// charged to; nil bounds nothing.
	Memory *limits.Budget
	// StoreSpace bounds the declared sizes of uploads in progress, in all and per
	// client (limits.Budget.StoreSpace); nil bounds nothing.
	StoreSpace *limits.Budget
	// ClientUploads and MaxUploads bound the ByteStream uploads in progress per client
	// and in all; 0 means DefaultClientUploads and DefaultMaxUploads.
	ClientUploads, MaxUploads int
	// ClientTrees bounds the GetTree calls one client may have in progress; 0 means
	// DefaultClientTrees.
	ClientTrees int
	// Work bounds the CPU-heavy work done for one client at a time (decompressing and
	// hashing uploads, parsing directories); nil bounds nothing.
	Work *limits.Work
}

// Server implements the REAPI storage services.
type Server struct {
	cas  cache.BlobStore
	ac   cache.ActionCache
	opts Options
	log  *slog.Logger
	bs   *byteStream
	// trees keeps GetTree walks between pages.
	trees treeCursors
	// treeSlots bounds the GetTree calls in progress per client.
	treeSlots *limits.Slots
}

// New returns the services over cas and ac. cas should already make the empty blob
// present (cache.WithEmptyBlob) and ac check completeness (cache.WithCompletenessCheck).
func New(cas cache.BlobStore, ac cache.ActionCache, opts Options) *Server {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.InlineLimit == 0 {
		opts.InlineLimit = 1 << 20
	}
	if opts.ClientUploads <= 0 {
		opts.ClientUploads = DefaultClientUploads
	}
	if opts.MaxUploads <= 0 {
		opts.MaxUploads = DefaultMaxUploads
	}
	if opts.ClientTrees <= 0 {
		opts.ClientTrees = DefaultClientTrees
	}
	s := &Server{cas: cas, ac: ac, opts: opts, log: opts.Logger}
	s.treeSlots = limits.NewSlots(opts.Memory, "trees", "GetTree calls", "--client-max-trees", opts.ClientTrees, 0)
	s.bs = newByteStream(cas, opts.Logger, opts.Memory, opts.ClientUploads, opts.MaxUploads)
	s.bs.space = opts.StoreSpace
	s.bs.work = opts.Work
	opts.StoreSpace.OnShortage(s.bs.reclaim)
	return s
}

// Register adds the services to g.
func (s *Server) Register(g *grpc.Server) {
	repb.RegisterCapabilitiesServer(g, capabilities{s})
	repb.RegisterContentAddressableStorageServer(g, casServer{s: s})
	repb.RegisterActionCacheServer(g, acServer{s})
	bytestream.RegisterByteStreamServer(g, s.bs)
}

// Close stops background work (expiry of abandoned uploads).
func (s *Server) Close() { s.bs.close() }

// checkDigestFunction refuses requests for any digest function but SHA-256.
func checkDigestFunction(f repb.DigestFunction_Value) error {
	if f != repb.DigestFunction_UNKNOWN && f != repb.DigestFunction_SHA256 {
		return status.Errorf(codes.InvalidArgument, "digest function %v is not supported; kiln serves SHA256", f)
	}
	return nil
}

// CheckInstance refuses instance names that could be confused with resource paths:
// empty, '.' or '..' segments, a leading slash, or a segment REAPI reserves.
func CheckInstance(name string) error {
	if name == "" {
		return nil
	}
	if strings.ContainsRune(name, 0) {
		return status.Errorf(codes.InvalidArgument, "bad instance name %q: contains NUL", trunc(name))
	}
	for _, seg := range strings.Split(name, "/") {
		if seg == "" || seg == "." || seg == ".." || reserved[seg] {
			return status.Errorf(codes.InvalidArgument, "bad instance name %q: empty, '.', '..' or reserved segment %q", trunc(name), seg)
		}
	}
	return nil
}
