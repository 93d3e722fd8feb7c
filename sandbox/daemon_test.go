package sandbox_test

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kilnbuild/kiln/sandbox"
)

// TestInProcess runs this package's tests (those -run selects) once more, in a child
// process, with sandboxes run from the test process itself instead of through
// kiln-sandboxd: kiln built without the daemon (plain go build) works that way.
func TestInProcess(t *testing.T) {
	if os.Getenv(inProcessEnv) != "" {
		t.Skip("this is the in-process pass")
	}
	need(t)
	args := []string{"-test.count=1"}
	for _, name := range []string{"test.run", "test.skip", "test.short", "test.v", "test.timeout"} {
		if f := flag.Lookup(name); f != nil && f.Value.String() != f.DefValue {
			args = append(args, "-"+name+"="+f.Value.String())
		}
	}
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), inProcessEnv+"=1")
	out, err := cmd.CombinedOutput()
	// Indented, so that go test's output parser does not take its lines for ours.
	quoted := "\t| " + strings.ReplaceAll(strings.TrimSpace(string(out)), "\n", "\n\t| ")
	if err != nil {
		t.Fatalf("the in-process pass failed (%v):\n%s", err, quoted)
	}
	if !strings.Contains(string(out), "\nPASS") && !strings.HasPrefix(string(out), "PASS") {
		t.Fatalf("the in-process pass did not report PASS:\n%s", quoted)
	}
	if testing.Verbose() {
		t.Logf("in-process pass:\n%s", quoted)
	}
}

// needDaemon skips t in the in-process pass.
func needDaemon(t *testing.T) {
	t.Helper()
	need(t)
	if env.daemon == nil {
		t.Skip("a test of the sandbox daemon; this is the in-process pass")
	}
}

