package toolchains

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// BenchmarkUnpack compares RootFS (verify digests + containerd Apply + policy + syncfs)
// with GNU tar extracting the same uncompressed layer, the peer, in the same run; it
// reports the ratio kiln/tar. Run: go test -bench Unpack -benchtime 5x ./toolchains
func BenchmarkUnpack(b *testing.B) {
	if _, err := exec.LookPath("tar"); err != nil {
		b.Skip("no tar")
	}
	// ~2000 files of 4-64 KiB in 40 directories: a small toolchain's shape.
	var ents []entry
	for d := 0; d < 40; d++ {
		ents = append(ents, dir(fmt.Sprintf("usr/lib/d%02d/", d), 0o755))
		for f := 0; f < 50; f++ {
			body := bytes.Repeat([]byte{byte(d), byte(f)}, 2048*(1+(d*f)%16))
			ents = append(ents, file(fmt.Sprintf("usr/lib/d%02d/f%02d.so", d, f), string(body), 0o644))
		}
	}
	ents = append([]entry{dir("usr/", 0o755), dir("usr/lib/", 0o755)}, ents...)
	layerTar := tarBytes(b, ents)
	im := makeImage(b, layer{tar: layerTar})
	src := filepath.Join(b.TempDir(), "layout")
	im.writeLayout(b, src, "")
	s := openStore(b, b.TempDir(), Options{})
	imgs, err := s.Import(context.Background(), src, ImportOptions{})
	if err != nil {
		b.Fatal(err)
	}
	tarFile := filepath.Join(src, "blobs", "sha256", im.layers[0].Digest.Encoded())
	b.SetBytes(int64(len(layerTar)))

	var kilnTime, tarTime time.Duration
	for i := 0; i < b.N; i++ {
		must(b, removeTree(s.rootDir(imgs[0].Digest)))
		t0 := time.Now()
		if _, err := s.RootFS(context.Background(), imgs[0]); err != nil {
			b.Fatal(err)
		}
		kilnTime += time.Since(t0)

		out := filepath.Join(b.TempDir(), "x")
		must(b, os.MkdirAll(out, 0o755))
		t0 = time.Now()
		if o, err := exec.Command("tar", "-xf", tarFile, "-C", out).CombinedOutput(); err != nil {
			b.Fatalf("tar: %v %s", err, o)
		}
		if o, err := exec.Command("sync", "-f", out).CombinedOutput(); err != nil {
			b.Fatalf("sync: %v %s", err, o)
		}
		tarTime += time.Since(t0)
	}
	b.ReportMetric(float64(kilnTime)/float64(tarTime), "kiln/tar")
	b.ReportMetric(float64(kilnTime.Milliseconds())/float64(b.N), "kiln-ms/op")
	b.ReportMetric(float64(tarTime.Milliseconds())/float64(b.N), "tar-ms/op")
}
