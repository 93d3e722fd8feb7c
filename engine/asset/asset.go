// Package asset is kiln's Remote Asset API service (build.bazel.remote.asset.v1): it
// lets Bazel's --experimental_remote_downloader fetch external dependencies through
// kiln, which downloads only from allowlisted hosts, only content pinned by digest, and
// puts a download into the CAS only once it matches that digest.
//
// Fetch errors are returned as RPC errors, not in FetchBlobResponse.status: Bazel up to
// at least 6.x ignores that field and would report a confusing checksum error for an
// empty blob instead of kiln's message. The codes are those the spec lists for the
// response status: PERMISSION_DENIED (origin not allowed or not pinned), NOT_FOUND,
// ABORTED (the download does not match its digest), DEADLINE_EXCEEDED,
// RESOURCE_EXHAUSTED (larger than the size limit), UNAVAILABLE (origin failing).
//
// Push is refused with PERMISSION_DENIED: a pushed association is a client's claim, and
// kiln trusts no client's claim about what a URL holds.
package asset

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	remoteasset "github.com/bazelbuild/remote-apis/build/bazel/remote/asset/v1"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/lockfiles"
	"golang.org/x/sync/singleflight"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Qualifier names this server understands.
const (
	// QualifierChecksumSRI carries one or more Subresource Integrity values.
	QualifierChecksumSRI = "checksum.sri"
	// QualifierCanonicalID is Bazel's cache key hint; kiln keys by content, so it is
	// accepted and ignored.
	QualifierCanonicalID = "bazel.canonical_id"
)

// maxKnownSizes bounds the in-memory index from SHA-256 to blob size.
const maxKnownSizes = 1 << 17

// Server implements the Fetch and Push services of the Remote Asset API.
type Server struct {
	remoteasset.UnimplementedFetchServer
	remoteasset.UnimplementedPushServer

	cas    cache.BlobStore
	f      *lockfiles.Fetcher
	lock   *lockfiles.Lockfile
	log    *slog.Logger
	sizeOf func(hash string) (int64, bool)

	mu    sync.Mutex
	sizes map[string]int64 // SHA-256 hex -> size, of blobs this server fetched
	group singleflight.Group
}

// Option configures a Server.
type Option func(*Server)

// WithLockfile restricts the server to the URLs and digests pinned in l: any other URL
// is PERMISSION_DENIED, as is a request whose checksum differs from the pin. A pinned
// URL may then be fetched without a checksum qualifier (the pin supplies it).
func WithLockfile(l *lockfiles.Lockfile) Option { return func(s *Server) { s.lock = l } }

// WithLogger sets where fetches, refusals and mismatches are logged (URLs redacted).
func WithLogger(l *slog.Logger) Option { return func(s *Server) { s.log = l } }

// WithSizeLookup tells the server how to find the size of a stored blob from its
// SHA-256 alone (a checksum.sri qualifier carries no size), so a blob stored before
// this server started is served without a download (SizeFromBlobFiles asks the disk
// store). Without one, only sizes this server saw or a lockfile pins are known.
func WithSizeLookup(fn func(hash string) (int64, bool)) Option {
	return func(s *Server) { s.sizeOf = fn }
}

// BlobFiles is implemented by stores that keep each blob in a file named by its hash
// alone, such as *disk.Store.
type BlobFiles interface {
	BlobPath(cache.Digest) string
}

// SizeFromBlobFiles returns a size lookup for WithSizeLookup that reads the size of a
// blob's file. The size is only a hint: the CAS still verifies the blob when it is read.
func SizeFromBlobFiles(bf BlobFiles) func(hash string) (int64, bool) {
	return func(hash string) (int64, bool) {
		info, err := os.Stat(bf.BlobPath(cache.Digest{Hash: hash}))
		if err != nil || !info.Mode().IsRegular() {
			return 0, false
		}
		return info.Size(), true
	}
}

