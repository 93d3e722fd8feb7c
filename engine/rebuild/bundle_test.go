package rebuild

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// rawHeader is one ustar header block, written by hand: archive/tar will not write the
// PAX records an attacker would.
func rawHeader(name string, typ byte, size int) []byte {
	h := make([]byte, 512)
	copy(h[0:], name)
	copy(h[100:], "0000644\x00")
	copy(h[108:], "0000000\x00")
	copy(h[116:], "0000000\x00")
	copy(h[124:], fmt.Sprintf("%011o\x00", size))
	copy(h[136:], "00000000000\x00")
	h[156] = typ
	copy(h[257:], "ustar\x0000")
	copy(h[148:], "        ")
	sum := 0
	for _, b := range h {
		sum += int(b)
	}
	copy(h[148:], fmt.Sprintf("%06o\x00 ", sum))
	return h
}

func pad(b []byte) []byte { return append(b, make([]byte, (512-len(b)%512)%512)...) }

func paxRecord(k, v string) string {
	rec := " " + k + "=" + v + "\n"
	n := len(rec)
	for len(fmt.Sprint(n))+len(rec) != n {
		n = len(fmt.Sprint(n)) + len(rec)
	}
	return fmt.Sprint(n) + rec
}

// TestExtractRefusesSparseBomb: a few hundred bytes of tar whose PAX records make
// archive/tar expand a terabyte of holes are refused before anything is written.
func TestExtractRefusesSparseBomb(t *testing.T) {
	pax := paxRecord("GNU.sparse.major", "1") + paxRecord("GNU.sparse.minor", "0") +
		paxRecord("GNU.sparse.name", "big") + paxRecord("GNU.sparse.realsize", fmt.Sprint(int64(1)<<40))
	var b bytes.Buffer
	b.Write(rawHeader("PaxHeaders/big", tar.TypeXHeader, len(pax)))
	b.Write(pad([]byte(pax)))
	sparseMap := pad([]byte("1\n0\n0\n"))
	b.Write(rawHeader("big", tar.TypeReg, len(sparseMap)))
	b.Write(sparseMap)
	b.Write(make([]byte, 1024))
	path := filepath.Join(t.TempDir(), "bomb.tar")
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	f, _ := os.Open(path)
	h, err := tar.NewReader(f).Next()
	f.Close()
	if err != nil || h.Size != 1<<40 {
		t.Fatalf("the crafted entry does not read as a 1 TiB file: %v %+v", err, h)
	}
	// Refused as sparse, even under a bound it would fit.
	if err := extractTar(path, dir, 1<<41); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("sparse bomb: %v, want INVALID_ARGUMENT", err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("a refused bundle left %v", ents)
	}
}

// TestExtractBoundsAndZstd: a bundle written by writeTar (plain or .tar.zst) unpacks to
// the same files; a bound smaller than its contents refuses it.
func TestExtractBoundsAndZstd(t *testing.T) {
	src := t.TempDir()
	if err := os.MkdirAll(filepath.Join(src, "cas", "ab"), 0o755); err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{"bundle.json": []byte(`{"version":1}`), "cas/ab/blob": bytes.Repeat([]byte("kiln "), 4000)}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(src, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, compressed := range []bool{false, true} {
		out := filepath.Join(t.TempDir(), "b.tar")
		if compressed {
			out += ".zst"
		}
		if err := writeTar(src, out, compressed); err != nil {
			t.Fatal(err)
		}
		dir := t.TempDir()
		if err := extractTar(out, dir, DefaultMaxBundleBytes); err != nil {
			t.Fatalf("compressed=%v: %v", compressed, err)
		}
		for name, data := range files {
			if got, err := os.ReadFile(filepath.Join(dir, name)); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("compressed=%v: %s: %v", compressed, name, err)
			}
		}
		if err := extractTar(out, t.TempDir(), 10_000); status.Code(err) != codes.InvalidArgument {
			t.Fatalf("compressed=%v: 20 KB bundle under a 10 KB bound: %v, want INVALID_ARGUMENT", compressed, err)
		}
	}
}

// TestExportNamesMissingBlobs: exporting an action whose input blob is gone fails
// naming that blob (the wrap that adds "input tree of action" keeps the violations).
func TestExportNamesMissingBlobs(t *testing.T) {
	ctx := context.Background()
	cas := cache.NewMemoryStore()
	gone := cache.DigestOf([]byte("evicted input"))
	root, _ := cache.PutProto(ctx, cas, &repb.Directory{Files: []*repb.FileNode{{Name: "in", Digest: gone.Proto()}}})
	cmd, _ := cache.PutProto(ctx, cas, &repb.Command{Arguments: []string{"true"}})
	ad, _ := cache.PutProto(ctx, cas, &repb.Action{CommandDigest: cmd.Proto(), InputRootDigest: root.Proto()})
	_, err := actionBlobs(ctx, cas, ad)
	if got := cache.MissingFromError(err); status.Code(err) != codes.FailedPrecondition || len(got) != 1 || got[0] != gone {
		t.Fatalf("err %v, missing %v; want FAILED_PRECONDITION naming %s", err, got, gone)
	}
}
