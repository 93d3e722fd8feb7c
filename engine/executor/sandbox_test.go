package executor

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/kilnbuild/kiln/sandbox"
)

// TestChownExecRoot: a uid variation gets what the default sandbox user owned;
// root-owned inputs stay root's.
func TestChownExecRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to chown")
	}
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "out/sub"), 0o755)
	os.WriteFile(filepath.Join(root, "in.txt"), []byte("x"), 0o444)
	os.Symlink("in.txt", filepath.Join(root, "link"))
	for _, p := range []string{"", "out", "out/sub", "link"} {
		os.Lchown(filepath.Join(root, p), sandbox.DefaultUID, sandbox.DefaultGID)
	}
	if err := chownExecRoot(root, 2111, 2234); err != nil {
		t.Fatal(err)
	}
	owner := func(p string) (uint32, uint32) {
		var st syscall.Stat_t
		syscall.Lstat(filepath.Join(root, p), &st)
		return st.Uid, st.Gid
	}
	for _, p := range []string{"", "out", "out/sub", "link"} {
		if u, g := owner(p); u != 2111 || g != 2234 {
			t.Errorf("%q owned by %d:%d", p, u, g)
		}
	}
	if u, _ := owner("in.txt"); u != 0 {
		t.Errorf("input handed to uid %d", u)
	}
	if err := chownExecRoot(root, 0, 0); err != nil { // the defaults: nothing to do
		t.Fatal(err)
	}
}
