package test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/test/harness"
)

// TestInputTimestampsAreFixed: an archive of its inputs is the same whichever data
// dir, and whenever, the inputs were uploaded (mtimes are fixed), so a rebuild on a
// fresh machine reproduces it.
func TestInputTimestampsAreFixed(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	src := t.TempDir()
	os.MkdirAll(filepath.Join(src, "d"), 0o755)
	os.WriteFile(filepath.Join(src, "d", "a.txt"), []byte("a\n"), 0o644)
	os.WriteFile(filepath.Join(src, "run.sh"), []byte("#!/bin/sh\necho hi\n"), 0o755)
	var digests []string
	for i := 0; i < 2; i++ {
		data := t.TempDir()
		bb := harness.RecipeToolchain(t, data, "busybox")
		j := kilnExec(t, data, bb, src, t.TempDir(), "out.tar", "tar cf out.tar d run.sh && ls -l --full-time d run.sh >&2")
		digests = append(digests, j.Outputs["out.tar"])
		time.Sleep(1100 * time.Millisecond) // another second for the next upload
	}
	if digests[0] != digests[1] {
		t.Fatalf("tar of the same inputs differs between data dirs: %v", digests)
	}
}

// TestDamagedInputBlobNeverReachesAnAction: a stored blob damaged in place (same size)
// is refused as missing before the action runs, instead of being hardlinked into it.
func TestDamagedInputBlobNeverReachesAnAction(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	data := t.TempDir()
	bb := harness.RecipeToolchain(t, data, "busybox")
	src := t.TempDir()
	os.WriteFile(filepath.Join(src, "a.txt"), []byte("hello\n"), 0o644)
	out := t.TempDir()
	kilnExec(t, data, bb, src, out, "o.txt", "cat a.txt > o.txt")
	blob := filepath.Join(data, "store", "cas", fileSHA256(t, filepath.Join(src, "a.txt"))[:2], fileSHA256(t, filepath.Join(src, "a.txt")))
	os.Chmod(blob, 0o644)
	if err := os.WriteFile(blob, []byte("HELLO\n"), 0o444); err != nil {
		t.Fatal(err)
	}
	// kiln exec uploads a.txt again (the right bytes): the damaged copy is replaced
	// and the action sees hello, never HELLO.
	res := harness.Run(t, "exec", "--data", data, "--toolchain", "docker://kiln/busybox@"+bb, "--input", src, "--output", "o.txt", "--out", out, "--no-cache", "--", "/bin/sh", "-c", "cat a.txt > o.txt")
	if res.Code != 0 {
		t.Fatalf("exec after damage: %s", res.Stderr)
	}
	if b, _ := os.ReadFile(filepath.Join(out, "o.txt")); strings.TrimSpace(string(b)) != "hello" {
		t.Fatalf("the action saw %q", b)
	}
}
