package lockfiles

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/internal/clock"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Defaults for FetcherOptions' zero values.
const (
	DefaultConnectTimeout = 10 * time.Second
	DefaultTimeout        = 10 * time.Minute
	DefaultIdleTimeout    = 30 * time.Second
	DefaultMaxSize        = 4 << 30
	DefaultMaxRedirects   = 5
	DefaultRetries        = 3
	DefaultBackoffBase    = 250 * time.Millisecond
	DefaultBackoffMax     = 10 * time.Second
)

// FetcherOptions configures a Fetcher. Zero values take the defaults above.
type FetcherOptions struct {
	// Allow lists the hosts downloads may come from, as "host" (any port) or "host:port";
	// every other host is refused, including as the target of a redirect.
	Allow []string
	// ConnectTimeout bounds the TCP connect and TLS handshake.
	ConnectTimeout time.Duration
	// Timeout bounds one whole attempt, from request to last byte.
	Timeout time.Duration
	// IdleTimeout bounds the wait for response headers and between body reads, so a
	// server that stalls or trickles is cut off long before Timeout.
	IdleTimeout time.Duration
	// MaxSize bounds a download's bytes; larger bodies are refused (RESOURCE_EXHAUSTED).
	MaxSize int64
	// MaxRedirects bounds the redirects followed per attempt; negative means none.
	MaxRedirects int
	// Retries is how many times a transient failure (5xx, 408, 429, a reset or refused
	// connection, a truncated body) is retried; negative means never.
	Retries int
	// BackoffBase is the first retry's delay, doubled each retry up to BackoffMax. A
	// Retry-After header, capped at BackoffMax, takes precedence.
	BackoffBase, BackoffMax time.Duration
	// Client is the HTTP client to use (tests inject one); its CheckRedirect is replaced
	// by the Fetcher's. Nil means a client with its own transport and no proxy.
	Client *http.Client
	// TempDir holds downloads until they are verified; "" means os.TempDir().
	TempDir string
	// Logger receives fetch events; URLs in it are always redacted. Nil discards them.
	Logger *slog.Logger
	// Now and Sleep are the clock; nil means the real one. Sleep returns early with the
	// context's error when ctx ends.
	Now   func() time.Time
	Sleep func(ctx context.Context, d time.Duration) error
	// UserAgent is sent with every request; "" means "kiln".
	UserAgent string
}

// Fetcher downloads dependencies from allowlisted hosts into a CAS, verified by digest.
type Fetcher struct {
	opts   FetcherOptions
	allow  []allowEntry
	client *http.Client
	log    *slog.Logger
}

type allowEntry struct {
	host string // lowercase, IPv6 without brackets
	port string // "" for any port
}

// Request is one dependency to fetch.
type Request struct {
	// URLs are mirrors of the same content, tried in order.
	URLs []string
	// Want are the checksums the content must match, all of them. With none, the content
	// is trusted on first use (what `kiln lock add` records).
	Want []Checksum
	// Size, if positive, is the content's expected length.
	Size int64
	// Progress, if set, is called as bytes arrive; total is -1 when unknown.
	Progress func(done, total int64)
}

// Result describes content that was fetched, verified and stored.
type Result struct {
	// URL is the entry of Request.URLs that served the content.
	URL string
	// Digest is the content's CAS digest.
	Digest cache.Digest
	// Checksums holds the SHA-256 and each other algorithm that was requested.
	Checksums []Checksum
	// Attempts counts the HTTP requests made for URL (1 without retries).
	Attempts int
}

// Integrity returns the result's checksum in algo as an SRI value, or "".
func (r *Result) Integrity(algo string) string {
	if c, ok := FindAlgo(r.Checksums, algo); ok {
		return c.SRI()
	}
	return ""
}

// MismatchError is content that does not match the checksum pinned for it. It is an
// ABORTED status (the remote asset API's code for a failed consistency check).
type MismatchError struct {
	URL       string // redacted
	Want, Got Checksum
	WantSize  int64 // 0 when not pinned
	GotSize   int64
}

func (e *MismatchError) Error() string {
	if e.Want.Algo == "" { // a size mismatch alone
		return fmt.Sprintf("%s: content does not match its pin: want %d bytes, got %d bytes (%s)", e.URL, e.WantSize, e.GotSize, e.Got)
	}
	return fmt.Sprintf("%s: content does not match its pin: want %s, got %s (%d bytes)", e.URL, e.Want, e.Got, e.GotSize)
}

