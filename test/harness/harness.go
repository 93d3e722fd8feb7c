// Package harness starts the real kiln binary and real clients for end-to-end tests.
package harness

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Require skips t when ok is false, or fails it when KILN_E2E=require (as `make test`
// sets), so a missing prerequisite can never pass CI silently.
func Require(t testing.TB, ok bool, format string, args ...any) {
	t.Helper()
	if ok {
		return
	}
	msg := fmt.Sprintf(format, args...)
	if os.Getenv("KILN_E2E") == "require" {
		t.Fatalf("prerequisite missing (KILN_E2E=require): %s", msg)
	}
	t.Skip("prerequisite missing: " + msg)
}

// RequireRoot needs the test to run as root (the sandbox, cgroups).
func RequireRoot(t testing.TB) { t.Helper(); Require(t, os.Geteuid() == 0, "must run as root") }

// RequireCommand needs a program on PATH and returns its path.
func RequireCommand(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	Require(t, err == nil, "%s not installed (scripts/setup.sh installs it)", name)
	return p
}

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

// RepoRoot is the repository's top directory.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// KilnBin returns the kiln binary under test: $KILN_BIN (set by `make test`) or one
// built once per test process.
func KilnBin(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("KILN_BIN"); p != "" {
		return p
	}
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "kiln-bin-")
		if err != nil {
			buildErr = err
			return
		}
		builtBin = filepath.Join(dir, "kiln")
		cmd := exec.Command("go", "build", "-tags", "seccomp", "-o", builtBin, "./cmd/kiln")
		cmd.Dir = RepoRoot()
		cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return builtBin
}

// Result is a finished kiln command.
type Result struct {
	Stdout, Stderr string
	Code           int
}

// Run runs kiln with args and returns its output and exit code.
func Run(t testing.TB, args ...string) Result {
	t.Helper()
	return RunIn(t, "", nil, args...)
}

// RunIn runs kiln in dir with stdin (may be nil).
func RunIn(t testing.TB, dir string, stdin io.Reader, args ...string) Result {
	t.Helper()
	cmd := exec.Command(KilnBin(t), args...)
	cmd.Dir = dir
	cmd.Stdin = stdin
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run kiln %v: %v", args, err)
	}
	return Result{Stdout: out.String(), Stderr: errb.String(), Code: code}
}

// Server is a running `kiln serve`.
type Server struct {
	Addr, HTTP, Data string
	cmd              *exec.Cmd
	logMu            sync.Mutex
	log              strings.Builder
	exited           chan struct{}
}

var addrRe = regexp.MustCompile(`msg="kiln serving" grpc=(\S+) http=(\S*)`)

// StartServer starts `kiln serve` on free loopback ports with a fresh data dir (unless
// args name --data) and waits until it serves. It is stopped when t ends.
func StartServer(t testing.TB, args ...string) *Server {
	t.Helper()
	s := &Server{Data: t.TempDir()}
	hasData := false
	for i, a := range args {
		if a == "--data" && i+1 < len(args) {
			s.Data, hasData = args[i+1], true
		}
		if strings.HasPrefix(a, "--data=") {
			s.Data, hasData = strings.TrimPrefix(a, "--data="), true
		}
	}
	full := []string{"serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"}
	if !hasData {
		full = append(full, "--data", s.Data)
	}
	s.start(t, append(full, args...))
	return s
}

func (s *Server) start(t testing.TB, args []string) {
	t.Helper()
	s.cmd = exec.Command(KilnBin(t), args...)
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stderr, err := s.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s.exited = make(chan struct{})
	ready := make(chan [2]string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			s.logMu.Lock()
			s.log.WriteString(line + "\n")
			s.logMu.Unlock()
			if m := addrRe.FindStringSubmatch(line); m != nil {
				ready <- [2]string{m[1], m[2]}
			}
		}
	}()
	go func() { s.cmd.Wait(); close(s.exited) }()
	t.Cleanup(func() { s.Stop(t) })
	select {
	case a := <-ready:
		s.Addr, s.HTTP = a[0], a[1]
	case <-s.exited:
		t.Fatalf("kiln serve exited before serving:\n%s", s.Log())
	case <-time.After(60 * time.Second):
		t.Fatalf("kiln serve did not start within 60s:\n%s", s.Log())
	}
}

// Log returns what the server wrote to stderr so far.
func (s *Server) Log() string {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	return s.log.String()
}

// Stop sends SIGTERM and waits for a graceful exit.
func (s *Server) Stop(t testing.TB) {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	select {
	case <-s.exited:
		return
	default:
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(30 * time.Second):
		s.cmd.Process.Kill()
		<-s.exited
		t.Errorf("kiln serve did not stop within 30s of SIGTERM")
	}
}

// Kill ends the server with SIGKILL, as a crash would.
func (s *Server) Kill() {
	s.cmd.Process.Kill()
	<-s.exited
}

// Restart starts a new server on the same data dir (and new ports).
func (s *Server) Restart(t testing.TB, args ...string) {
	t.Helper()
	s.start(t, append([]string{"serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--data", s.Data}, args...))
}

// Metric returns the sum of the samples of a Prometheus metric whose line matches all
// of the given label fragments.
func (s *Server) Metric(t testing.TB, name string, labels ...string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + s.HTTP + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var sum float64
	for _, line := range strings.Split(string(body), "\n") {
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		ok := true
		for _, l := range labels {
			if !strings.Contains(line, l) {
				ok = false
			}
		}
		if ok {
			var v float64
			fmt.Sscanf(line[strings.LastIndex(line, " ")+1:], "%g", &v)
			sum += v
		}
	}
	return sum
}

// Context returns a context that ends with the test or after d.
func Context(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// TempBytes sums the store's temporary files: those named in its tmp directory and
// those without a name (O_TMPFILE, or removed while open) the server holds open there.
func (s *Server) TempBytes(t testing.TB) int64 {
	t.Helper()
	tmp := filepath.Join(s.Data, "store", "tmp")
	var n int64
	ents, _ := os.ReadDir(tmp)
	for _, e := range ents {
		if info, err := e.Info(); err == nil {
			n += info.Size()
		}
	}
	fds := fmt.Sprintf("/proc/%d/fd", s.cmd.Process.Pid)
	ents, err := os.ReadDir(fds)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		link, err := os.Readlink(filepath.Join(fds, e.Name()))
		if err != nil || !strings.HasPrefix(link, tmp+"/") || !strings.HasSuffix(link, " (deleted)") {
			continue
		}
		if info, err := os.Stat(filepath.Join(fds, e.Name())); err == nil {
			n += info.Size()
		}
	}
	return n
}

// PeakRSS is the server process's peak resident memory so far (VmHWM), in bytes.
func (s *Server) PeakRSS(t testing.TB) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			var kb int64
			fmt.Sscanf(strings.TrimSpace(rest), "%d", &kb)
			return kb << 10
		}
	}
	t.Fatalf("no VmHWM in /proc/%d/status", s.cmd.Process.Pid)
	return 0
}
