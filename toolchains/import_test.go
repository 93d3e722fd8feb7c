package toolchains

import (
	"archive/tar"
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// twoLayers is the hand-made test image: layer 1 creates files, layer 2 (gzip) deletes
// one with a whiteout, makes a directory opaque and adds files.
func twoLayers(t testing.TB) (l1, l2 []byte) {
	l1 = tarBytes(t, []entry{
		dir("bin/", 0o755),
		{name: "bin/tool", typ: tar.TypeReg, mode: 0o4755, body: "#!/bin/sh\necho tool\n", uid: 1000, gid: 1000},
		symlink("bin/link", "tool"),
		dir("etc/", 0o755),
		file("etc/gone", "to be whited out\n", 0o644),
		file("etc/keep", "kept\n", 0o640),
		{name: "etc/keep-hard", typ: tar.TypeLink, mode: 0o640, link: "etc/keep"},
		{name: "etc/xattr", typ: tar.TypeReg, mode: 0o644, body: "x\n",
			pax: map[string]string{"SCHILY.xattr.user.kiln": "v"}},
		dir("opaque/", 0o755),
		file("opaque/old", "old\n", 0o644),
		dir("opaque/sub/", 0o755),
		file("opaque/sub/older", "older\n", 0o644),
		dir("tmp/", 0o1777),
		{name: "setgid-dir/", typ: tar.TypeDir, mode: 0o2775},
	})
	l2 = tarBytes(t, []entry{
		file("etc/.wh.gone", "", 0o644),
		file("opaque/.wh..wh..opq", "", 0o644),
		file("opaque/new", "new\n", 0o600),
		file("bin/tool2", "two\n", 0o755),
	})
	return l1, l2
}

// checkRoot asserts the unpacked root of the twoLayers image.
func checkRoot(t *testing.T, root string) {
	t.Helper()
	read := func(p string) string {
		b, err := os.ReadFile(filepath.Join(root, p))
		if err != nil {
			t.Errorf("read %s: %v", p, err)
		}
		return string(b)
	}
	absent := func(p string) {
		if _, err := os.Lstat(filepath.Join(root, p)); !os.IsNotExist(err) {
			t.Errorf("%s should not exist (err %v)", p, err)
		}
	}
	mode := func(p string, want os.FileMode) {
		fi, err := os.Lstat(filepath.Join(root, p))
		if err != nil {
			t.Errorf("stat %s: %v", p, err)
			return
		}
		if got := fi.Mode() & (os.ModePerm | os.ModeSetuid | os.ModeSetgid | os.ModeSticky); got != want {
			t.Errorf("%s mode %v, want %v", p, got, want)
		}
		st := fi.Sys().(*syscall.Stat_t)
		if os.Geteuid() == 0 && (st.Uid != 0 || st.Gid != 0) {
			t.Errorf("%s owned by %d:%d, want 0:0", p, st.Uid, st.Gid)
		}
	}
	if got := read("bin/tool"); got != "#!/bin/sh\necho tool\n" {
		t.Errorf("bin/tool = %q", got)
	}
	mode("bin/tool", 0o755) // setuid stripped, owner 0
	if l, err := os.Readlink(filepath.Join(root, "bin/link")); err != nil || l != "tool" {
		t.Errorf("bin/link -> %q, %v", l, err)
	}
	absent("etc/gone")
	absent("etc/.wh.gone")
	mode("etc/keep", 0o640)
	var a, b syscall.Stat_t
	must(t, syscall.Stat(filepath.Join(root, "etc/keep"), &a))
	must(t, syscall.Stat(filepath.Join(root, "etc/keep-hard"), &b))
	if a.Ino != b.Ino {
		t.Errorf("etc/keep-hard is not a hard link of etc/keep")
	}
	if sz, _ := unix.Llistxattr(filepath.Join(root, "etc/xattr"), nil); sz > 0 {
		t.Errorf("etc/xattr kept extended attributes")
	}
	absent("opaque/old")
	absent("opaque/sub")
	absent("opaque/.wh..wh..opq")
	if got := read("opaque/new"); got != "new\n" {
		t.Errorf("opaque/new = %q", got)
	}
	mode("opaque/new", 0o600)
	if got := read("bin/tool2"); got != "two\n" {
		t.Errorf("bin/tool2 = %q", got)
	}
	mode("tmp", os.ModeSticky|0o775) // world-write stripped
	mode("setgid-dir", 0o775)        // setgid stripped
	mode(".", 0o755)
}

func TestImportLayoutTwoLayersWhiteouts(t *testing.T) {
	ctx := context.Background()
	l1, l2 := twoLayers(t)
	im := makeImage(t, layer{tar: l1}, layer{tar: l2, gzip: true})
	src := filepath.Join(t.TempDir(), "layout")
	im.writeLayout(t, src, "kiln/test:1")

	s := openStore(t, t.TempDir(), Options{})
	imgs, err := s.Import(ctx, src, ImportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(imgs) != 1 || imgs[0].Digest != im.manifest.Digest {
		t.Fatalf("imported %+v, want manifest %s", imgs, im.manifest.Digest)
	}
	e, err := s.Inspect(ctx, "docker://kiln/test@"+im.manifest.Digest.String())
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(e.Names, ",") != "kiln/test:1" || e.RootFS != "" || len(e.Layers) != 2 {
		t.Errorf("inspect: %+v", e)
	}
	root, err := s.RootFS(ctx, imgs[0])
	if err != nil {
		t.Fatal(err)
	}
	checkRoot(t, root)
	if e, _ := s.Inspect(ctx, im.manifest.Digest.String()); e.RootFS != root {
		t.Errorf("inspect after unpack: rootfs %q, want %q", e.RootFS, root)
	}
}

func TestImportOCIArchiveAndDockerSave(t *testing.T) {
	ctx := context.Background()
	l1, l2 := twoLayers(t)
	tmp := t.TempDir()

	// OCI archive: a tar of the layout.
	im := makeImage(t, layer{tar: l1}, layer{tar: l2, gzip: true})
	im.writeLayout(t, filepath.Join(tmp, "layout"), "")
	tarDir(t, filepath.Join(tmp, "layout"), filepath.Join(tmp, "oci.tar"))
	s := openStore(t, t.TempDir(), Options{})
	imgs, err := s.Import(ctx, filepath.Join(tmp, "oci.tar"), ImportOptions{Name: "kiln/archive:2"})
	if err != nil {
		t.Fatal(err)
	}
	if len(imgs) != 1 || imgs[0].Digest != im.manifest.Digest {
		t.Fatalf("imported %+v, want %s", imgs, im.manifest.Digest)
	}
	root, err := s.RootFS(ctx, imgs[0])
	if err != nil {
		t.Fatal(err)
	}
	checkRoot(t, root)

	// docker save (legacy layout: manifest.json + layer.tar files).
	writeDockerSave(t, filepath.Join(tmp, "docker.tar"), "kiln/docker:3", l1, l2)
	s2 := openStore(t, t.TempDir(), Options{})
	imgs, err = s2.Import(ctx, filepath.Join(tmp, "docker.tar"), ImportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(imgs) != 1 {
		t.Fatalf("imported %d images", len(imgs))
	}
	e, err := s2.Inspect(ctx, imgs[0].Digest.String())
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(e.Names, ",") != "docker.io/kiln/docker:3" {
		t.Errorf("names %v", e.Names)
	}
	root, err = s2.RootFS(ctx, imgs[0])
	if err != nil {
		t.Fatal(err)
	}
	checkRoot(t, root)

	// Re-importing the same docker-save tar gives the same digest (deterministic).
	again, err := s2.Import(ctx, filepath.Join(tmp, "docker.tar"), ImportOptions{})
	if err != nil || again[0].Digest != imgs[0].Digest {
		t.Errorf("re-import: %v %v", again, err)
	}
}

// TestImportRefusedLeavesNothing: damaged images are refused with INVALID_ARGUMENT and
// nothing is left in the store.
func TestImportRefusedLeavesNothing(t *testing.T) {
	ctx := context.Background()
	l1, l2 := twoLayers(t)

	layoutWith := func(t *testing.T, mutate func(t *testing.T, dir string, im *testImage)) string {
		im := makeImage(t, layer{tar: l1}, layer{tar: l2, gzip: true})
		dir := filepath.Join(t.TempDir(), "layout")
		im.writeLayout(t, dir, "kiln/bad:1")
		mutate(t, dir, im)
		return dir
	}
	blob := func(dir string, d digest.Digest) string { return filepath.Join(dir, "blobs", "sha256", d.Encoded()) }
	flip := func(t *testing.T, p string, at int) {
		b, err := os.ReadFile(p)
		must(t, err)
		if at < 0 {
			at = len(b) + at
		}
		b[at] ^= 0x20
		must(t, os.WriteFile(p, b, 0o644))
	}

	cases := []struct {
		name string
		src  func(t *testing.T) string
		want string
	}{
		{"flipped byte in gzip layer", func(t *testing.T) string {
			return layoutWith(t, func(t *testing.T, dir string, im *testImage) { flip(t, blob(dir, im.layers[1].Digest), 40) })
		}, "does not match its digest"},
		{"flipped byte in tar layer", func(t *testing.T) string {
			return layoutWith(t, func(t *testing.T, dir string, im *testImage) { flip(t, blob(dir, im.layers[0].Digest), 600) })
		}, "does not match its digest"},
		{"wrong manifest digest", func(t *testing.T) string {
			return layoutWith(t, func(t *testing.T, dir string, im *testImage) {
				// index.json names a digest whose blob holds other bytes.
				wrong := digest.FromString("not the manifest")
				must(t, os.Rename(blob(dir, im.manifest.Digest), blob(dir, wrong)))
				idx, err := os.ReadFile(filepath.Join(dir, "index.json"))
				must(t, err)
				idx = bytes.ReplaceAll(idx, []byte(im.manifest.Digest.Encoded()), []byte(wrong.Encoded()))
				must(t, os.WriteFile(filepath.Join(dir, "index.json"), idx, 0o644))
			})
		}, "does not match its digest"},
		{"missing layer", func(t *testing.T) string {
			return layoutWith(t, func(t *testing.T, dir string, im *testImage) { must(t, os.Remove(blob(dir, im.layers[1].Digest))) })
		}, "missing from the source"},
		{"truncated OCI archive", func(t *testing.T) string {
			dir := layoutWith(t, func(*testing.T, string, *testImage) {})
			out := filepath.Join(t.TempDir(), "oci.tar")
			tarDir(t, dir, out)
			b, err := os.ReadFile(out)
			must(t, err)
			must(t, os.WriteFile(out, b[:len(b)/2+100], 0o644))
			return out
		}, "not a readable OCI archive"},
		{"truncated docker-save tar", func(t *testing.T) string {
			out := filepath.Join(t.TempDir(), "docker.tar")
			writeDockerSave(t, out, "kiln/x:1", l1, l2)
			b, err := os.ReadFile(out)
			must(t, err)
			must(t, os.WriteFile(out, b[:len(b)-1500], 0o644))
			return out
		}, "image refused"},
		{"diff_id mismatch", func(t *testing.T) string {
			other := tarBytes(t, []entry{file("x", "y", 0o644)})
			im := makeImage(t, layer{tar: l1})
			// A config whose diff_id is of another tar, with a matching manifest.
			bad := makeImage(t, layer{tar: other})
			cfg := bad.blobs[bad.config.Digest]
			im.blobs[bad.config.Digest] = cfg
			delete(im.blobs, im.config.Digest)
			delete(im.blobs, im.manifest.Digest)
			im.config = bad.config
			mf := jsonBlob(t, ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest, Config: bad.config, Layers: im.layers})
			im.manifest = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(mf), Size: int64(len(mf))}
			im.blobs[im.manifest.Digest] = mf
			dir := filepath.Join(t.TempDir(), "layout")
			im.writeLayout(t, dir, "")
			return dir
		}, "does not match the config's diff_id"},
		{"device node", func(t *testing.T) string {
			im := makeImage(t, layer{tar: tarBytes(t, []entry{{name: "dev/null", typ: tar.TypeChar, mode: 0o666}})})
			dir := filepath.Join(t.TempDir(), "layout")
			im.writeLayout(t, dir, "")
			return dir
		}, "device node"},
		{"dot-dot path", func(t *testing.T) string {
			im := makeImage(t, layer{tar: tarBytes(t, []entry{file("../../escape", "x", 0o644)})})
			dir := filepath.Join(t.TempDir(), "layout")
			im.writeLayout(t, dir, "")
			return dir
		}, "unsafe path"},
		{"hard link out of the root", func(t *testing.T) string {
			im := makeImage(t, layer{tar: tarBytes(t, []entry{hardlink("passwd", "../../../etc/passwd")})})
			dir := filepath.Join(t.TempDir(), "layout")
			im.writeLayout(t, dir, "")
			return dir
		}, "points outside the root"},
		{"not an image", func(t *testing.T) string {
			p := filepath.Join(t.TempDir(), "junk")
			must(t, os.WriteFile(p, []byte("hello"), 0o644))
			return p
		}, "not a readable OCI archive"},
		{"no such path", func(t *testing.T) string { return filepath.Join(t.TempDir(), "nope") }, "no such file"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := openStore(t, t.TempDir(), Options{})
			imgs, err := s.Import(ctx, tc.src(t), ImportOptions{})
			if err == nil {
				t.Fatalf("import succeeded: %+v", imgs)
			}
			if status.Code(err) != codes.InvalidArgument {
				t.Errorf("code %v, want InvalidArgument: %v", status.Code(err), err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not say %q", err, tc.want)
			}
			if left := leftovers(t, s); len(left) > 0 {
				t.Errorf("refused import left %v", left)
			}
			if ents, _ := s.List(ctx); len(ents) != 0 {
				t.Errorf("store lists %d images", len(ents))
			}
		})
	}
}

// TestUnpackSymlinkEscape: a layer symlink pointing out of the root followed by a
// later entry written "through" it must land inside the root, never on the host.
func TestUnpackSymlinkEscape(t *testing.T) {
	ctx := context.Background()
	host := t.TempDir()
	l1 := tarBytes(t, []entry{symlink("evil", host), symlink("up", "../../../../..")})
	l2 := tarBytes(t, []entry{file("evil/pwned", "x", 0o644), file("up/tmp/pwned2", "y", 0o644)})
	im := makeImage(t, layer{tar: l1}, layer{tar: l2})
	src := filepath.Join(t.TempDir(), "layout")
	im.writeLayout(t, src, "")
	s := openStore(t, t.TempDir(), Options{})
	imgs, err := s.Import(ctx, src, ImportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	root, err := s.RootFS(ctx, imgs[0])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(host, "pwned")); err == nil {
		t.Fatal("layer wrote through a symlink onto the host")
	}
	if _, err := os.Stat("/tmp/pwned2"); err == nil {
		t.Fatal("layer wrote through a ../ symlink onto the host")
	}
	if b, err := os.ReadFile(filepath.Join(root, host, "pwned")); err != nil || string(b) != "x" {
		t.Errorf("pwned not confined to the root: %v", err)
	}
}

func TestImportIndexSelectsPlatform(t *testing.T) {
	ctx := context.Background()
	amd := makeImage(t, layer{tar: tarBytes(t, []entry{file("arch", "amd64", 0o644)})})
	arm := makeImage(t, layer{tar: tarBytes(t, []entry{file("arch", "arm64", 0o644)})})
	dir := filepath.Join(t.TempDir(), "layout")
	amd.writeLayout(t, dir, "")
	for d, b := range arm.blobs {
		must(t, os.WriteFile(filepath.Join(dir, "blobs", "sha256", d.Encoded()), b, 0o644))
	}
	ad, rd := amd.manifest, arm.manifest
	ad.Platform = &ocispec.Platform{OS: "linux", Architecture: "amd64"}
	rd.Platform = &ocispec.Platform{OS: "linux", Architecture: "arm64"}
	inner := jsonBlob(t, ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{rd, ad}})
	innerD := digest.FromBytes(inner)
	must(t, os.WriteFile(filepath.Join(dir, "blobs", "sha256", innerD.Encoded()), inner, 0o644))
	top := jsonBlob(t, ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, Manifests: []ocispec.Descriptor{{MediaType: ocispec.MediaTypeImageIndex, Digest: innerD, Size: int64(len(inner))}}})
	must(t, os.WriteFile(filepath.Join(dir, "index.json"), top, 0o644))

	s := openStore(t, t.TempDir(), Options{Platform: &ocispec.Platform{OS: "linux", Architecture: "arm64"}})
	imgs, err := s.Import(ctx, dir, ImportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if imgs[0].Digest != arm.manifest.Digest {
		t.Fatalf("imported %s, want the arm64 manifest %s", imgs[0].Digest, arm.manifest.Digest)
	}
	// The index digest resolves to the selected manifest.
	img, err := s.Resolve(ctx, "example.com/multi@"+innerD.String())
	if err != nil || img.Digest != arm.manifest.Digest {
		t.Fatalf("resolve index digest: %v %v", img.Digest, err)
	}
	e, _ := s.Inspect(ctx, innerD.String())
	if len(e.Indexes) != 1 || e.Indexes[0] != innerD {
		t.Errorf("indexes %v", e.Indexes)
	}
}
