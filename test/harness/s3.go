package harness

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// S3 is a real S3-compatible server (versitygw serving a temp dir; each subdirectory is
// a bucket) for tests of kiln's shared storage.
type S3 struct {
	Endpoint       string // http://127.0.0.1:PORT
	Access, Secret string
	Dir            string // the served directory: Dir/BUCKET/KEY are the objects
	addr           string
	bin            string
	mu             sync.Mutex
	cmd            *exec.Cmd
	exited         chan struct{}
}

// VersityGW returns the versitygw binary (scripts/setup.sh installs it), or skips t.
func VersityGW(t testing.TB) string {
	t.Helper()
	if p, err := exec.LookPath("versitygw"); err == nil {
		return p
	}
	gopath := os.Getenv("GOPATH")
	if gopath == "" {
		if out, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
			gopath = strings.TrimSpace(string(out))
		}
	}
	p := filepath.Join(gopath, "bin", "versitygw")
	_, err := os.Stat(p)
	Require(t, err == nil, "versitygw not installed (scripts/setup.sh installs it)")
	return p
}

// StartS3 starts versitygw on a free loopback port with the given buckets and stops it
// when t ends.
func StartS3(t testing.TB, buckets ...string) *S3 {
	t.Helper()
	s := &S3{Dir: t.TempDir(), Access: "kilntest", Secret: "kilntestsecret", bin: VersityGW(t)}
	for _, b := range buckets {
		if err := os.MkdirAll(filepath.Join(s.Dir, b), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.addr = l.Addr().String()
	l.Close()
	s.Endpoint = "http://" + s.addr
	s.Start(t)
	t.Cleanup(func() { s.Kill() })
	return s
}

// Start (re)starts the server on its address and waits until it accepts connections.
func (s *S3) Start(t testing.TB) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	cmd := exec.Command(s.bin, "--access", s.Access, "--secret", s.Secret, "--port", s.addr, "--keep-alive", "--quiet", "posix", s.Dir)
	s.cmd, s.exited = startListening(t, "versitygw", cmd, filepath.Join(t.TempDir(), "versitygw.log"), s.addr)
}

// startListening starts cmd (a server; its output appended to logPath) and waits until
// it accepts connections on addr; exited is closed when it ends.
func startListening(t testing.TB, name string, cmd *exec.Cmd, logPath, addr string) (*exec.Cmd, chan struct{}) {
	t.Helper()
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(exited) }()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return cmd, exited
		}
		select {
		case <-exited:
			b, _ := os.ReadFile(logPath)
			t.Fatalf("%s exited at start:\n%s", name, b)
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatalf("%s did not listen on %s within 30s", name, addr)
	return nil, nil
}

// Kill ends the server with SIGKILL, as a crash would.
func (s *S3) Kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		s.cmd.Process.Kill()
		<-s.exited
		s.cmd = nil
	}
}

// URL is the --storage URL of bucket (and prefix) on this server; params are extra
// query parameters ("exists-ttl=1s").
func (s *S3) URL(bucket, prefix string, params ...string) string {
	q := url.Values{"endpoint": {s.Endpoint}, "region": {"us-east-1"}, "path-style": {"true"}}
	for _, p := range params {
		k, v, _ := strings.Cut(p, "=")
		q.Set(k, v)
	}
	return fmt.Sprintf("s3://%s/%s?%s", bucket, prefix, q.Encode())
}

// Env is the environment that gives a process this server's credentials (and keeps the
// AWS SDK from looking for any other: no shared files, no instance metadata).
func (s *S3) Env() []string {
	return []string{"AWS_ACCESS_KEY_ID=" + s.Access, "AWS_SECRET_ACCESS_KEY=" + s.Secret,
		"AWS_CONFIG_FILE=/dev/null", "AWS_SHARED_CREDENTIALS_FILE=/dev/null", "AWS_EC2_METADATA_DISABLED=true"}
}

// Setenv puts Env into the test process's environment (inherited by kiln processes).
func (s *S3) Setenv(t testing.TB) {
	t.Helper()
	for _, kv := range s.Env() {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
}
