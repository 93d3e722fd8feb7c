package toolchains

import (
	"bytes"
	"context"
	"golang.org/x/sys/unix"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const hexA = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"

func TestParseRef(t *testing.T) {
	d := digest.Digest("sha256:" + hexA)
	cases := []struct {
		in     string
		want   Ref
		code   codes.Code // OK when parsing succeeds
		pinned bool
	}{
		{in: "docker://kiln/busybox@sha256:" + hexA, want: Ref{Name: "kiln/busybox", Digest: d}, pinned: true},
		{in: "kiln/busybox@sha256:" + hexA, want: Ref{Name: "kiln/busybox", Digest: d}, pinned: true},
		{in: "sha256:" + hexA, want: Ref{Digest: d}, pinned: true},
		{in: "docker://sha256:" + hexA, want: Ref{Digest: d}, pinned: true},
		{in: "gcr.io/proj/img:1.2@sha256:" + hexA, want: Ref{Name: "gcr.io/proj/img", Tag: "1.2", Digest: d}, pinned: true},
		{in: "localhost:5000/x@sha256:" + hexA, want: Ref{Name: "localhost:5000/x", Digest: d}, pinned: true},
		{in: "debian:bookworm", want: Ref{Name: "debian", Tag: "bookworm"}},
		{in: "docker://debian:bookworm", want: Ref{Name: "debian", Tag: "bookworm"}},
		{in: "debian", want: Ref{Name: "debian"}},
		{in: "localhost:5000/x", want: Ref{Name: "localhost:5000/x"}},
		{in: "", code: codes.InvalidArgument},
		{in: "docker://", code: codes.InvalidArgument},
		{in: "sha256:abc", code: codes.InvalidArgument},
		{in: "sha256:" + strings.ToUpper(hexA), code: codes.InvalidArgument},
		{in: "sha512:" + hexA, code: codes.InvalidArgument},
		{in: "x@sha256:" + hexA[:10], code: codes.InvalidArgument},
		{in: "x@", code: codes.InvalidArgument},
		{in: "@sha256:" + hexA, code: codes.InvalidArgument},
		{in: "lower/UPPER", code: codes.InvalidArgument},
		{in: "sha384:" + hexA, code: codes.InvalidArgument},
		{in: "has space", code: codes.InvalidArgument},
		{in: " debian", code: codes.InvalidArgument},
		{in: "x@sha256:" + hexA + "@sha256:" + hexA, code: codes.InvalidArgument},
		{in: "http://example.com/x", code: codes.InvalidArgument},
	}
	for _, tc := range cases {
		r, err := ParseRef(tc.in)
		if status.Code(err) != tc.code {
			t.Errorf("ParseRef(%q): code %v (%v), want %v", tc.in, status.Code(err), err, tc.code)
			continue
		}
		if err != nil {
			continue
		}
		if r != tc.want || r.Pinned() != tc.pinned {
			t.Errorf("ParseRef(%q) = %+v (pinned %v), want %+v (pinned %v)", tc.in, r, r.Pinned(), tc.want, tc.pinned)
		}
	}
}

type mapPinner map[string]digest.Digest

func (m mapPinner) PinTag(_ context.Context, tag string) (digest.Digest, bool, error) {
	d, ok := m[tag]
	return d, ok, nil
}

// importTest imports the twoLayers image into s and returns it.
func importTest(t *testing.T, s *Store) Image {
	t.Helper()
	l1, l2 := twoLayers(t)
	im := makeImage(t, layer{tar: l1}, layer{tar: l2, gzip: true})
	src := filepath.Join(t.TempDir(), "layout")
	im.writeLayout(t, src, "kiln/test:1")
	imgs, err := s.Import(context.Background(), src, ImportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return imgs[0]
}

func TestResolve(t *testing.T) {
	ctx := context.Background()
	data := t.TempDir()
	s := openStore(t, data, Options{})
	img := importTest(t, s)
	d := img.Digest.String()
	absent := "sha256:" + hexA

	for _, ref := range []string{d, "kiln/test@" + d, "docker://kiln/test@" + d, "docker://other/name:tag@" + d} {
		got, err := s.Resolve(ctx, ref)
		if err != nil || got.Digest != img.Digest {
			t.Errorf("Resolve(%q) = %s, %v", ref, got.Digest, err)
		}
	}
	if got, _ := s.Resolve(ctx, "docker://other/name:tag@"+d); got.Name != "other/name:tag" {
		t.Errorf("name %q", got.Name)
	}
	errs := []struct {
		ref  string
		code codes.Code
		msg  string
	}{
		{"kiln/test:1", codes.FailedPrecondition, "unpinned"},
		{"docker://kiln/test", codes.FailedPrecondition, "unpinned"},
		{absent, codes.FailedPrecondition, "not in the store"},
		{"kiln/test@" + absent, codes.FailedPrecondition, "kiln toolchain import"},
		{"kiln/test@sha256:123", codes.InvalidArgument, "malformed"},
		{"", codes.FailedPrecondition, "no default toolchain"},
	}
	for _, e := range errs {
		_, err := s.Resolve(ctx, e.ref)
		if status.Code(err) != e.code || !strings.Contains(err.Error(), e.msg) {
			t.Errorf("Resolve(%q) = %v, want %v containing %q", e.ref, err, e.code, e.msg)
		}
	}

	// A default toolchain and a tag pinner.
	s2 := openStore(t, data, Options{Default: "kiln/test@" + d, Pinner: mapPinner{"kiln/test:1": img.Digest, "gone:1": digest.Digest(absent)}})
	if got, err := s2.Resolve(ctx, ""); err != nil || got.Digest != img.Digest {
		t.Errorf("default: %v %v", got.Digest, err)
	}
	if got, err := s2.Resolve(ctx, "docker://kiln/test:1"); err != nil || got.Digest != img.Digest {
		t.Errorf("pinned tag: %v %v", got.Digest, err)
	}
	if _, err := s2.Resolve(ctx, "kiln/test:2"); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("unpinned tag with a pinner: %v", err)
	}
	if _, err := s2.Resolve(ctx, "gone:1"); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "not in the store") {
		t.Errorf("pinned to an absent image: %v", err)
	}
}