// NewServer returns a Remote Asset server that stores into cas and downloads with f
// (whose allowlist decides which hosts may be contacted; nil refuses every download).
func NewServer(cas cache.BlobStore, f *lockfiles.Fetcher, opts ...Option) *Server {
	s := &Server{cas: cas, f: f, sizes: map[string]int64{}}
	for _, o := range opts {
		o(s)
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.f == nil {
		s.f, _ = lockfiles.NewFetcher(lockfiles.FetcherOptions{Logger: s.log}) // empty allowlist: denies all
	}
	return s
}

// Register adds the Fetch and Push services to g (a *grpc.Server).
func (s *Server) Register(g grpc.ServiceRegistrar) {
	remoteasset.RegisterFetchServer(g, s)
	remoteasset.RegisterPushServer(g, s)
}

// candidate is one requested URL that policy allows, with what its content must match.
type candidate struct {
	url  string
	want []lockfiles.Checksum
	size int64 // 0 when unknown
}

// FetchBlob implements remoteasset.FetchServer.
func (s *Server) FetchBlob(ctx context.Context, req *remoteasset.FetchBlobRequest) (*remoteasset.FetchBlobResponse, error) {
	if len(req.GetUris()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "FetchBlob: no URI given")
	}
	if df := req.GetDigestFunction(); df != repb.DigestFunction_UNKNOWN && df != repb.DigestFunction_SHA256 {
		return nil, status.Errorf(codes.InvalidArgument, "FetchBlob: digest function %s is not supported (only SHA256)", df)
	}
	want, err := parseQualifiers(req.GetQualifiers())
	if err != nil {
		return nil, err
	}
	var timeout time.Duration
	if t := req.GetTimeout(); t != nil {
		if err := t.CheckValid(); err != nil || t.AsDuration() < 0 {
			return nil, status.Errorf(codes.InvalidArgument, "FetchBlob: bad timeout %v", t)
		}
		timeout = t.AsDuration()
	}

	cands, refusals := s.admit(req.GetUris(), want)
	if len(cands) == 0 {
		err := combine(refusals)
		s.log.Warn("asset fetch refused", "uris", redactAll(req.GetUris()), "err", err)
		return nil, err
	}

	// Content already in the CAS is served without any download.
	for _, c := range cands {
		if d, ok := s.presentDigest(ctx, c); ok {
			s.log.Info("asset served from the CAS", "uri", lockfiles.RedactURL(c.url), "digest", d.String())
			return response(c.url, d), nil
		}
	}

	var errs []error
	for _, c := range cands {
		res, err := s.download(ctx, c, timeout)
		if err == nil {
			s.remember(res.Digest)
			s.log.Info("asset fetched", "uri", lockfiles.RedactURL(c.url), "digest", res.Digest.String(), "attempts", res.Attempts)
			return response(c.url, res.Digest), nil
		}
		var mm *lockfiles.MismatchError
		if errors.As(err, &mm) {
			s.log.Error("asset does not match its digest; nothing cached",
				"uri", mm.URL, "want", mm.Want.String(), "got", mm.Got.String(), "want_bytes", mm.WantSize, "got_bytes", mm.GotSize)
			return nil, err
		}
		if ctx.Err() != nil {
			return nil, status.FromContextError(ctx.Err()).Err()
		}
		errs = append(errs, err)
	}
	errs = append(refusals, errs...)
	err = combine(errs)
	s.log.Warn("asset fetch failed", "uris", redactAll(req.GetUris()), "err", err)
	return nil, err
}

// admit applies the policy (scheme, host allowlist, lockfile) to each URL, in order.
func (s *Server) admit(uris []string, want []lockfiles.Checksum) ([]candidate, []error) {
	var cands []candidate
	var refusals []error
	for _, u := range uris {
		if err := s.f.Allowed(u); err != nil {
			refusals = append(refusals, err)
			continue
		}
		c := candidate{url: u, want: want}
		if s.lock != nil {
			dep, ok := s.lock.DependencyByURL(u)
			if !ok {
				refusals = append(refusals, status.Errorf(codes.PermissionDenied, "%s is not pinned in the lockfile", lockfiles.RedactURL(u)))
				continue
			}
			pins, err := dep.Checksums()
			if err != nil {
				refusals = append(refusals, status.Errorf(codes.PermissionDenied, "%s: lockfile entry %q: %v", lockfiles.RedactURL(u), dep.Name, status.Convert(err).Message()))
				continue
			}
			merged, err := lockfiles.MergeChecksums(pins, want)
			if err != nil {
				refusals = append(refusals, status.Errorf(codes.PermissionDenied, "%s is pinned in the lockfile (dependency %q) to other content than requested: %v", lockfiles.RedactURL(u), dep.Name, err))
				continue
			}
			c.want, c.size = merged, dep.Size
		}
		if len(c.want) == 0 {
			refusals = append(refusals, status.Errorf(codes.InvalidArgument,
				"%s: no %s qualifier: kiln serves only content verified by digest (give the http_archive a sha256 or integrity, or pin the URL in the lockfile)",
				lockfiles.RedactURL(u), QualifierChecksumSRI))
			continue
		}
		cands = append(cands, c)
	}
	return cands, refusals
}

