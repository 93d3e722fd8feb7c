package test

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// The helpers in this file serve the lock_* and asset_* end-to-end tests; their names
// carry the "lock" prefix so they never collide with other tests of this package.

// lockRequire skips t when ok is false, or fails it when KILN_E2E=require.
func lockRequire(t testing.TB, ok bool, format string, args ...any) {
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

var (
	lockBuildOnce sync.Once
	lockBuiltBin  string
	lockBuildErr  error
)

func lockRepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), ".."))
}

// lockKilnBin is $KILN_BIN (set by `make test`), else a binary built once per process.
func lockKilnBin(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("KILN_BIN"); p != "" {
		return p
	}
	lockBuildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "kiln-lock-bin-")
		if err != nil {
			lockBuildErr = err
			return
		}
		lockBuiltBin = filepath.Join(dir, "kiln")
		cmd := exec.Command("go", "build", "-tags", "seccomp", "-o", lockBuiltBin, "./cmd/kiln")
		cmd.Dir = lockRepoRoot()
		cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
		if out, err := cmd.CombinedOutput(); err != nil {
			lockBuildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if lockBuildErr != nil {
		t.Fatal(lockBuildErr)
	}
	return lockBuiltBin
}

// lockResult is a finished kiln command.
type lockResult struct {
	stdout, stderr string
	code           int
}

// lockKiln runs kiln with args in dir.
func lockKiln(t testing.TB, dir string, args ...string) lockResult {
	t.Helper()
	cmd := exec.Command(lockKilnBin(t), args...)
	cmd.Dir = dir
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run kiln %v: %v", args, err)
	}
	return lockResult{out.String(), errb.String(), code}
}

// lockServer is a running `kiln serve`.
type lockServer struct {
	addr, data string
	cmd        *exec.Cmd
	mu         sync.Mutex
	log        strings.Builder
	exited     chan struct{}
}

var lockAddrRe = regexp.MustCompile(`msg="kiln serving" grpc=(\S+)`)

// lockServe starts `kiln serve` on a free loopback port with data dir data and extra
// args, and stops it (SIGTERM) when t ends.
func lockServe(t testing.TB, data string, args ...string) *lockServer {
	t.Helper()
	s := &lockServer{data: data, exited: make(chan struct{})}
	full := append([]string{"serve", "--listen", "127.0.0.1:0", "--http-listen", "", "--data", data}, args...)
	s.cmd = exec.Command(lockKilnBin(t), full...)
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stderr, err := s.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			s.mu.Lock()
			s.log.WriteString(sc.Text() + "\n")
			s.mu.Unlock()
			if m := lockAddrRe.FindStringSubmatch(sc.Text()); m != nil {
				ready <- m[1]
			}
		}
	}()
	go func() { s.cmd.Wait(); close(s.exited) }()
	t.Cleanup(func() {
		s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.exited:
		case <-time.After(30 * time.Second):
			s.cmd.Process.Kill()
			<-s.exited
		}
	})
	select {
	case s.addr = <-ready:
	case <-s.exited:
		t.Fatalf("kiln serve exited before serving:\n%s", s.logs())
	case <-time.After(60 * time.Second):
		t.Fatalf("kiln serve did not start within 60s:\n%s", s.logs())
	}
	return s
}

func (s *lockServer) logs() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.log.String()
}

// lockOrigin is an HTTP server on 127.0.0.1 whose files can change, counting requests.
type lockOrigin struct {
	*httptest.Server
	mu    sync.Mutex
	files map[string][]byte
	hits  atomic.Int64
}

func newLockOrigin(t testing.TB) *lockOrigin {
	o := &lockOrigin{files: map[string][]byte{}}
	o.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		o.hits.Add(1)
		o.mu.Lock()
		b, ok := o.files[r.URL.Path]
		o.mu.Unlock()
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Write(b)
	}))
	t.Cleanup(o.Close)
	return o
}

func (o *lockOrigin) set(path string, b []byte) {
	o.mu.Lock()
	o.files[path] = b
	o.mu.Unlock()
}

func (o *lockOrigin) host() string { return strings.TrimPrefix(o.URL, "http://") }

// lockTarGz returns a deterministic .tar.gz of files (name -> content) under prefix/.
func lockTarGz(t testing.TB, prefix string, files map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	tw.WriteHeader(&tar.Header{Name: prefix + "/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: time.Unix(0, 0)})
	for _, name := range sortedKeys(files) {
		body := files[name]
		if err := tw.WriteHeader(&tar.Header{Name: prefix + "/" + name, Mode: 0o644, Size: int64(len(body)), ModTime: time.Unix(0, 0)}); err != nil {
			t.Fatal(err)
		}
		tw.Write([]byte(body))
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := gz.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