// TestNewImportSeenWithoutReopen: a Store opened before another process (here another
// Store on the same data dir) imports an image resolves it at once.
func TestNewImportSeenWithoutReopen(t *testing.T) {
	ctx := context.Background()
	data := t.TempDir()
	server := openStore(t, data, Options{})
	if ents, _ := server.List(ctx); len(ents) != 0 {
		t.Fatal("fresh store not empty")
	}
	img := importTest(t, openStore(t, data, Options{}))
	got, err := server.Resolve(ctx, img.Digest.String())
	if err != nil || got.Digest != img.Digest {
		t.Fatalf("server does not see the new import: %v", err)
	}
	if _, err := server.RootFS(ctx, got); err != nil {
		t.Fatal(err)
	}
}

func TestBuildDeterministic(t *testing.T) {
	ctx := context.Background()
	mk := func(root string, order []int, mtime int64, uid int) {
		files := []func(){
			func() { must(t, os.MkdirAll(filepath.Join(root, "usr/bin"), 0o755)) },
			func() { must(t, os.WriteFile(filepath.Join(root, "usr/bin/cc"), []byte("compiler"), 0o755)) },
			func() { must(t, os.Symlink("usr/bin", filepath.Join(root, "bin"))) },
			func() { must(t, os.MkdirAll(filepath.Join(root, "empty"), 0o700)) },
			func() {
				long := strings.Repeat("long-name-", 15)
				must(t, os.MkdirAll(filepath.Join(root, "deep", long), 0o755))
				must(t, os.WriteFile(filepath.Join(root, "deep", long, long), []byte("deep"), 0o644))
			},
		}
		for _, i := range order {
			files[i]()
		}
		must(t, os.WriteFile(filepath.Join(root, "usr/bin/suid"), []byte("s"), 0o755))
		must(t, os.Chmod(filepath.Join(root, "usr/bin/suid"), 0o4755))
		must(t, os.Link(filepath.Join(root, "usr/bin/cc"), filepath.Join(root, "usr/bin/c++")))
		_ = filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
			if err == nil {
				_ = os.Lchown(p, uid, uid)
				if fi.Mode()&os.ModeSymlink == 0 {
					_ = os.Chtimes(p, timeUnix(mtime), timeUnix(mtime))
				}
			}
			return nil
		})
	}
	a, b := filepath.Join(t.TempDir(), "a"), filepath.Join(t.TempDir(), "elsewhere", "b")
	mk(a, []int{0, 1, 2, 3, 4}, 1000, 0)
	mk(b, []int{4, 3, 0, 2, 1}, 2000000000, 1234)

	s1 := openStore(t, t.TempDir(), Options{})
	s2 := openStore(t, t.TempDir(), Options{})
	i1, err := s1.Build(ctx, a, BuildOptions{Name: "kiln/det:1", Architecture: "amd64"})
	must(t, err)
	i1b, err := s1.Build(ctx, a, BuildOptions{Name: "kiln/det:2", Architecture: "amd64"})
	must(t, err)
	i2, err := s2.Build(ctx, b, BuildOptions{Architecture: "amd64"})
	must(t, err)
	if i1.Digest != i1b.Digest || i1.Digest != i2.Digest {
		t.Fatalf("build not deterministic: %s %s %s", i1.Digest, i1b.Digest, i2.Digest)
	}
	// Another epoch is another image; a content change too.
	i3, err := s2.Build(ctx, b, BuildOptions{Architecture: "amd64", Epoch: 1})
	must(t, err)
	must(t, os.WriteFile(filepath.Join(b, "usr/bin/cc"), []byte("compilex"), 0o755))
	i4, err := s2.Build(ctx, b, BuildOptions{Architecture: "amd64"})
	must(t, err)
	if i3.Digest == i1.Digest || i4.Digest == i1.Digest {
		t.Errorf("different input, same digest")
	}
	// Golden digest of a fixed tree: a change here means every built image changes
	// digest (tar encoding, config or manifest layout), which must be deliberate.
	g := filepath.Join(t.TempDir(), "golden")
	must(t, os.MkdirAll(filepath.Join(g, "bin"), 0o755))
	must(t, os.WriteFile(filepath.Join(g, "bin/hello"), []byte("#!/bin/sh\necho hello\n"), 0o755))
	must(t, os.Symlink("bin/hello", filepath.Join(g, "hello")))
	ig, err := s2.Build(ctx, g, BuildOptions{Architecture: "amd64"})
	must(t, err)
	const golden = "sha256:00616f4cb2c543debd3ddb5f6098048eb8abc4410c0f71891d8ac8a75a3faa23"
	if ig.Digest.String() != golden {
		t.Errorf("golden build digest %s, want %s", ig.Digest, golden)
	}

	// Names are informational: both names point at the one image.
	e, err := s1.Inspect(ctx, i1.Digest.String())
	must(t, err)
	if strings.Join(e.Names, ",") != "kiln/det:1,kiln/det:2" {
		t.Errorf("names %v", e.Names)
	}
	// An export lists the image once per name; the import verifies it once, keeps both.
	lay := filepath.Join(t.TempDir(), "two-names")
	must(t, s1.Export(ctx, i1.Digest.String(), lay))
	fresh := openStore(t, t.TempDir(), Options{})
	imgs, err := fresh.Import(ctx, lay, ImportOptions{})
	must(t, err)
	if e, _ := fresh.Inspect(ctx, i1.Digest.String()); len(imgs) != 1 || strings.Join(e.Names, ",") != "kiln/det:1,kiln/det:2" {
		t.Errorf("two-name import: %d images, names %v", len(imgs), e.Names)
	}
	// The unpacked build has the hard link and no setuid bit.
	root, err := s1.RootFS(ctx, i1)
	must(t, err)
	fi1, _ := os.Stat(filepath.Join(root, "usr/bin/cc"))
	fi2, _ := os.Stat(filepath.Join(root, "usr/bin/c++"))
	if !os.SameFile(fi1, fi2) {
		t.Errorf("hard link not preserved")
	}
	if fi, _ := os.Stat(filepath.Join(root, "usr/bin/suid")); fi.Mode()&os.ModeSetuid != 0 {
		t.Errorf("setuid kept in the root")
	}
}

