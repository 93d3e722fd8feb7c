package sandbox_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnbuild/kiln/sandbox"
)

// TestLongPaths: data dirs with long paths work. fsconfig caps a string value at 256
// bytes, so an overlay given "upper:lower" as one string failed with EINVAL once the
// two paths together passed that.
func TestLongPaths(t *testing.T) {
	need(t)
	long := filepath.Join(t.TempDir(), strings.Repeat("d", 120), strings.Repeat("e", 120))
	rootfs := filepath.Join(long, "rootfs")
	if err := os.MkdirAll(filepath.Dir(rootfs), 0o755); err != nil {
		t.Fatal(err)
	}
	// A real directory at the long path: copy the busybox root by hardlinks.
	if err := filepath.Walk(env.rootfs, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(env.rootfs, p)
		dst := filepath.Join(rootfs, rel)
		switch {
		case info.IsDir():
			return os.MkdirAll(dst, info.Mode().Perm())
		case info.Mode()&os.ModeSymlink != 0:
			l, _ := os.Readlink(p)
			return os.Symlink(l, dst)
		default:
			return os.Link(p, dst)
		}
	}); err != nil {
		t.Fatal(err)
	}
	r, err := sandbox.New(context.Background(), testConfig(sandbox.Config{StateDir: filepath.Join(long, "state")}))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if len(rootfs)+len(filepath.Join(long, "state")) < 300 {
		t.Fatalf("paths too short to test the fsconfig limit")
	}
	o := run(t, r, func(s *sandbox.Spec) { s.RootFS = rootfs }, "/bin/sh", "-c", "echo ok")
	if o.res.ExitCode != 0 || strings.TrimSpace(o.stdout) != "ok" {
		t.Fatalf("run with long paths: %+v %q %q", o.res, o.stdout, o.stderr)
	}
}
