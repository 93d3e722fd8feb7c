package lockfiles

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// testServer is an httptest server on 127.0.0.1 that counts the requests it answers.
type testServer struct {
	*httptest.Server
	hits atomic.Int64
}

func newTestServer(t *testing.T, h http.HandlerFunc) *testServer {
	t.Helper()
	ts := &testServer{}
	ts.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ts.hits.Add(1)
		h(w, r)
	}))
	t.Cleanup(ts.Close)
	return ts
}

func (ts *testServer) hostPort() string { return strings.TrimPrefix(ts.URL, "http://") }

// sleeps records the backoff delays instead of sleeping.
type sleeps struct {
	mu sync.Mutex
	d  []time.Duration
}

func (s *sleeps) sleep(ctx context.Context, d time.Duration) error {
	s.mu.Lock()
	s.d = append(s.d, d)
	s.mu.Unlock()
	return ctx.Err()
}

func newFetcher(t *testing.T, opts FetcherOptions) (*Fetcher, *sleeps) {
	t.Helper()
	s := &sleeps{}
	if opts.Sleep == nil {
		opts.Sleep = s.sleep
	}
	opts.TempDir = t.TempDir()
	f, err := NewFetcher(opts)
	if err != nil {
		t.Fatal(err)
	}
	return f, s
}

func sha256Of(data []byte) Checksum {
	d := cache.DigestOf(data)
	c, _ := ParseSHA256Hex(d.Hash)
	return c
}

func assertMissing(t *testing.T, cas cache.BlobStore, data []byte) {
	t.Helper()
	missing, err := cas.FindMissing(context.Background(), []cache.Digest{cache.DigestOf(data)})
	if err != nil || len(missing) != 1 {
		t.Errorf("content was stored although it must not be (missing=%v, err=%v)", missing, err)
	}
}

func TestFetchSuccessStoresVerifiedBlob(t *testing.T) {
	body := bytes.Repeat([]byte("kiln "), 100_000)
	ts := newTestServer(t, func(w http.ResponseWriter, r *http.Request) { w.Write(body) })
	f, _ := newFetcher(t, FetcherOptions{Allow: []string{ts.hostPort()}})
	cas := cache.NewMemoryStore()
	var progressed atomic.Int64
	res, err := f.Fetch(context.Background(), cas, Request{
		URLs:     []string{ts.URL + "/a.tar.gz"},
		Want:     []Checksum{sha256Of(body), mustSRI(t, sriOf(SHA512, body))},
		Size:     int64(len(body)),
		Progress: func(done, total int64) { progressed.Store(done) },
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.Digest != cache.DigestOf(body) || res.Attempts != 1 || res.Integrity(SHA512) != sriOf(SHA512, body) {
		t.Errorf("result %+v", res)
	}
	got, err := cache.ReadAll(context.Background(), cas, res.Digest, 0)
	if err != nil || !bytes.Equal(got, body) {
		t.Fatalf("stored blob: %v", err)
	}
	if progressed.Load() != int64(len(body)) {
		t.Errorf("progress reached %d of %d", progressed.Load(), len(body))
	}
}

func mustSRI(t *testing.T, s string) Checksum {
	t.Helper()
	c, err := ParseSRI(s)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestFetchRefusesHostNotOnAllowlist(t *testing.T) {
	ts := newTestServer(t, func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("x")) })
	for _, allow := range [][]string{nil, {"example.com"}, {"127.0.0.1:1"}, {"localhost"}} {
		f, _ := newFetcher(t, FetcherOptions{Allow: allow})
		_, err := f.Fetch(context.Background(), cache.NewMemoryStore(), Request{URLs: []string{ts.URL + "/x"}})
		if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), ts.URL+"/x") {
			t.Errorf("allow %v: got %v, want PermissionDenied naming the URL", allow, err)
		}
	}
	if ts.hits.Load() != 0 {
		t.Errorf("a refused host was contacted %d times", ts.hits.Load())
	}
	// A host-only entry allows any port of that host.
	f, _ := newFetcher(t, FetcherOptions{Allow: []string{"127.0.0.1"}})
	if _, err := f.Fetch(context.Background(), cache.NewMemoryStore(), Request{URLs: []string{ts.URL + "/x"}}); err != nil {
		t.Errorf("host-only entry: %v", err)
	}
	for _, bad := range []string{"http://h.example", "h.example/path", "u@h.example", "h.example:0", "h.example:x", ""} {
		if _, err := NewFetcher(FetcherOptions{Allow: []string{bad}}); status.Code(err) != codes.InvalidArgument {
			t.Errorf("allow entry %q accepted: %v", bad, err)
		}
	}
}

