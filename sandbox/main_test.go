package sandbox_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/kilnbuild/kiln/sandbox"
	"github.com/kilnbuild/kiln/sandbox/sandboxtest"
)

// env is what the tests share: one busybox rootfs with the probe, made once per run.
var env struct {
	rootfs  string // busybox + /bin/probe + /bin/suid-probe (setuid root)
	probe   string // the probe on the host, for control runs
	skip    string // why the sandbox tests cannot run here, if they cannot
	scratch string
	// daemon is kiln-sandboxd, built for this run, through which Runners run their
	// sandboxes, as kiln built by make does; nil in the in-process pass (see
	// TestInProcess), where they run from the test process, as kiln built without
	// the daemon does.
	daemon     []byte
	daemonPath string
}

// inProcessEnv marks the child test process of TestInProcess.
const inProcessEnv = "KILN_SANDBOX_TEST_INPROCESS"

func TestMain(m *testing.M) {
	sandbox.Init()
	if dir := os.Getenv("KILN_SANDBOX_TEST_CRASHER"); dir != "" {
		crasher(dir) // never returns
	}
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	scratch, err := os.MkdirTemp("", "kiln-sandbox-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(scratch)
	if err := os.Chmod(scratch, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	env.scratch = scratch
	if err := setup(scratch); errors.Is(err, sandboxtest.ErrMissing) {
		env.skip = err.Error()
	} else if err != nil {
		fmt.Fprintln(os.Stderr, "sandbox test setup:", err)
		return 1
	}
	if env.skip == "" && os.Getenv(inProcessEnv) == "" {
		if err := buildDaemon(scratch); err != nil {
			fmt.Fprintln(os.Stderr, "sandbox test setup:", err)
			return 1
		}
	}
	return m.Run()
}

// buildDaemon builds kiln-sandboxd as `make build` does and loads it.
func buildDaemon(scratch string) error {
	env.daemonPath = filepath.Join(scratch, "kiln-sandboxd")
	cmd := exec.Command("go", "build", "-tags", "seccomp", "-ldflags", "-s -w", "-o", env.daemonPath, "github.com/kilnbuild/kiln/cmd/kiln-sandboxd")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("building kiln-sandboxd: %v\n%s", err, out)
	}
	var err error
	env.daemon, err = os.ReadFile(env.daemonPath)
	return err
}

// testConfig sets cfg to run sandboxes the way this pass of the tests does: through
// the daemon, or in-process.
func testConfig(cfg sandbox.Config) sandbox.Config {
	return sandbox.ConfigFor(cfg, env.daemon)
}

func setup(scratch string) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("%w: sandbox tests need root", sandboxtest.ErrMissing)
	}
	rootfs := filepath.Join(scratch, "rootfs")
	if err := sandboxtest.BuildBusyboxRootfs(rootfs); err != nil {
		return err
	}
	probe := filepath.Join(rootfs, "bin", "probe")
	if err := sandboxtest.BuildProbe(probe); err != nil {
		return err
	}
	// A setuid-root copy of the probe, to show that no_new_privs (and nosuid) keep it
	// from raising privileges. (busybox drops setuid privileges by itself.)
	b, err := os.ReadFile(probe)
	if err != nil {
		return err
	}
	suid := filepath.Join(rootfs, "bin", "suid-probe")
	if err := os.WriteFile(suid, b, 0o755); err != nil {
		return err
	}
	if err := syscall.Chmod(suid, 0o4755); err != nil {
		return err
	}
	env.rootfs = rootfs
	env.probe = probe
	return nil
}

// need fails or skips t when the sandbox cannot run here (KILN_E2E=require: fail).
func need(t testing.TB) {
	t.Helper()
	if env.skip == "" {
		return
	}
	if os.Getenv("KILN_E2E") == "require" {
		t.Fatalf("prerequisite missing: %s", env.skip)
	}
	t.Skipf("prerequisite missing: %s", env.skip)
}

// newRunner returns a Runner on a fresh state dir, closed at the end of the test.
func newRunner(t testing.TB) *sandbox.Runner {
	t.Helper()
	return newRunnerWith(t, sandbox.Config{})
}

// newRunnerWith is newRunner with cfg (its StateDir is filled in).
func newRunnerWith(t testing.TB, cfg sandbox.Config) *sandbox.Runner {
	t.Helper()
	need(t)
	cfg.StateDir = t.TempDir()
	r, err := sandbox.New(context.Background(), testConfig(cfg))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return r
}

// execRoot returns a fresh exec root owned by the sandbox's default uid.
func execRoot(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "execroot")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, sandbox.DefaultUID, sandbox.DefaultGID); err != nil {
		t.Fatal(err)
	}
	return dir
}

// outcome is a finished Run with its captured output.
type outcome struct {
	res    sandbox.Result
	stdout string
	stderr string
}

// run runs args in a sandbox on env.rootfs, after tweak adjusts the Spec.
func run(t testing.TB, r *sandbox.Runner, tweak func(*sandbox.Spec), args ...string) outcome {
	t.Helper()
	out := t.TempDir()
	spec := sandbox.Spec{
		RootFS: env.rootfs,
		Args:   args,
		Env:    []string{"PATH=/bin"},
		Stdout: sandbox.Output{Path: filepath.Join(out, "stdout")},
		Stderr: sandbox.Output{Path: filepath.Join(out, "stderr")},
	}
	if tweak != nil {
		tweak(&spec)
	}
	res, err := r.Run(context.Background(), spec)
	if err != nil {
		t.Fatalf("Run(%q): %v", args, err)
	}
	o := outcome{res: res}
	if res.Stdout.Path != "" {
		b, _ := os.ReadFile(res.Stdout.Path)
		o.stdout = string(b)
	}
	if res.Stderr.Path != "" {
		b, _ := os.ReadFile(res.Stderr.Path)
		o.stderr = string(b)
	}
	return o
}

// firstLine is the first line of s, trimmed.
func firstLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(s)
}

// hostProbe runs the probe on the host (the control run) and returns its first line.
func hostProbe(t testing.TB, attr *syscall.SysProcAttr, args ...string) string {
	t.Helper()
	cmd := exec.Command(env.probe, args...)
	cmd.SysProcAttr = attr
	out, err := cmd.Output()
	if err != nil {
		if _, ok := err.(*exec.ExitError); !ok {
			t.Fatalf("control probe %q: %v", args, err)
		}
	}
	return firstLine(string(out))
}
