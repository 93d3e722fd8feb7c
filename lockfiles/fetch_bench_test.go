package lockfiles

import (
	"context"
	"crypto/sha256"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"testing"

	"github.com/kilnbuild/kiln/cache/disk"
)

// BenchmarkFetch measures a verified fetch into the on-disk CAS against its peer in the
// same run: a plain GET that hashes the body into a temp file (what a careful script
// does). Compare their MB/s; the difference is the price of verify-then-store (the
// store hashes the bytes again as it writes them, by its own contract).
func BenchmarkFetch(b *testing.B) {
	body := make([]byte, 16<<20)
	for i := range body {
		body[i] = byte(i * 7)
	}
	ts := &testServer{Server: httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(body) }))}
	defer ts.Close()
	want := sha256Of(body)

	b.Run("peer=get+sha256+tempfile", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		dir := b.TempDir()
		for i := 0; i < b.N; i++ {
			resp, err := http.Get(ts.URL)
			if err != nil {
				b.Fatal(err)
			}
			f, _ := os.CreateTemp(dir, "x")
			h := sha256.New()
			io.Copy(io.MultiWriter(f, h), resp.Body)
			resp.Body.Close()
			f.Close()
			os.Remove(f.Name())
		}
	})
	b.Run("kiln=fetch+verify+disk-cas", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		f, err := NewFetcher(FetcherOptions{Allow: []string{ts.hostPort()}, TempDir: b.TempDir()})
		if err != nil {
			b.Fatal(err)
		}
		for i := 0; i < b.N; i++ {
			b.StopTimer() // a fresh store each time, so every blob is written; opening it is not measured
			store, err := disk.Open(context.Background(), b.TempDir(), disk.Options{})
			if err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			if _, err := f.Fetch(context.Background(), store, Request{URLs: []string{ts.URL}, Want: []Checksum{want}}); err != nil {
				b.Fatal(err)
			}
			store.Close()
		}
	})
}