func TestFetchRedirects(t *testing.T) {
	body := []byte("payload")
	target := newTestServer(t, func(w http.ResponseWriter, r *http.Request) { w.Write(body) })
	origin := newTestServer(t, func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, target.URL+"/moved", http.StatusFound)
	})

	t.Run("off the allowlist", func(t *testing.T) {
		f, _ := newFetcher(t, FetcherOptions{Allow: []string{origin.hostPort()}})
		_, err := f.Fetch(context.Background(), cache.NewMemoryStore(), Request{URLs: []string{origin.URL + "/a"}})
		if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "not on the fetch allowlist") {
			t.Fatalf("got %v, want PermissionDenied for the redirect", err)
		}
		if target.hits.Load() != 0 {
			t.Errorf("the redirect target off the allowlist was contacted")
		}
		if origin.hits.Load() != 1 {
			t.Errorf("a refused redirect was retried: %d requests", origin.hits.Load())
		}
	})
	t.Run("within the allowlist", func(t *testing.T) {
		f, _ := newFetcher(t, FetcherOptions{Allow: []string{origin.hostPort(), target.hostPort()}})
		res, err := f.Fetch(context.Background(), cache.NewMemoryStore(), Request{URLs: []string{origin.URL + "/a"}, Want: []Checksum{sha256Of(body)}})
		if err != nil || res.Digest != cache.DigestOf(body) {
			t.Fatalf("got %v, %v", res, err)
		}
	})
	t.Run("loop is bounded", func(t *testing.T) {
		loop := newTestServer(t, func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, "/again"+r.URL.Path, http.StatusFound)
		})
		f, _ := newFetcher(t, FetcherOptions{Allow: []string{loop.hostPort()}, MaxRedirects: 3})
		_, err := f.Fetch(context.Background(), cache.NewMemoryStore(), Request{URLs: []string{loop.URL + "/x"}})
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "stopped after 3 redirects") {
			t.Fatalf("got %v", err)
		}
		if n := loop.hits.Load(); n != 4 {
			t.Errorf("server saw %d requests, want 4 (the first and 3 redirects)", n)
		}
	})
}

func TestFetchOversize(t *testing.T) {
	const limit = 1000
	big := bytes.Repeat([]byte("x"), limit+1)
	for _, withLength := range []bool{true, false} {
		t.Run(fmt.Sprintf("content-length=%v", withLength), func(t *testing.T) {
			ts := newTestServer(t, func(w http.ResponseWriter, r *http.Request) {
				if withLength {
					w.Header().Set("Content-Length", fmt.Sprint(len(big)))
					w.Write(big)
					return
				}
				// Chunked: the size is only known by reading.
				for i := 0; i < len(big); i += 100 {
					w.Write(big[i:min(i+100, len(big))])
					w.(http.Flusher).Flush()
				}
			})
			f, _ := newFetcher(t, FetcherOptions{Allow: []string{ts.hostPort()}, MaxSize: limit})
			cas := cache.NewMemoryStore()
			_, err := f.Fetch(context.Background(), cas, Request{URLs: []string{ts.URL + "/big"}})
			if status.Code(err) != codes.ResourceExhausted {
				t.Fatalf("got %v, want ResourceExhausted", err)
			}
			if ts.hits.Load() != 1 {
				t.Errorf("oversize was retried: %d requests", ts.hits.Load())
			}
			assertMissing(t, cas, big)
			// Exactly the limit is fine.
			ok := newTestServer(t, func(w http.ResponseWriter, r *http.Request) { w.Write(big[:limit]) })
			f2, _ := newFetcher(t, FetcherOptions{Allow: []string{ok.hostPort()}, MaxSize: limit})
			if _, err := f2.Fetch(context.Background(), cas, Request{URLs: []string{ok.URL}}); err != nil {
				t.Errorf("a body of exactly MaxSize: %v", err)
			}
		})
	}
}