// GRPCStatus makes a MismatchError an ABORTED status.
func (e *MismatchError) GRPCStatus() *status.Status { return status.New(codes.Aborted, e.Error()) }

// NewFetcher validates opts and returns a Fetcher.
func NewFetcher(opts FetcherOptions) (*Fetcher, error) {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&opts.ConnectTimeout, DefaultConnectTimeout)
	def(&opts.Timeout, DefaultTimeout)
	def(&opts.IdleTimeout, DefaultIdleTimeout)
	def(&opts.BackoffBase, DefaultBackoffBase)
	def(&opts.BackoffMax, DefaultBackoffMax)
	if opts.MaxSize <= 0 {
		opts.MaxSize = DefaultMaxSize
	}
	if opts.MaxRedirects == 0 {
		opts.MaxRedirects = DefaultMaxRedirects
	} else if opts.MaxRedirects < 0 {
		opts.MaxRedirects = 0
	}
	if opts.Retries == 0 {
		opts.Retries = DefaultRetries
	} else if opts.Retries < 0 {
		opts.Retries = 0
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Sleep == nil {
		opts.Sleep = clock.System().Sleep
	}
	if opts.UserAgent == "" {
		opts.UserAgent = "kiln"
	}
	f := &Fetcher{opts: opts, log: opts.Logger}
	if f.log == nil {
		f.log = slog.New(slog.DiscardHandler)
	}
	for _, a := range opts.Allow {
		e, err := parseAllow(a)
		if err != nil {
			return nil, err
		}
		f.allow = append(f.allow, e)
	}
	var c http.Client
	if opts.Client != nil {
		c = *opts.Client
	} else {
		c.Transport = &http.Transport{
			Proxy:                 nil, // a proxy from the environment would be an unlisted host
			DialContext:           (&net.Dialer{Timeout: opts.ConnectTimeout, KeepAlive: 30 * time.Second}).DialContext,
			TLSHandshakeTimeout:   opts.ConnectTimeout,
			ResponseHeaderTimeout: opts.IdleTimeout,
			MaxIdleConns:          16,
			IdleConnTimeout:       90 * time.Second,
			ForceAttemptHTTP2:     true,
			DisableCompression:    true, // digests are of the bytes as served
		}
	}
	c.CheckRedirect = f.checkRedirect
	f.client = &c
	return f, nil
}

// parseAllow reads one allowlist entry: "host", "host:port", "[v6]" or "[v6]:port".
func parseAllow(s string) (allowEntry, error) {
	bad := func(why string) (allowEntry, error) {
		return allowEntry{}, status.Errorf(codes.InvalidArgument, "allowed host %q: %s", s, why)
	}
	if s == "" || strings.ContainsAny(s, "/@?# \t") {
		return bad("want host or host:port (no scheme, path or credentials)")
	}
	host, port := s, ""
	if strings.HasPrefix(s, "[") || strings.Count(s, ":") == 1 {
		h, p, err := net.SplitHostPort(s)
		if err != nil {
			if !strings.HasPrefix(s, "[") || !strings.HasSuffix(s, "]") {
				return bad("want host or host:port")
			}
			h, p = s[1:len(s)-1], ""
		}
		host, port = h, p
	}
	if host == "" {
		return bad("empty host")
	}
	if port != "" {
		n, err := strconv.Atoi(port)
		if err != nil || n < 1 || n > 65535 {
			return bad("bad port")
		}
	}
	return allowEntry{host: strings.ToLower(host), port: port}, nil
}

// effectivePort is u's port, or its scheme's default.
func effectivePort(u *url.URL) string {
	if p := u.Port(); p != "" {
		return p
	}
	if u.Scheme == "https" {
		return "443"
	}
	return "80"
}

// hostAllowed reports whether u's host (and port) is on the allowlist.
func (f *Fetcher) hostAllowed(u *url.URL) bool {
	host := strings.ToLower(u.Hostname())
	for _, e := range f.allow {
		if e.host == host && (e.port == "" || e.port == effectivePort(u)) {
			return true
		}
	}
	return false
}

