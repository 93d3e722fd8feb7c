package test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/test/harness"
)

// The helpers in this file serve the lock_* end-to-end tests; their names carry the
// "lock" prefix so they never collide with other tests of this package.

// lockKiln runs kiln with args in dir.
func lockKiln(t testing.TB, dir string, args ...string) harness.Result {
	t.Helper()
	return harness.RunIn(t, dir, nil, args...)
}

// lockOrigin is an HTTP server on 127.0.0.1 whose files can change, counting requests.
type lockOrigin struct {
	*httptest.Server
	mu    sync.Mutex
	files map[string][]byte
	hits  atomic.Int64
}

func newLockOrigin(t testing.TB) *lockOrigin {
	o := &lockOrigin{files: map[string][]byte{}}
	o.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		o.hits.Add(1)
		o.mu.Lock()
		b, ok := o.files[r.URL.Path]
		o.mu.Unlock()
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Write(b)
	}))
	t.Cleanup(o.Close)
	return o
}

func (o *lockOrigin) set(path string, b []byte) {
	o.mu.Lock()
	o.files[path] = b
	o.mu.Unlock()
}

func (o *lockOrigin) host() string { return strings.TrimPrefix(o.URL, "http://") }

// lockTarGz returns a deterministic .tar.gz of files (name -> content) under prefix/.
func lockTarGz(t testing.TB, prefix string, files map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	tw.WriteHeader(&tar.Header{Name: prefix + "/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: time.Unix(0, 0)})
	names := make([]string, 0, len(files))
	for k := range files {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, name := range names {
		body := files[name]
		if err := tw.WriteHeader(&tar.Header{Name: prefix + "/" + name, Mode: 0o644, Size: int64(len(body)), ModTime: time.Unix(0, 0)}); err != nil {
			t.Fatal(err)
		}
		tw.Write([]byte(body))
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := gz.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}