func TestFetchSlowServer(t *testing.T) {
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	t.Run("stalls mid-body", func(t *testing.T) {
		ts := newTestServer(t, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", "100")
			w.Write([]byte("partial"))
			w.(http.Flusher).Flush()
			select {
			case <-release:
			case <-r.Context().Done():
			}
		})
		f, _ := newFetcher(t, FetcherOptions{Allow: []string{ts.hostPort()}, IdleTimeout: 200 * time.Millisecond})
		_, err := f.Fetch(context.Background(), cache.NewMemoryStore(), Request{URLs: []string{ts.URL}})
		if status.Code(err) != codes.DeadlineExceeded || !strings.Contains(err.Error(), "no data for 200ms after 7 bytes") {
			t.Fatalf("got %v, want DeadlineExceeded from the idle timeout", err)
		}
	})
	t.Run("never answers", func(t *testing.T) {
		ts := newTestServer(t, func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-release:
			case <-r.Context().Done():
			}
		})
		f, _ := newFetcher(t, FetcherOptions{Allow: []string{ts.hostPort()}, IdleTimeout: 200 * time.Millisecond})
		_, err := f.Fetch(context.Background(), cache.NewMemoryStore(), Request{URLs: []string{ts.URL}})
		if status.Code(err) != codes.DeadlineExceeded {
			t.Fatalf("got %v, want DeadlineExceeded", err)
		}
	})
	t.Run("trickles past the total timeout", func(t *testing.T) {
		ts := newTestServer(t, func(w http.ResponseWriter, r *http.Request) {
			for {
				if _, err := w.Write([]byte("x")); err != nil {
					return
				}
				w.(http.Flusher).Flush()
				select {
				case <-release:
					return
				case <-r.Context().Done():
					return
				case <-time.After(20 * time.Millisecond):
				}
			}
		})
		f, _ := newFetcher(t, FetcherOptions{Allow: []string{ts.hostPort()}, IdleTimeout: 5 * time.Second, Timeout: 300 * time.Millisecond})
		_, err := f.Fetch(context.Background(), cache.NewMemoryStore(), Request{URLs: []string{ts.URL}})
		if status.Code(err) != codes.DeadlineExceeded || !strings.Contains(err.Error(), "not complete within 300ms") {
			t.Fatalf("got %v, want DeadlineExceeded from the total timeout", err)
		}
	})
}

