package test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnbuild/kiln/test/harness"
)

// TestToolchainRootIsReadOnly: an action on the busybox toolchain image sees that image
// as its root and cannot write it, and the unpacked image on the host is unchanged.
func TestToolchainRootIsReadOnly(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	data := t.TempDir()
	bb := harness.RecipeToolchain(t, data, "busybox")
	// The attempt is real: outside the sandbox, root can write there.
	unpack := harness.Run(t, "toolchain", "unpack", "--data", data, bb)
	if unpack.Code != 0 {
		t.Fatal(unpack.Stderr)
	}
	root := strings.TrimSpace(unpack.Stdout)
	if _, err := os.Stat(filepath.Join(root, "bin", "busybox")); err != nil {
		t.Fatalf("unpacked root %s: %v", root, err)
	}
	res := harness.Run(t, "exec", "--data", data, "--toolchain", "docker://kiln/busybox@"+bb, "--no-cache", "--",
		"/bin/sh", "-c", "ls /bin/busybox && echo pwned > /bin/planted; echo pwned > /etc/passwd; rm -f /bin/sh; touch /planted")
	if res.Code == 0 {
		t.Fatalf("writes to the toolchain root succeeded:\n%s%s", res.Stdout, res.Stderr)
	}
	if !strings.Contains(res.Stdout, "/bin/busybox") || !strings.Contains(res.Stderr, "Read-only file system") {
		t.Fatalf("want the root visible and read-only:\n%s%s", res.Stdout, res.Stderr)
	}
	for _, p := range []string{"bin/planted", "planted"} {
		if _, err := os.Stat(filepath.Join(root, p)); err == nil {
			t.Fatalf("%s appeared in the unpacked toolchain", p)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(root, "etc", "passwd")); strings.Contains(string(b), "pwned") {
		t.Fatal("/etc/passwd of the toolchain was changed")
	}
	if _, err := os.Lstat(filepath.Join(root, "bin", "sh")); err != nil {
		t.Fatal("/bin/sh was removed from the toolchain")
	}
}