// Allowed checks that rawURL may be fetched: an http or https URL whose host is on the
// allowlist. It returns nil, INVALID_ARGUMENT for a malformed URL, or PERMISSION_DENIED
// naming the (redacted) URL.
func (f *Fetcher) Allowed(rawURL string) error {
	u, err := url.Parse(rawURL)
	if err != nil || u.Host == "" {
		return status.Errorf(codes.InvalidArgument, "%s: not an absolute URL", RedactURL(rawURL))
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return status.Errorf(codes.InvalidArgument, "%s: only http and https URLs are fetched", RedactURL(rawURL))
	}
	if !f.hostAllowed(u) {
		return status.Errorf(codes.PermissionDenied, "%s: host %s is not on the fetch allowlist", RedactURL(rawURL), u.Host)
	}
	return nil
}

// redirectError is a redirect the Fetcher refused; it is never retried.
type redirectError struct{ err error }

func (e *redirectError) Error() string { return e.err.Error() }

func (f *Fetcher) checkRedirect(req *http.Request, via []*http.Request) error {
	from := via[len(via)-1].URL
	if len(via) > f.opts.MaxRedirects {
		return &redirectError{status.Errorf(codes.FailedPrecondition, "%s: stopped after %d redirects (last to %s)", RedactURL(via[0].URL.String()), f.opts.MaxRedirects, RedactURL(req.URL.String()))}
	}
	if req.URL.Scheme != "http" && req.URL.Scheme != "https" {
		return &redirectError{status.Errorf(codes.PermissionDenied, "%s: redirect to a %s URL refused", RedactURL(from.String()), req.URL.Scheme)}
	}
	if from.Scheme == "https" && req.URL.Scheme == "http" {
		return &redirectError{status.Errorf(codes.PermissionDenied, "%s: redirect from https to plain http (%s) refused", RedactURL(from.String()), RedactURL(req.URL.String()))}
	}
	if !f.hostAllowed(req.URL) {
		return &redirectError{status.Errorf(codes.PermissionDenied, "%s: redirect to %s refused: host %s is not on the fetch allowlist", RedactURL(from.String()), RedactURL(req.URL.String()), req.URL.Host)}
	}
	f.log.Debug("following redirect", "from", RedactURL(from.String()), "to", RedactURL(req.URL.String()))
	return nil
}

// Fetch downloads the content of req from the first URL that serves it, hashing it as
// it streams to a temp file, and stores it in cas only if it matches every checksum in
// req.Want (and req.Size). URLs not on the allowlist are skipped unrequested; if none
// is left the error is PERMISSION_DENIED. A mismatch is a *MismatchError, ends the
// fetch (other mirrors are not tried) and stores nothing.
func (f *Fetcher) Fetch(ctx context.Context, cas cache.BlobStore, req Request) (*Result, error) {
	if len(req.URLs) == 0 {
		return nil, status.Error(codes.InvalidArgument, "fetch: no URL given")
	}
	for _, c := range req.Want {
		if newHash(c.Algo) == nil || len(c.Sum) != hashSizes[c.Algo] {
			return nil, status.Errorf(codes.InvalidArgument, "fetch: unusable checksum %q", c.Algo)
		}
	}
	if _, err := MergeChecksums(nil, req.Want); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "fetch: %v", err)
	}
	var errs []error
	tried := 0
	for _, u := range req.URLs {
		if err := f.Allowed(u); err != nil {
			f.log.Warn("fetch refused", "url", RedactURL(u), "err", err)
			errs = append(errs, err)
			continue
		}
		tried++
		res, err := f.fetchURL(ctx, cas, u, req)
		if err == nil {
			return res, nil
		}
		var mm *MismatchError
		if errors.As(err, &mm) || ctx.Err() != nil {
			return nil, err
		}
		errs = append(errs, err)
	}
	if len(errs) == 1 {
		return nil, errs[0]
	}
	// The code of the last error tried says most about what went wrong; every message is kept.
	code := codes.PermissionDenied
	if tried > 0 {
		code = status.Code(errs[len(errs)-1])
	}
	msgs := make([]string, len(errs))
	for i, e := range errs {
		msgs[i] = status.Convert(e).Message()
	}
	return nil, status.Errorf(code, "all %d URLs failed: %s", len(req.URLs), strings.Join(msgs, "; "))
}