func TestFetchRetries(t *testing.T) {
	body := []byte("eventually")
	t.Run("5xx then success", func(t *testing.T) {
		var n atomic.Int64
		ts := newTestServer(t, func(w http.ResponseWriter, r *http.Request) {
			if n.Add(1) <= 2 {
				http.Error(w, "busy", http.StatusServiceUnavailable)
				return
			}
			w.Write(body)
		})
		f, s := newFetcher(t, FetcherOptions{Allow: []string{ts.hostPort()}, BackoffBase: 100 * time.Millisecond})
		cas := cache.NewMemoryStore()
		res, err := f.Fetch(context.Background(), cas, Request{URLs: []string{ts.URL}, Want: []Checksum{sha256Of(body)}})
		if err != nil {
			t.Fatal(err)
		}
		if res.Attempts != 3 || ts.hits.Load() != 3 {
			t.Errorf("attempts %d, hits %d; want 3", res.Attempts, ts.hits.Load())
		}
		if want := []time.Duration{100 * time.Millisecond, 200 * time.Millisecond}; fmt.Sprint(s.d) != fmt.Sprint(want) {
			t.Errorf("backoff %v, want %v", s.d, want)
		}
	})
	t.Run("5xx gives up after the retries", func(t *testing.T) {
		ts := newTestServer(t, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Retry-After", "2")
			http.Error(w, "down", http.StatusBadGateway)
		})
		f, s := newFetcher(t, FetcherOptions{Allow: []string{ts.hostPort()}, Retries: 2})
		_, err := f.Fetch(context.Background(), cache.NewMemoryStore(), Request{URLs: []string{ts.URL}})
		if status.Code(err) != codes.Unavailable || ts.hits.Load() != 3 {
			t.Fatalf("got %v after %d requests, want Unavailable after 3", err, ts.hits.Load())
		}
		if want := []time.Duration{2 * time.Second, 2 * time.Second}; fmt.Sprint(s.d) != fmt.Sprint(want) {
			t.Errorf("Retry-After not honoured: slept %v", s.d)
		}
	})
	for _, code := range []int{http.StatusNotFound, http.StatusForbidden, http.StatusBadRequest} {
		t.Run(fmt.Sprintf("%d not retried", code), func(t *testing.T) {
			ts := newTestServer(t, func(w http.ResponseWriter, r *http.Request) { http.Error(w, "no", code) })
			f, s := newFetcher(t, FetcherOptions{Allow: []string{ts.hostPort()}})
			_, err := f.Fetch(context.Background(), cache.NewMemoryStore(), Request{URLs: []string{ts.URL}})
			want := map[int]codes.Code{404: codes.NotFound, 403: codes.PermissionDenied, 400: codes.FailedPrecondition}[code]
			if status.Code(err) != want || ts.hits.Load() != 1 || len(s.d) != 0 {
				t.Fatalf("got %v after %d requests and %d sleeps, want %v after 1", err, ts.hits.Load(), len(s.d), want)
			}
		})
	}
	t.Run("connection reset then success", func(t *testing.T) {
		var n atomic.Int64
		ts := newTestServer(t, func(w http.ResponseWriter, r *http.Request) {
			if n.Add(1) == 1 {
				w.Header().Set("Content-Length", fmt.Sprint(len(body)))
				w.Write(body[:3])
				w.(http.Flusher).Flush()
				conn, _, err := w.(http.Hijacker).Hijack()
				if err == nil {
					conn.Close() // a truncated body
				}
				return
			}
			w.Write(body)
		})
		f, _ := newFetcher(t, FetcherOptions{Allow: []string{ts.hostPort()}})
		res, err := f.Fetch(context.Background(), cache.NewMemoryStore(), Request{URLs: []string{ts.URL}, Want: []Checksum{sha256Of(body)}})
		if err != nil || res.Attempts != 2 {
			t.Fatalf("got %+v, %v; want success on the second attempt", res, err)
		}
	})
	t.Run("mirror after a 404", func(t *testing.T) {
		gone := newTestServer(t, func(w http.ResponseWriter, r *http.Request) { http.NotFound(w, r) })
		ok := newTestServer(t, func(w http.ResponseWriter, r *http.Request) { w.Write(body) })
		f, _ := newFetcher(t, FetcherOptions{Allow: []string{gone.hostPort(), ok.hostPort()}})
		res, err := f.Fetch(context.Background(), cache.NewMemoryStore(), Request{URLs: []string{gone.URL, ok.URL}, Want: []Checksum{sha256Of(body)}})
		if err != nil || res.URL != ok.URL {
			t.Fatalf("got %+v, %v", res, err)
		}
	})
}

func TestFetchDigestMismatch(t *testing.T) {
	// A server that changes the body between requests: the first fetch records what it
	// served (as `kiln lock add` does); the second is checked against that and refused.
	var n atomic.Int64
	ts := newTestServer(t, func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "release tarball, version %d", n.Add(1))
	})
	mirror := newTestServer(t, func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("release tarball, version 1")) })
	f, s := newFetcher(t, FetcherOptions{Allow: []string{ts.hostPort(), mirror.hostPort()}})
	cas := cache.NewMemoryStore()
	first, err := f.Fetch(context.Background(), cas, Request{URLs: []string{ts.URL + "/r.tgz"}})
	if err != nil {
		t.Fatal(err)
	}
	pinned, _ := FindAlgo(first.Checksums, SHA256)
	_, err = f.Fetch(context.Background(), cas, Request{URLs: []string{ts.URL + "/r.tgz", mirror.URL}, Want: []Checksum{pinned}, Size: first.Digest.Size})
	var mm *MismatchError
	if !errors.As(err, &mm) || status.Code(err) != codes.Aborted {
		t.Fatalf("got %v, want an ABORTED MismatchError", err)
	}
	changed := []byte("release tarball, version 2")
	for _, want := range []string{ts.URL + "/r.tgz", pinned.String(), sha256Of(changed).String()} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %s", err, want)
		}
	}
	assertMissing(t, cas, changed)
	if mirror.hits.Load() != 0 || len(s.d) != 0 || ts.hits.Load() != 2 {
		t.Errorf("a mismatch was retried (mirror hits %d, sleeps %d, origin hits %d)", mirror.hits.Load(), len(s.d), ts.hits.Load())
	}
	// A wrong sha512 alone (sha256 unpinned) is caught too.
	_, err = f.Fetch(context.Background(), cas, Request{URLs: []string{mirror.URL}, Want: []Checksum{mustSRI(t, sriOf(SHA512, []byte("other")))}})
	if !errors.As(err, &mm) || mm.Want.Algo != SHA512 {
		t.Errorf("sha512 mismatch: %v", err)
	}
	assertMissing(t, cas, []byte("release tarball, version 1x"))
}