func TestBuildRefusesDevices(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mknod needs root")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mknod", filepath.Join(dir, "null"), "c", "1", "3").CombinedOutput(); err != nil {
		t.Skipf("mknod: %v %s", err, out)
	}
	s := openStore(t, t.TempDir(), Options{})
	_, err := s.Build(context.Background(), dir, BuildOptions{})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "device node") {
		t.Fatalf("build with a device node: %v", err)
	}
	if left := leftovers(t, s); len(left) > 0 {
		t.Errorf("refused build left %v", left)
	}
}

func TestExportImportRoundTrip(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, t.TempDir(), Options{})
	img := importTest(t, s)
	for _, dest := range []string{filepath.Join(t.TempDir(), "out"), filepath.Join(t.TempDir(), "out.tar")} {
		must(t, s.Export(ctx, "kiln/test@"+img.Digest.String(), dest))
		fresh := openStore(t, t.TempDir(), Options{})
		imgs, err := fresh.Import(ctx, dest, ImportOptions{})
		must(t, err)
		if len(imgs) != 1 || imgs[0].Digest != img.Digest {
			t.Fatalf("%s re-imported as %v, want %s", dest, imgs, img.Digest)
		}
		e, _ := fresh.Inspect(ctx, img.Digest.String())
		if strings.Join(e.Names, ",") != "kiln/test:1" {
			t.Errorf("names after round trip: %v", e.Names)
		}
		// Every blob is bit-identical.
		for _, d := range append([]digest.Digest{img.Digest, img.Config.Digest}, img.Layers[0].Digest, img.Layers[1].Digest) {
			a, err1 := os.ReadFile(filepath.Join(s.dir, "content/blobs/sha256", d.Encoded()))
			b, err2 := os.ReadFile(filepath.Join(fresh.dir, "content/blobs/sha256", d.Encoded()))
			if err1 != nil || err2 != nil || !bytes.Equal(a, b) {
				t.Errorf("blob %s differs after round trip (%v %v)", d, err1, err2)
			}
		}
		// Exporting twice gives the same bytes (archives are deterministic).
		if strings.HasSuffix(dest, ".tar") {
			dest2 := dest + "2.tar"
			must(t, s.Export(ctx, img.Digest.String(), dest2))
			a, _ := os.ReadFile(dest)
			b, _ := os.ReadFile(dest2)
			if !bytes.Equal(a, b) {
				t.Errorf("two exports differ")
			}
		}
	}
	if err := s.Export(ctx, img.Digest.String(), t.TempDir()); status.Code(err) != codes.AlreadyExists {
		t.Errorf("export onto an existing dir: %v", err)
	}
}

