package sandbox_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/kilnbuild/kiln/sandbox"
	"github.com/kilnbuild/kiln/sandbox/sandboxtest"
)

var rootfs string

func TestMain(m *testing.M) {
	sandbox.Init()
	os.Exit(run(m))
}

func run(m *testing.M) int {
	dir, err := os.MkdirTemp("", "kiln-sandbox-rootfs-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if err := sandboxtest.BuildBusyboxRootfs(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	rootfs = dir
	return m.Run()
}

func TestRunEcho(t *testing.T) {
	ctx := context.Background()
	r, err := sandbox.New(ctx, sandbox.Config{StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	out := filepath.Join(t.TempDir(), "out")
	res, err := r.Run(ctx, sandbox.Spec{
		RootFS: rootfs,
		Args:   []string{"/bin/sh", "-c", "echo hello; id; hostname; env; cat /proc/self/status | grep -i -E 'cap|seccomp|nonewpriv'; cat /proc/mounts; exit 3"},
		Env:    []string{"PATH=/bin"},
		Stdout: sandbox.Output{Path: out},
	})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(out)
	t.Logf("%+v\n%s", res, b)
	if res.ExitCode != 3 {
		t.Fatalf("exit code %d", res.ExitCode)
	}
}
