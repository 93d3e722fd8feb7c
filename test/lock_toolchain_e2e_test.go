package test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bazelbuild/remote-apis-sdks/go/pkg/command"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/outerr"
	"github.com/kilnbuild/kiln/test/harness"
)

// TestLockfilePinnedToolchainTag: with --lockfile, a container-image tag the lockfile
// pins resolves to its digest through kiln serve; an unpinned tag is still refused.
func TestLockfilePinnedToolchainTag(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	data := t.TempDir()
	bb := harness.RecipeToolchain(t, data, "busybox")
	lock := filepath.Join(t.TempDir(), "kiln.lock")
	if r := harness.Run(t, "lock", "pin-toolchain", "--lockfile", lock, "busybox:stable", "docker://kiln/busybox@"+bb); r.Code != 0 {
		t.Fatalf("pin-toolchain: %s", r.Stderr)
	}
	srv := harness.StartServer(t, "--data", data, "--lockfile", lock)
	c := rexecClient(t, srv.Addr)
	run := func(image string) *command.Result {
		cmd := &command.Command{
			Args: []string{"/bin/sh", "-c", "echo pinned > out.txt"}, ExecRoot: t.TempDir(), InputSpec: &command.InputSpec{},
			OutputFiles: []string{"out.txt"}, Platform: map[string]string{"container-image": image},
			Identifiers: &command.Identifiers{ToolName: "kiln-lock"},
		}
		res, _ := c.Run(context.Background(), cmd, command.DefaultExecutionOptions(), outerr.NewRecordingOutErr())
		if res.Err == nil {
			if b, _ := os.ReadFile(filepath.Join(cmd.ExecRoot, "out.txt")); strings.TrimSpace(string(b)) != "pinned" {
				t.Fatalf("%s: output %q", image, b)
			}
		}
		return res
	}
	if res := run("docker://busybox:stable"); res.Err != nil || res.ExitCode != 0 {
		t.Fatalf("pinned tag: %+v", res)
	}
	res := run("docker://busybox:latest")
	if res.Err == nil || !strings.Contains(res.Err.Error(), "unpinned") {
		t.Fatalf("unpinned tag: %+v, want a FAILED_PRECONDITION saying it is unpinned", res)
	}
}