// TestRootFSConcurrentUnpackOnce: many goroutines on two Store instances (which share
// nothing in memory, like two processes) ask for one root; it is unpacked once.
func TestRootFSConcurrentUnpackOnce(t *testing.T) {
	ctx := context.Background()
	data := t.TempDir()
	a, b := openStore(t, data, Options{}), openStore(t, data, Options{})
	img := importTest(t, a)
	var unpacks atomic.Int32
	a.onUnpack = func(digest.Digest) { unpacks.Add(1) }
	b.onUnpack = a.onUnpack
	var wg sync.WaitGroup
	dirs := make([]string, 16)
	errs := make([]error, 16)
	for i := range dirs {
		s := a
		if i%2 == 1 {
			s = b
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			dirs[i], errs[i] = s.RootFS(ctx, img)
		}()
	}
	wg.Wait()
	for i := range dirs {
		if errs[i] != nil || dirs[i] != dirs[0] {
			t.Fatalf("call %d: %q %v", i, dirs[i], errs[i])
		}
	}
	if n := unpacks.Load(); n != 1 {
		t.Fatalf("unpacked %d times, want 1", n)
	}
	checkRoot(t, dirs[0])
}

// TestRootFSRedoneAfterCrash: a root without its completion marker is discarded and
// unpacked again; a corrupted layer blob is detected, removed and reported.
func TestRootFSRedoneAfterCrash(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, t.TempDir(), Options{})
	img := importTest(t, s)
	root, err := s.RootFS(ctx, img)
	must(t, err)
	// Simulate a crash that left a partial root: marker gone, a file missing.
	must(t, os.Remove(filepath.Join(filepath.Dir(root), completeFile)))
	must(t, os.Remove(filepath.Join(root, "opaque/new")))
	var n atomic.Int32
	s.onUnpack = func(digest.Digest) { n.Add(1) }
	root2, err := s.RootFS(ctx, img)
	must(t, err)
	if root2 != root || n.Load() != 1 {
		t.Fatalf("root %q, unpacks %d", root2, n.Load())
	}
	checkRoot(t, root2)
	// A second call is served from the marker.
	_, err = s.RootFS(ctx, img)
	must(t, err)
	if n.Load() != 1 {
		t.Fatalf("complete root unpacked again")
	}

	// Corrupt a stored layer, drop the root: the unpack detects it and removes the blob.
	must(t, removeTree(filepath.Dir(root)))
	p := filepath.Join(s.dir, "content/blobs/sha256", img.Layers[0].Digest.Encoded())
	must(t, os.Chmod(p, 0o644))
	b, err := os.ReadFile(p)
	must(t, err)
	b[700] ^= 1
	must(t, os.WriteFile(p, b, 0o644))
	_, err = s.RootFS(ctx, img)
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "corrupt") {
		t.Fatalf("corrupt layer: %v", err)
	}
	if _, err := os.Stat(p); !os.IsNotExist(err) {
		t.Errorf("corrupt blob not removed")
	}
	if ents, _ := os.ReadDir(filepath.Join(s.dir, "roots")); len(ents) != 0 {
		t.Errorf("failed unpack left %v", ents)
	}
}