// fetchURL downloads one URL with retries, verifies it and stores it.
func (f *Fetcher) fetchURL(ctx context.Context, cas cache.BlobStore, u string, req Request) (*Result, error) {
	start := f.opts.Now()
	safe := RedactURL(u)
	var dl *download
	attempts := 0
	for {
		attempts++
		var retryAfter time.Duration
		var err error
		var retry bool
		dl, retry, retryAfter, err = f.attempt(ctx, u, req.Want, req.Progress)
		if err == nil {
			break
		}
		if !retry || attempts > f.opts.Retries || ctx.Err() != nil {
			f.log.Warn("fetch failed", "url", safe, "attempts", attempts, "err", err)
			return nil, err
		}
		delay := f.opts.BackoffBase << (attempts - 1)
		if delay > f.opts.BackoffMax || delay <= 0 {
			delay = f.opts.BackoffMax
		}
		if retryAfter > 0 {
			delay = min(retryAfter, f.opts.BackoffMax)
		}
		f.log.Warn("fetch failed, retrying", "url", safe, "attempt", attempts, "delay", delay, "err", err)
		if err := f.opts.Sleep(ctx, delay); err != nil {
			return nil, status.FromContextError(err).Err()
		}
	}
	defer dl.discard()

	got := dl.sums
	sha, _ := FindAlgo(got, SHA256)
	for _, w := range req.Want {
		g, _ := FindAlgo(got, w.Algo)
		if !g.Equal(w) {
			err := &MismatchError{URL: safe, Want: w, Got: g, WantSize: req.Size, GotSize: dl.size}
			f.log.Error("download does not match its pinned digest; nothing stored",
				"url", safe, "want", w.String(), "got", g.String(), "got_sha256", sha.String(), "bytes", dl.size)
			return nil, err
		}
	}
	if req.Size > 0 && dl.size != req.Size {
		err := &MismatchError{URL: safe, WantSize: req.Size, GotSize: dl.size, Got: sha}
		f.log.Error("download does not match its pinned size; nothing stored",
			"url", safe, "want_bytes", req.Size, "got_bytes", dl.size, "got", sha.String())
		return nil, err
	}
	d := cache.Digest{Hash: sha.Hex(), Size: dl.size}
	if _, err := dl.file.Seek(0, io.SeekStart); err != nil {
		return nil, status.Errorf(codes.Internal, "rewind download: %v", err)
	}
	if err := cas.Put(ctx, d, dl.file); err != nil {
		return nil, err
	}
	f.log.Info("fetched", "url", safe, "digest", d.String(), "attempts", attempts, "duration", f.opts.Now().Sub(start))
	return &Result{URL: u, Digest: d, Checksums: got, Attempts: attempts}, nil
}

// download is a completed body in a temp file, with its checksums.
type download struct {
	file *os.File
	size int64
	sums []Checksum
}

func (d *download) discard() {
	d.file.Close()
	os.Remove(d.file.Name())
}