func TestFetchLogsNoCredentials(t *testing.T) {
	const secret = "s3cr3t-VALUE"
	var n atomic.Int64
	var sawAuth atomic.Bool
	ts := newTestServer(t, func(w http.ResponseWriter, r *http.Request) {
		if _, _, ok := r.BasicAuth(); ok {
			sawAuth.Store(true)
		}
		switch n.Add(1) {
		case 1:
			http.Error(w, "busy", http.StatusInternalServerError)
		case 2:
			http.Redirect(w, r, "/next?sig="+secret, http.StatusFound)
		default:
			w.Write([]byte("data"))
		}
	})
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	f, _ := newFetcher(t, FetcherOptions{Allow: []string{ts.hostPort()}, Logger: log})
	u, _ := url.Parse(ts.URL + "/file?token=" + secret + "&v=1")
	u.User = url.UserPassword("alice", secret)
	cas := cache.NewMemoryStore()
	if _, err := f.Fetch(context.Background(), cas, Request{URLs: []string{u.String()}}); err != nil {
		t.Fatal(err)
	}
	// And an error path: a mismatch names the URL, redacted.
	_, err := f.Fetch(context.Background(), cas, Request{URLs: []string{u.String()}, Want: []Checksum{sha256Of([]byte("nope"))}})
	if err == nil {
		t.Fatal("mismatch not detected")
	}
	if !sawAuth.Load() {
		t.Error("credentials in the URL were not sent: the test proves nothing")
	}
	for _, s := range []string{logs.String(), err.Error()} {
		if strings.Contains(s, secret) || strings.Contains(s, "alice") {
			t.Errorf("credentials leaked:\n%s", s)
		}
	}
	for _, want := range []string{"fetch failed, retrying", "following redirect", "token=REDACTED", "sig=REDACTED", "does not match"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, logs.String())
		}
	}
}

// TestFetchIgnoresContentEncoding checks that the digest is of the bytes as served: a
// .tar.gz served with Content-Encoding: gzip must not be transparently decompressed.
func TestFetchIgnoresContentEncoding(t *testing.T) {
	body := []byte{0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0} // gzip of ""
	var gotAE atomic.Value
	ts := newTestServer(t, func(w http.ResponseWriter, r *http.Request) {
		gotAE.Store(r.Header.Get("Accept-Encoding"))
		w.Header().Set("Content-Encoding", "gzip")
		w.Write(body)
	})
	f, _ := newFetcher(t, FetcherOptions{Allow: []string{ts.hostPort()}})
	res, err := f.Fetch(context.Background(), cache.NewMemoryStore(), Request{URLs: []string{ts.URL}, Want: []Checksum{sha256Of(body)}})
	if err != nil || res.Digest.Size != int64(len(body)) {
		t.Fatalf("got %+v, %v", res, err)
	}
	if gotAE.Load() != "identity" {
		t.Errorf("Accept-Encoding %q, want identity", gotAE.Load())
	}
}

// TestFetchCancel checks that cancelling the context stops a fetch and its backoff.
func TestFetchCancel(t *testing.T) {
	ts := newTestServer(t, func(w http.ResponseWriter, r *http.Request) { http.Error(w, "x", http.StatusServiceUnavailable) })
	ctx, cancel := context.WithCancel(context.Background())
	f, _ := newFetcher(t, FetcherOptions{Allow: []string{ts.hostPort()}, Sleep: func(ctx context.Context, d time.Duration) error {
		cancel()
		return ctx.Err()
	}})
	_, err := f.Fetch(ctx, cache.NewMemoryStore(), Request{URLs: []string{ts.URL}})
	if status.Code(err) != codes.Canceled || ts.hits.Load() != 1 {
		t.Fatalf("got %v after %d requests", err, ts.hits.Load())
	}
}