func TestRemoveAndGC(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, t.TempDir(), Options{})
	img := importTest(t, s)
	keepDir := t.TempDir()
	must(t, os.WriteFile(filepath.Join(keepDir, "f"), []byte("keep"), 0o644))
	keep, err := s.Build(ctx, keepDir, BuildOptions{Name: "kiln/keep:1"})
	must(t, err)
	_, err = s.RootFS(ctx, img)
	must(t, err)
	keepRoot, err := s.RootFS(ctx, keep)
	must(t, err)
	if left := leftovers(t, s); len(left) == 0 {
		t.Fatal("leftovers() finds nothing in a populated store")
	}
	// Leftovers of a crashed unpack and a crashed import.
	must(t, os.MkdirAll(filepath.Join(s.dir, "roots", ".tmp-"+img.Digest.Encoded()+"-dead", "rootfs"), 0o755))
	must(t, os.MkdirAll(filepath.Join(s.dir, "tmp", "deadbeef", "blobs"), 0o755))

	st, err := s.GC(ctx)
	must(t, err)
	if st.Roots != 1 || st.Blobs != 0 || st.Staging != 1 {
		t.Errorf("gc before rm: %+v", st)
	}
	removed, err := s.Remove(ctx, "kiln/test@"+img.Digest.String())
	must(t, err)
	if removed.Digest != img.Digest {
		t.Errorf("removed %s", removed.Digest)
	}
	if _, err := s.Resolve(ctx, img.Digest.String()); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("resolve after rm: %v", err)
	}
	if _, err := s.Remove(ctx, img.Digest.String()); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("second rm: %v", err)
	}
	st, err = s.GC(ctx)
	must(t, err)
	if st.Roots != 1 || st.Blobs != 4 || st.BlobBytes != img.Size {
		t.Errorf("gc after rm: %+v (image size %d)", st, img.Size)
	}
	ents, err := s.List(ctx)
	must(t, err)
	if len(ents) != 1 || ents[0].Digest != keep.Digest || ents[0].RootFS != keepRoot || strings.Join(ents[0].Names, ",") != "kiln/keep:1" {
		t.Errorf("after gc: %+v", ents)
	}
	if _, err := os.Stat(filepath.Join(keepRoot, "f")); err != nil {
		t.Errorf("kept root damaged: %v", err)
	}
	if _, err := os.Stat(filepath.Join(s.dir, "names", "kiln%2Ftest:1.json")); !os.IsNotExist(err) {
		t.Errorf("name of removed image kept: %v", err)
	}
	// The kept image still exports and unpacks.
	must(t, s.Export(ctx, keep.Digest.String(), filepath.Join(t.TempDir(), "k")))
}

