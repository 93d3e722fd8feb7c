package sandbox_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnbuild/kiln/sandbox"
)

// TestPrestartedSandboxesAreFresh: with a pool, every command still gets a sandbox
// nobody used before: its own /tmp, pid namespace and exec root.
func TestPrestartedSandboxesAreFresh(t *testing.T) {
	r := newRunnerWith(t, sandbox.Config{Prestart: 2})
	for i := 0; i < 5; i++ {
		er := execRoot(t)
		o := run(t, r, func(s *sandbox.Spec) { s.ExecRoot = er },
			"/bin/sh", "-c", "ls /tmp; echo x > /tmp/marker; ls /proc | grep -c '^[0-9]'; pwd; echo out > result")
		// An empty /tmp; only kiln-init, sh, ls and grep in the pid namespace.
		if o.stdout != "4\n/kiln/execroot\n" {
			t.Fatalf("run %d saw %q; want an empty /tmp, 4 processes, its exec root", i, o.stdout)
		}
		if b, err := os.ReadFile(filepath.Join(er, "result")); err != nil || string(b) != "out\n" {
			t.Fatalf("run %d: output not in its exec root: %q %v", i, b, err)
		}
	}
	// A different layout (exec root path, host name) gets its own prepared sandboxes.
	for i := 0; i < 3; i++ {
		o := run(t, r, func(s *sandbox.Spec) {
			s.ExecRoot, s.ExecRootPath, s.Hostname = execRoot(t), "/other", "h2"
		}, "/bin/sh", "-c", "hostname; pwd")
		if o.stdout != "h2\n/other\n" {
			t.Fatalf("second layout, run %d: %q", i, o.stdout)
		}
	}
}

// TestCloseDestroysPreparedSandboxes: Close leaves no container, cgroup or mount.
func TestCloseDestroysPreparedSandboxes(t *testing.T) {
	need(t)
	dir := t.TempDir()
	r, err := sandbox.New(context.Background(), sandbox.Config{StateDir: dir, Prestart: 3})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Run(context.Background(), sandbox.Spec{RootFS: env.rootfs, ExecRoot: execRoot(t), Args: []string{"/bin/true"}}); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, "containers")); len(ents) != 0 {
		t.Errorf("containers left: %v", ents)
	}
	if n := mountsUnder(t, dir); n != 0 {
		t.Errorf("%d mounts left", n)
	}
	if left := cgroupLeftovers(t, sandbox.CgroupName(dir)); len(left) != 0 {
		t.Errorf("cgroups left: %v", left)
	}
	b, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(b), dir) {
		t.Errorf("mounts left under %s", dir)
	}
}