// TestDaemonCrash kills the sandbox daemon in the middle of a Run: the Run fails with
// UNAVAILABLE, its sandbox dies with the daemon, the next Run starts a new daemon,
// and Close leaves nothing behind.
func TestDaemonCrash(t *testing.T) {
	needDaemon(t)
	dir := t.TempDir()
	var logs logRecorder
	r, err := sandbox.New(context.Background(), testConfig(sandbox.Config{StateDir: dir, Prestart: 1, Logger: slog.New(&logs)}))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	first := sandbox.DaemonPid(r)
	er := execRoot(t)
	done := make(chan error, 1)
	go func() {
		_, err := r.Run(context.Background(), sandbox.Spec{
			RootFS: env.rootfs, ExecRoot: er, Env: []string{"PATH=/bin"},
			Args: []string{"/bin/sh", "-c", "probe daemon beat >/dev/null; touch started; exec sleep 600"},
		})
		done <- err
	}()
	waitFile(t, filepath.Join(er, "started"))
	if err := syscall.Kill(first, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	err = <-done
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "died during the run") {
		t.Fatalf("Run while the daemon was killed: got %v, want UNAVAILABLE saying the daemon died", err)
	}
	// The sandbox's processes, even a detached one, died with the daemon.
	beat := filepath.Join(er, "beat")
	st1, err := os.Stat(beat)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	if st2, err := os.Stat(beat); err != nil || st2.Size() != st1.Size() {
		t.Fatalf("the sandbox outlived its daemon: heartbeat %d -> %v bytes (%v)", st1.Size(), st2.Size(), err)
	}
	waitGone(t, first)

	o := run(t, r, nil, "/bin/sh", "-c", "echo again")
	if o.stdout != "again\n" {
		t.Fatalf("Run after the crash: %q %+v", o.stdout, o.res)
	}
	if second := sandbox.DaemonPid(r); second == first || second == 0 {
		t.Fatalf("the daemon was not restarted: pid %d, then %d", first, second)
	}
	// kiln warned, and the new daemon's sweep (logged by the daemon, forwarded to the
	// Runner's logger) removed the dead one's sandbox.
	if got := logs.messages(); !strings.Contains(got, "WARN sandbox: the sandbox daemon exited unexpectedly") ||
		!strings.Contains(got, "INFO sandbox: swept leftover sandbox id=k"+strconv.Itoa(first)+"-") {
		t.Errorf("logs:\n%s", got)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	requireNothingLeft(t, dir)
}

// TestCloseAfterDaemonCrash: Close of a Runner whose daemon died (and was never
// restarted by a Run) still removes what the dead daemon left.
func TestCloseAfterDaemonCrash(t *testing.T) {
	needDaemon(t)
	dir := t.TempDir()
	r, err := sandbox.New(context.Background(), testConfig(sandbox.Config{StateDir: dir, Prestart: 2}))
	if err != nil {
		t.Fatal(err)
	}
	run(t, r, nil, "/bin/true")
	pid := sandbox.DaemonPid(r)
	for i := 0; len(preparedInits(t, r)) < 2; i++ { // leave prepared sandboxes behind
		if i > 1000 {
			t.Fatal("no prepared sandboxes appeared")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitGone(t, pid)
	if n := mountsUnder(t, dir); n == 0 {
		t.Fatal("the crash left no mounts: the test proves nothing")
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	requireNothingLeft(t, dir)
}

// TestOutputWriters: streams given as Writers (a file, any other writer) get the
// output, capped at the limit, as streams given as paths do.
func TestOutputWriters(t *testing.T) {
	r := newRunner(t)
	f, err := os.Create(filepath.Join(t.TempDir(), "out"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var buf bytes.Buffer
	res, err := r.Run(context.Background(), sandbox.Spec{
		RootFS: env.rootfs, Env: []string{"PATH=/bin"},
		Args:   []string{"/bin/sh", "-c", "echo to-file; echo 0123456789 >&2"},
		Stdout: sandbox.Output{Writer: f},
		Stderr: sandbox.Output{Writer: &buf, Limit: 4},
	})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(f.Name())
	if string(b) != "to-file\n" || res.Stdout.Size != 8 || res.Stdout.Truncated || res.Stdout.Path != "" {
		t.Errorf("stdout to a file: %q, %+v", b, res.Stdout)
	}
	if buf.String() != "0123" || res.Stderr.Size != 4 || !res.Stderr.Truncated {
		t.Errorf("stderr to a buffer, limit 4: %q, %+v", buf.String(), res.Stderr)
	}
	// A writer that fails: the command still runs to its end; the result says the
	// stream was not kept whole.
	res, err = r.Run(context.Background(), sandbox.Spec{
		RootFS: env.rootfs, Env: []string{"PATH=/bin"},
		Args:   []string{"/bin/sh", "-c", "echo lost; exit 3"},
		Stdout: sandbox.Output{Writer: failingWriter{}},
	})
	if err != nil || res.ExitCode != 3 || !res.Stdout.Truncated {
		t.Errorf("failing writer: %v %+v", err, res)
	}
	// So does a closed file.
	f.Close()
	res, err = r.Run(context.Background(), sandbox.Spec{
		RootFS: env.rootfs, Env: []string{"PATH=/bin"},
		Args:   []string{"/bin/sh", "-c", "echo lost; exit 4"},
		Stdout: sandbox.Output{Writer: f},
	})
	if err != nil || res.ExitCode != 4 || !res.Stdout.Truncated {
		t.Errorf("closed file: %v %+v", err, res)
	}
}

type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, errors.New("disk full") }

// TestBytesPassExactly: arguments, environment and output that are not UTF-8 reach
// the command and come back byte for byte.
func TestBytesPassExactly(t *testing.T) {
	r := newRunner(t)
	arg, val := "a\xff\x01b", "\xfe\xc3("
	o := run(t, r, func(s *sandbox.Spec) { s.Env = append(s.Env, "V="+val) },
		"/bin/sh", "-c", `printf '%s|%s' "$0" "$V"`, arg)
	if want := arg + "|" + val; o.stdout != want {
		t.Fatalf("got %q, want %q", o.stdout, want)
	}
}

// TestContextDeadline: a Run whose context's deadline passes is killed then, and
// reported as a command that timed out (as for Spec.Timeout), not as an error.
func TestContextDeadline(t *testing.T) {
	r := newRunner(t)
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	res, err := r.Run(ctx, sandbox.Spec{RootFS: env.rootfs, Args: []string{"/bin/sleep", "600"}})
	if err != nil || !res.TimedOut || res.ExitCode != 128+int(syscall.SIGKILL) {
		t.Fatalf("got %v %+v, want a timed-out result", err, res)
	}
}

// TestDaemonAgreesWithInProcess: the same Spec gives the same Result (policy, exit,
// output) through the daemon as from this process.
func TestDaemonAgreesWithInProcess(t *testing.T) {
	needDaemon(t)
	viaDaemon := newRunner(t)
	cfg := sandbox.ConfigFor(sandbox.Config{StateDir: t.TempDir()}, nil)
	inProcess, err := sandbox.New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer inProcess.Close()
	if sandbox.DaemonPid(viaDaemon) == 0 || sandbox.DaemonPid(inProcess) != 0 {
		t.Fatal("the two Runners do not run sandboxes two ways")
	}
	tweak := func(s *sandbox.Spec) {
		s.Limits = sandbox.Limits{MemoryBytes: 256 << 20, Pids: 64, CPUs: 1}
		s.Stdout.Limit = 5
	}
	a := run(t, viaDaemon, tweak, "/bin/sh", "-c", "echo hello world; exit 7")
	b := run(t, inProcess, tweak, "/bin/sh", "-c", "echo hello world; exit 7")
	if a.res.PolicyDigest != b.res.PolicyDigest || !bytes.Equal(a.res.Policy, b.res.Policy) || len(a.res.Policy) == 0 {
		t.Errorf("policies differ:\n%s\n%s", a.res.Policy, b.res.Policy)
	}
	if a.res.ExitCode != 7 || a.res.ExitCode != b.res.ExitCode || a.stdout != "hello" || a.stdout != b.stdout ||
		a.res.Stdout.Size != b.res.Stdout.Size || a.res.Stdout.Truncated != b.res.Stdout.Truncated {
		t.Errorf("results differ: daemon %+v %q, in-process %+v %q", a.res, a.stdout, b.res, b.stdout)
	}
}

// logRecorder is a slog.Handler that keeps "LEVEL message key=value..." lines.
type logRecorder struct {
	mu    sync.Mutex
	lines []string
}

func (l *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (l *logRecorder) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *logRecorder) WithGroup(string) slog.Handler            { return l }
func (l *logRecorder) Handle(_ context.Context, r slog.Record) error {
	line := r.Level.String() + " " + r.Message
	r.Attrs(func(a slog.Attr) bool {
		line += " " + a.Key + "=" + a.Value.String()
		return true
	})
	l.mu.Lock()
	l.lines = append(l.lines, line)
	l.mu.Unlock()
	return nil
}

func (l *logRecorder) messages() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

// waitFile waits until path exists; it fails t after ten seconds.
func waitFile(t *testing.T, path string) {
	t.Helper()
	for i := 0; i < 1000; i++ {
		if _, err := os.Stat(path); err == nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s never appeared", path)
}