// presentDigest returns c's digest if its SHA-256 and size are known and the CAS holds it.
func (s *Server) presentDigest(ctx context.Context, c candidate) (cache.Digest, bool) {
	sha, ok := lockfiles.FindAlgo(c.want, lockfiles.SHA256)
	if !ok {
		return cache.Digest{}, false // only a download can check a sha384/sha512
	}
	hash := sha.Hex()
	size := c.size
	if size <= 0 {
		var known bool
		if size, known = s.knownSize(hash); !known {
			return cache.Digest{}, false
		}
	}
	d := cache.Digest{Hash: hash, Size: size}
	if d.IsEmpty() {
		return d, true
	}
	missing, err := s.cas.FindMissing(ctx, []cache.Digest{d})
	if err != nil || len(missing) > 0 {
		return cache.Digest{}, false
	}
	return d, true
}

func (s *Server) knownSize(hash string) (int64, bool) {
	if hash == cache.EmptyDigest.Hash {
		return 0, true
	}
	s.mu.Lock()
	size, ok := s.sizes[hash]
	s.mu.Unlock()
	if ok {
		return size, true
	}
	if s.sizeOf != nil {
		return s.sizeOf(hash)
	}
	return 0, false
}

func (s *Server) remember(d cache.Digest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.sizes) >= maxKnownSizes {
		clear(s.sizes) // a cold index only costs a re-download, never a wrong answer
	}
	s.sizes[d.Hash] = d.Size
}