// attempt makes one request and streams the body to a temp file. retry says whether
// the failure is transient; retryAfter is the server's Retry-After, if any.
func (f *Fetcher) attempt(ctx context.Context, u string, want []Checksum, progress func(done, total int64)) (dl *download, retry bool, retryAfter time.Duration, err error) {
	safe := RedactURL(u)
	actx, cancel := context.WithTimeout(ctx, f.opts.Timeout)
	defer cancel()
	hreq, err := http.NewRequestWithContext(actx, http.MethodGet, u, nil)
	if err != nil {
		return nil, false, 0, status.Errorf(codes.InvalidArgument, "%s: %v", safe, unwrapURLError(err))
	}
	hreq.Header.Set("User-Agent", f.opts.UserAgent)
	hreq.Header.Set("Accept-Encoding", "identity")
	// The idle timer runs from the request on: it cuts off a server that accepts the
	// connection but never answers, and one whose body stalls.
	var idle atomic.Bool
	timer := time.AfterFunc(f.opts.IdleTimeout, func() { idle.Store(true); cancel() })
	defer timer.Stop()
	resp, err := f.client.Do(hreq)
	if err != nil {
		var re *redirectError
		if errors.As(err, &re) {
			return nil, false, 0, re.err
		}
		if ctx.Err() != nil {
			return nil, false, 0, status.FromContextError(ctx.Err()).Err()
		}
		if idle.Load() {
			return nil, false, 0, status.Errorf(codes.DeadlineExceeded, "%s: no response within %s", safe, f.opts.IdleTimeout)
		}
		if actx.Err() != nil {
			return nil, false, 0, status.Errorf(codes.DeadlineExceeded, "%s: no complete answer within %s", safe, f.opts.Timeout)
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil, true, 0, status.Errorf(codes.DeadlineExceeded, "%s: %v", safe, unwrapURLError(err))
		}
		return nil, true, 0, status.Errorf(codes.Unavailable, "%s: %v", safe, unwrapURLError(err))
	}
	defer resp.Body.Close()
	final := RedactURL(resp.Request.URL.String())
	switch sc := resp.StatusCode; {
	case sc == http.StatusOK:
	case sc >= 500 || sc == http.StatusRequestTimeout || sc == http.StatusTooManyRequests:
		return nil, true, parseRetryAfter(resp.Header.Get("Retry-After"), f.opts.Now()), status.Errorf(codes.Unavailable, "%s: server answered %s", final, resp.Status)
	case sc == http.StatusNotFound || sc == http.StatusGone:
		return nil, false, 0, status.Errorf(codes.NotFound, "%s: server answered %s", final, resp.Status)
	case sc == http.StatusUnauthorized || sc == http.StatusForbidden:
		return nil, false, 0, status.Errorf(codes.PermissionDenied, "%s: server answered %s", final, resp.Status)
	default:
		return nil, false, 0, status.Errorf(codes.FailedPrecondition, "%s: server answered %s", final, resp.Status)
	}
	if resp.ContentLength > f.opts.MaxSize {
		return nil, false, 0, status.Errorf(codes.ResourceExhausted, "%s: body of %d bytes exceeds the %d-byte limit", final, resp.ContentLength, f.opts.MaxSize)
	}
	if ce := resp.Header.Get("Content-Encoding"); ce != "" && ce != "identity" && !resp.Uncompressed {
		f.log.Debug("body has a content encoding; hashing the bytes as served", "url", final, "encoding", ce)
	}

	tmp, err := os.CreateTemp(f.opts.TempDir, "kiln-fetch-*")
	if err != nil {
		return nil, false, 0, status.Errorf(codes.Internal, "create temp file: %v", err)
	}
	out := &download{file: tmp}
	ok := false
	defer func() {
		if !ok {
			out.discard()
		}
	}()
	hashes := NewHashes(want)
	w := io.MultiWriter(tmp, hashes)

	buf := make([]byte, 256<<10)
	total := resp.ContentLength
	for {
		timer.Reset(f.opts.IdleTimeout)
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			out.size += int64(n)
			if out.size > f.opts.MaxSize {
				return nil, false, 0, status.Errorf(codes.ResourceExhausted, "%s: body exceeds the %d-byte limit", final, f.opts.MaxSize)
			}
			if _, werr := w.Write(buf[:n]); werr != nil {
				return nil, false, 0, status.Errorf(codes.Internal, "write temp file: %v", werr)
			}
			if progress != nil {
				progress(out.size, total)
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			switch {
			case ctx.Err() != nil:
				return nil, false, 0, status.FromContextError(ctx.Err()).Err()
			case idle.Load():
				return nil, false, 0, status.Errorf(codes.DeadlineExceeded, "%s: no data for %s after %d bytes", final, f.opts.IdleTimeout, out.size)
			case actx.Err() != nil:
				return nil, false, 0, status.Errorf(codes.DeadlineExceeded, "%s: body not complete within %s (%d bytes read)", final, f.opts.Timeout, out.size)
			}
			// A reset or truncated body: the server or network hiccuped; try again.
			return nil, true, 0, status.Errorf(codes.Unavailable, "%s: reading body after %d bytes: %v", final, out.size, rerr)
		}
	}
	timer.Stop()
	if idle.Load() {
		return nil, false, 0, status.Errorf(codes.DeadlineExceeded, "%s: no data for %s after %d bytes", final, f.opts.IdleTimeout, out.size)
	}
	out.sums = hashes.All()
	ok = true
	return out, false, 0, nil
}

// unwrapURLError drops net/http's *url.Error wrapper, whose message repeats the URL
// unredacted; the caller names the redacted URL itself.
func unwrapURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// parseRetryAfter reads a Retry-After header in seconds or as an HTTP date.
func parseRetryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if s, err := strconv.Atoi(v); err == nil && s >= 0 {
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}
