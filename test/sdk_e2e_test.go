package test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"io/fs"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/bazelbuild/remote-apis-sdks/go/pkg/client"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/digest"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/uploadinfo"
	"github.com/kilnbuild/kiln/test/harness"
)

func sdkClient(t *testing.T, addr string, opts ...client.Opt) *client.Client {
	t.Helper()
	c, err := client.NewClient(context.Background(), "e2e", client.DialParams{Service: addr, NoSecurity: true}, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// mixedBlobs makes about total bytes of blobs from 1 byte to 8 MiB, seeded.
func mixedBlobs(seed int64, total int) [][]byte {
	r := rand.New(rand.NewSource(seed))
	sizes := []int{1, 100, 4 << 10, 64 << 10, 1 << 20, 3<<20 + 1, 8 << 20}
	var out [][]byte
	for n := 0; n < total; {
		sz := sizes[r.Intn(len(sizes))]
		b := make([]byte, sz)
		r.Read(b)
		if r.Intn(3) == 0 {
			// Some compressible data, so zstd paths see real ratios.
			for i := range b {
				b[i] = byte(i % 7)
			}
			b[0] = byte(r.Intn(256))
			b[len(b)-1] = byte(n)
		}
		out = append(out, b)
		n += sz
	}
	return out
}

// TestSDKRoundTrip pushes 100 MiB of mixed-size blobs through kiln with the
// remote-apis-sdks Go client (batch and ByteStream paths, plain and zstd) and reads
// every one back byte-identical.
func TestSDKRoundTrip(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	srv := harness.StartServer(t)
	ctx := harness.Context(t, 5*time.Minute)
	blobs := mixedBlobs(1, 100<<20)
	for _, mode := range []struct {
		name string
		opts []client.Opt
	}{
		{"plain", []client.Opt{client.UseBatchOps(true)}},
		{"zstd", []client.Opt{client.UseBatchOps(true), client.CompressedBytestreamThreshold(0)}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			c := sdkClient(t, srv.Addr, mode.opts...)
			var entries []*uploadinfo.Entry
			var ds []digest.Digest
			seen := map[digest.Digest]bool{}
			for i, b := range blobs {
				if mode.name == "zstd" {
					b = append([]byte{byte(i)}, b...) // distinct from the plain run
				}
				e := uploadinfo.EntryFromBlob(b)
				if !seen[e.Digest] {
					seen[e.Digest] = true
					entries = append(entries, e)
					ds = append(ds, e.Digest)
				}
			}
			if _, _, err := c.UploadIfMissing(ctx, entries...); err != nil {
				t.Fatal(err)
			}
			missing, err := c.MissingBlobs(ctx, ds)
			if err != nil || len(missing) != 0 {
				t.Fatalf("after upload: %d missing, %v", len(missing), err)
			}
			var small []digest.Digest
			for _, e := range entries {
				if e.Digest.Size < 1<<20 {
					small = append(small, e.Digest)
					continue
				}
				got, _, err := c.ReadBlob(ctx, e.Digest)
				if err != nil || !bytes.Equal(got, e.Contents) {
					t.Fatalf("read %v: %v", e.Digest, err)
				}
			}
			got, err := c.BatchDownloadBlobs(ctx, small)
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range entries {
				if e.Digest.Size < 1<<20 && !bytes.Equal(got[e.Digest], e.Contents) {
					t.Fatalf("batch read %v differs", e.Digest)
				}
			}
		})
	}
}

// TestCrashDuringUploads kills the server with SIGKILL while clients upload, restarts
// it, and checks that every blob it reports present is intact, and that no file in
// the store holds anything but the blob it is named for.
func TestCrashDuringUploads(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	srv := harness.StartServer(t)
	blobs := mixedBlobs(2, 200<<20)
	var ds []digest.Digest
	for _, b := range blobs {
		ds = append(ds, digest.NewFromBlob(b))
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			c, err := client.NewClient(ctx, "e2e", client.DialParams{Service: srv.Addr, NoSecurity: true}, client.RetryTransient(), client.UseBatchOps(w%2 == 0))
			if err != nil {
				return
			}
			defer c.Close()
			for i := w; i < len(blobs); i += 8 {
				if _, _, err := c.UploadIfMissing(ctx, uploadinfo.EntryFromBlob(blobs[i])); err != nil {
					return
				}
			}
		}(w)
	}
	// Kill once some blobs are stored but most are still on their way.
	casDir := filepath.Join(srv.Data, "store", "cas")
	for deadline := time.Now().Add(time.Minute); countFiles(casDir) < 10 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	srv.Kill()
	cancel()
	wg.Wait()

	// Every file under the CAS holds exactly the bytes its name promises.
	files := 0
	filepath.WalkDir(casDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		files++
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		io.Copy(h, f)
		f.Close()
		if hex.EncodeToString(h.Sum(nil)) != d.Name() {
			t.Errorf("store file %s does not match its name after a crash", p)
		}
		return nil
	})
	if files == 0 {
		t.Fatal("the crash came before any blob was stored; the test proves nothing")
	}

	srv.Restart(t)
	c := sdkClient(t, srv.Addr)
	rctx := harness.Context(t, 3*time.Minute)
	missing, err := c.MissingBlobs(rctx, ds)
	if err != nil {
		t.Fatal(err)
	}
	gone := map[digest.Digest]bool{}
	for _, d := range missing {
		gone[d] = true
	}
	present := 0
	for i, d := range ds {
		if gone[d] {
			continue
		}
		present++
		got, _, err := c.ReadBlob(rctx, d)
		if err != nil || !bytes.Equal(got, blobs[i]) {
			t.Fatalf("blob %v reported present after the crash but reads %v", d, err)
		}
	}
	if present == len(ds) {
		t.Fatalf("all %d blobs were stored before the kill; the crash did not land mid-upload", len(ds))
	}
	t.Logf("%d of %d blobs survived the crash, all intact; %d store files checked", present, len(ds), files)
}

func countFiles(dir string) int {
	n := 0
	filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			n++
		}
		return nil
	})
	return n
}