// download fetches one candidate; concurrent requests for the same URL and checksums
// share one download, which continues if the first requester goes away (as the spec
// asks) but is bounded by the fetcher's timeouts and the request's timeout.
func (s *Server) download(ctx context.Context, c candidate, timeout time.Duration) (*lockfiles.Result, error) {
	sris := make([]string, len(c.want))
	for i, w := range c.want {
		sris[i] = w.SRI()
	}
	sort.Strings(sris)
	key := c.url + "\x00" + strings.Join(sris, " ")
	ch := s.group.DoChan(key, func() (any, error) {
		dctx := context.WithoutCancel(ctx)
		if timeout > 0 {
			var cancel context.CancelFunc
			dctx, cancel = context.WithTimeout(dctx, timeout)
			defer cancel()
		}
		return s.f.Fetch(dctx, s.cas, lockfiles.Request{URLs: []string{c.url}, Want: c.want, Size: c.size})
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			return nil, r.Err
		}
		return r.Val.(*lockfiles.Result), nil
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
}

func response(uri string, d cache.Digest) *remoteasset.FetchBlobResponse {
	sha := lockfiles.Checksum{Algo: lockfiles.SHA256}
	if c, err := lockfiles.ParseSHA256Hex(d.Hash); err == nil {
		sha = c
	}
	return &remoteasset.FetchBlobResponse{
		Status:         &rpcstatus.Status{Code: int32(codes.OK)},
		Uri:            uri,
		Qualifiers:     []*remoteasset.Qualifier{{Name: QualifierChecksumSRI, Value: sha.SRI()}},
		BlobDigest:     d.Proto(),
		DigestFunction: repb.DigestFunction_SHA256,
	}
}

// parseQualifiers reads the qualifiers this server supports and refuses the others with
// INVALID_ARGUMENT and a BadRequest detail, as the spec asks.
func parseQualifiers(qs []*remoteasset.Qualifier) ([]lockfiles.Checksum, error) {
	var want []lockfiles.Checksum
	seen := map[string]bool{}
	var violations []*errdetails.BadRequest_FieldViolation
	var msgs []string
	for _, q := range qs {
		name := q.GetName()
		if seen[name] {
			return nil, status.Errorf(codes.InvalidArgument, "qualifier %q given twice", name)
		}
		seen[name] = true
		switch name {
		case QualifierChecksumSRI:
			cs, err := lockfiles.ParseIntegrity(q.GetValue())
			if err != nil {
				return nil, status.Errorf(codes.InvalidArgument, "qualifier %s: %s", name, status.Convert(err).Message())
			}
			merged, err := lockfiles.MergeChecksums(nil, cs)
			if err != nil {
				return nil, status.Errorf(codes.InvalidArgument, "qualifier %s: %v", name, err)
			}
			want = merged
		case QualifierCanonicalID:
		default:
			violations = append(violations, &errdetails.BadRequest_FieldViolation{Field: "qualifiers.name", Description: `"` + name + `" not supported`})
			msgs = append(msgs, name)
		}
	}
	if len(violations) > 0 {
		st := status.Newf(codes.InvalidArgument, "qualifiers not supported: %s (kiln supports %s and %s)", strings.Join(msgs, ", "), QualifierChecksumSRI, QualifierCanonicalID)
		if d, err := st.WithDetails(&errdetails.BadRequest{FieldViolations: violations}); err == nil {
			st = d
		}
		return nil, st.Err()
	}
	return want, nil
}

// combine returns the single error, or one listing every message under the code of the
// most telling one: a policy refusal first, then the last error.
func combine(errs []error) error {
	if len(errs) == 1 {
		return errs[0]
	}
	code := status.Code(errs[len(errs)-1])
	msgs := make([]string, len(errs))
	for i, e := range errs {
		msgs[i] = status.Convert(e).Message()
		if status.Code(e) == codes.PermissionDenied {
			code = codes.PermissionDenied
		}
	}
	return status.Errorf(code, "no URL could be served: %s", strings.Join(msgs, "; "))
}

func redactAll(uris []string) []string {
	out := make([]string, len(uris))
	for i, u := range uris {
		out[i] = lockfiles.RedactURL(u)
	}
	return out
}

// FetchDirectory implements remoteasset.FetchServer. Bazel's remote downloader uses only
// FetchBlob (http_archive downloads the archive as a blob and unpacks it itself), so
// kiln does not unpack archives on the server.
func (s *Server) FetchDirectory(context.Context, *remoteasset.FetchDirectoryRequest) (*remoteasset.FetchDirectoryResponse, error) {
	return nil, status.Error(codes.Unimplemented, "FetchDirectory is not supported by kiln: fetch the archive with FetchBlob and unpack it on the client (what Bazel's remote downloader does)")
}

// errNoPush is the answer to every Push call.
var errNoPush = status.Error(codes.PermissionDenied, "kiln does not accept pushed assets: a dependency enters the cache only by being fetched from an allowlisted origin and matching its pinned digest")

// PushBlob implements remoteasset.PushServer by refusing.
func (s *Server) PushBlob(context.Context, *remoteasset.PushBlobRequest) (*remoteasset.PushBlobResponse, error) {
	return nil, errNoPush
}

// PushDirectory implements remoteasset.PushServer by refusing.
func (s *Server) PushDirectory(context.Context, *remoteasset.PushDirectoryRequest) (*remoteasset.PushDirectoryResponse, error) {
	return nil, errNoPush
}

// Config is what `kiln serve` configures the service with.
type Config struct {
	// Lockfile, if set, is a loaded kiln.lock: only URLs and digests pinned in it are
	// served (WithLockfile).
	Lockfile *lockfiles.Lockfile
	// Allow is the host allowlist (--fetch-allow): "host" or "host:port" entries.
	Allow []string
	// Fetcher tunes downloads; its Allow and Logger are taken from this Config.
	Fetcher lockfiles.FetcherOptions
	// SizeOf, if set, is passed to WithSizeLookup.
	SizeOf func(hash string) (int64, bool)
	// Logger receives the service's events.
	Logger *slog.Logger
}

// New builds the service from cfg and sets up its fetcher.
func New(cas cache.BlobStore, cfg Config) (*Server, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	fo := cfg.Fetcher
	fo.Allow, fo.Logger = cfg.Allow, log
	f, err := lockfiles.NewFetcher(fo)
	if err != nil {
		return nil, err
	}
	opts := []Option{WithLogger(log)}
	if cfg.SizeOf != nil {
		opts = append(opts, WithSizeLookup(cfg.SizeOf))
	}
	pinned := -1
	if cfg.Lockfile != nil {
		opts = append(opts, WithLockfile(cfg.Lockfile))
		pinned = len(cfg.Lockfile.Dependencies)
	}
	log.Info("remote asset fetch", "allow", cfg.Allow, "pinned_dependencies", pinned)
	return NewServer(cas, f, opts...), nil
}