// TestGCKeepsMountedRoot: gc does not delete the root of a removed image while an
// overlay (as a running kiln's sandboxes mount them) still uses it, and deletes it
// once unmounted.
func TestGCKeepsMountedRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting an overlay needs root")
	}
	ctx := context.Background()
	// The data dir is reached through a symlink, as under a symlinked /var/lib.
	link := filepath.Join(t.TempDir(), "data-link")
	must(t, os.Symlink(t.TempDir(), link))
	s := openStore(t, link, Options{})
	img := importTest(t, s)
	root, err := s.RootFS(ctx, img)
	must(t, err)
	// The kernel shows a layer passed by descriptor (the sandbox's way on 6.13+) as its
	// resolved path; mount it that way.
	layer, err := filepath.EvalSymlinks(root)
	must(t, err)
	work := t.TempDir() // a path with a space, which mountinfo escapes
	skel, target := filepath.Join(work, "sk el"), filepath.Join(work, "mnt")
	must(t, os.MkdirAll(skel, 0o755))
	must(t, os.MkdirAll(target, 0o755))
	opts := "lowerdir+=" + skel + ",lowerdir+=" + layer
	if err := unix.Mount("overlay", target, "overlay", unix.MS_RDONLY, opts); err != nil {
		// Kernels before 6.8 take the layers as one string.
		must(t, unix.Mount("overlay", target, "overlay", unix.MS_RDONLY, "lowerdir="+skel+":"+layer))
	}
	mounted := true
	defer func() {
		if mounted {
			unix.Unmount(target, unix.MNT_DETACH)
		}
	}()
	_, err = s.Remove(ctx, img.Digest.String())
	must(t, err)
	st, err := s.GC(ctx)
	must(t, err)
	if st.Roots != 0 || st.InUse != 1 {
		t.Fatalf("gc with the root mounted: %+v, want it kept as in use", st)
	}
	if _, err := os.Stat(root); err != nil {
		t.Fatalf("gc removed a mounted root: %v", err)
	}
	must(t, unix.Unmount(target, 0))
	mounted = false
	st, err = s.GC(ctx)
	must(t, err)
	if st.Roots != 1 || st.InUse != 0 {
		t.Fatalf("gc after unmount: %+v, want the root removed", st)
	}
	if _, err := os.Stat(root); !os.IsNotExist(err) {
		t.Fatalf("root of a removed, unmounted image still there: %v", err)
	}
}

func TestUnescapeMount(t *testing.T) {
	for in, want := range map[string]string{`/a\040b`: "/a b", `/x\134y`: `/x\y`, `/plain`: "/plain", `/trail\04`: `/trail\04`} {
		if got := unescapeMount(in); got != want {
			t.Errorf("unescapeMount(%q) = %q, want %q", in, got, want)
		}
	}
}
