package trampoline

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestEmbeddedIsFresh rebuilds kiln-init from src/kiln-init.c and compares it with the
// embedded binary, so the committed binary always matches its source.
func TestEmbeddedIsFresh(t *testing.T) {
	if _, err := exec.LookPath("gcc"); err != nil {
		if os.Getenv("KILN_E2E") == "require" {
			t.Fatal("gcc not installed")
		}
		t.Skip("gcc not installed")
	}
	out := filepath.Join(t.TempDir(), "kiln-init")
	cmd := exec.Command("./gen.sh", out)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("gen.sh: %v\n%s", err, b)
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, Binary) {
		t.Fatal("kiln-init.amd64 does not match src/kiln-init.c: run go generate ./sandbox/internal/trampoline")
	}
}

// run starts kiln-init outside any sandbox with fds 3-5 as it expects.
func run(t *testing.T, c Command) (Report, *os.ProcessState, string) {
	t.Helper()
	self, err := Memfd()
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	ctrlR, ctrlW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	stR, stW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	var stdout bytes.Buffer
	cmd := exec.Command("/proc/self/fd/3")
	cmd.ExtraFiles = []*os.File{self, ctrlR, stW}
	cmd.Stdout = &stdout
	cmd.Stderr = &stdout
	cmd.Env = []string{"SHOULD_NOT=leak"}
	// Path resolves in the child after fd shuffling; /proc/self/fd/3 is the memfd there.
	cmd.Path = "/proc/self/fd/3"
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ctrlR.Close()
	stW.Close()
	msg, err := c.Encode()
	if err != nil {
		t.Fatal(err)
	}
	go func() { ctrlW.Write(msg); ctrlW.Close() }()
	rep, _ := io.ReadAll(stR)
	cmd.Wait()
	r, err := ParseReport(rep)
	if err != nil {
		t.Fatal(err)
	}
	return r, cmd.ProcessState, stdout.String()
}

func TestRunsCommandWithExactEnv(t *testing.T) {
	env := []string{"B=2", "A=1", "B=3", "PATH=/usr/bin:/bin"}
	r, ps, out := run(t, Command{Cwd: "/", Args: []string{"env"}, Env: env})
	if !r.Exited || r.Status.ExitStatus() != 0 || ps.ExitCode() != 0 {
		t.Fatalf("report %+v, exit %d, out %q", r, ps.ExitCode(), out)
	}
	if got := strings.Split(strings.TrimSpace(out), "\n"); strings.Join(got, ",") != strings.Join(env, ",") {
		t.Fatalf("env = %q, want %q", got, env)
	}
}

func TestUsageReport(t *testing.T) {
	r, _, _ := run(t, Command{Cwd: "/", Args: []string{"/bin/sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"}})
	if !r.HasUsage || r.User+r.System <= 0 || r.MaxRSSKiB <= 0 {
		t.Fatalf("report %+v", r)
	}
}

func TestExitCodeSignalAndCwd(t *testing.T) {
	dir := t.TempDir()
	r, ps, out := run(t, Command{Cwd: dir, Args: []string{"/bin/sh", "-c", "pwd; exit 7"}})
	if r.Status.ExitStatus() != 7 || ps.ExitCode() != 7 || strings.TrimSpace(out) != dir {
		t.Fatalf("report %+v exit %d out %q", r, ps.ExitCode(), out)
	}
	r, ps, _ = run(t, Command{Cwd: "/", Args: []string{"/bin/sh", "-c", "kill -SEGV $$"}})
	if !r.Status.Signaled() || r.Status.Signal() != syscall.SIGSEGV || ps.ExitCode() != 128+11 {
		t.Fatalf("report %+v exit %d", r, ps.ExitCode())
	}
}

func TestStartFailures(t *testing.T) {
	r, ps, _ := run(t, Command{Cwd: "/", Args: []string{"no-such-program"}, Env: []string{"PATH=/bin"}})
	if r.Stage != "exec" || r.Errno != syscall.ENOENT || ps.ExitCode() != 127 {
		t.Fatalf("report %+v exit %d", r, ps.ExitCode())
	}
	r, ps, _ = run(t, Command{Cwd: "/no/such/dir", Args: []string{"/bin/true"}})
	if r.Stage != "chdir" || r.Errno != syscall.ENOENT || ps.ExitCode() != 127 {
		t.Fatalf("report %+v exit %d", r, ps.ExitCode())
	}
	r, ps, _ = run(t, Command{Cwd: "/", Args: []string{"/etc/passwd"}})
	if r.Stage != "exec" || r.Errno != syscall.EACCES || ps.ExitCode() != 126 {
		t.Fatalf("report %+v exit %d", r, ps.ExitCode())
	}
}

func TestDisableASLR(t *testing.T) {
	_, _, on := run(t, Command{Cwd: "/", Args: []string{"/bin/cat", "/proc/self/personality"}})
	_, _, off := run(t, Command{Cwd: "/", Args: []string{"/bin/cat", "/proc/self/personality"}, DisableASLR: true})
	if strings.TrimSpace(on) != "00000000" || strings.TrimSpace(off) != "00040000" {
		t.Fatalf("personality on=%q off=%q", on, off)
	}
}
