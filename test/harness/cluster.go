package harness

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// NATS is a real nats-server with JetStream (scripts/setup.sh builds it from the Go
// module proxy) on a free loopback port and a temp store dir, for the cluster tests.
type NATS struct {
	URL   string // nats://127.0.0.1:PORT
	Store string
	Args  []string // extra server flags (TLS)
	addr  string
	bin   string
	mu    sync.Mutex
	cmd   *exec.Cmd
	done  chan struct{}
	log   string
}

// NATSServer returns the nats-server binary, or skips (fails under KILN_E2E=require).
func NATSServer(t testing.TB) string {
	t.Helper()
	gopath := os.Getenv("GOPATH")
	if gopath == "" {
		if out, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
			gopath = strings.TrimSpace(string(out))
		}
	}
	// The one setup.sh installs first: Debian's nats-server (2.9) on PATH is too old.
	p := filepath.Join(gopath, "bin", "nats-server")
	if _, err := os.Stat(p); err == nil {
		return p
	}
	p, err := exec.LookPath("nats-server")
	Require(t, err == nil, "nats-server not installed (scripts/setup.sh installs it)")
	return p
}

// StartNATS starts nats-server -js (and args) on a free loopback port; it is killed
// when t ends.
func StartNATS(t testing.TB, args ...string) *NATS {
	t.Helper()
	n := &NATS{Store: t.TempDir(), Args: args, bin: NATSServer(t), addr: freePort(t), log: filepath.Join(t.TempDir(), "nats.log")}
	n.URL = "nats://" + n.addr
	n.Start(t)
	t.Cleanup(n.Kill)
	return n
}

func freePort(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// Start (re)starts the server on its address and store and waits until it accepts
// connections.
func (n *NATS) Start(t testing.TB) {
	t.Helper()
	n.mu.Lock()
	defer n.mu.Unlock()
	host, port, _ := net.SplitHostPort(n.addr)
	n.cmd, n.done = startListening(t, "nats-server", exec.Command(n.bin, append([]string{"-js", "-sd", n.Store, "-a", host, "-p", port}, n.Args...)...), n.log, n.addr)
}

// Kill ends the server with SIGKILL, as a crash would.
func (n *NATS) Kill() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd != nil {
		n.cmd.Process.Kill()
		<-n.done
		n.cmd = nil
	}
}

// Proc is a running kiln process other than serve (worker, sequencer), its stderr
// captured.
type Proc struct {
	Name string
	Args []string
	cmd  *exec.Cmd
	done chan struct{}
	mu   sync.Mutex
	log  strings.Builder
	// lines gets every line as it is logged, for WaitLog.
	lines chan string
}

// StartKiln starts kiln with args and waits until a line of its log matches ready.
// It is stopped (SIGTERM, then SIGKILL) when t ends.
func StartKiln(t testing.TB, name string, ready *regexp.Regexp, args ...string) *Proc {
	t.Helper()
	p := &Proc{Name: name, Args: args}
	p.start(t, ready)
	t.Cleanup(func() { p.Stop(t) })
	return p
}

func (p *Proc) start(t testing.TB, ready *regexp.Regexp) {
	t.Helper()
	p.cmd = exec.Command(KilnBin(t), p.Args...)
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p.done = make(chan struct{})
	p.lines = make(chan string, 4096)
	readyc := make(chan struct{}, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			p.mu.Lock()
			p.log.WriteString(line + "\n")
			p.mu.Unlock()
			select {
			case p.lines <- line:
			default:
			}
			if ready != nil && ready.MatchString(line) {
				select {
				case readyc <- struct{}{}:
				default:
				}
			}
		}
	}()
	go func() { p.cmd.Wait(); close(p.done) }()
	if ready == nil {
		return
	}
	select {
	case <-readyc:
	case <-p.done:
		t.Fatalf("kiln %s exited before it was ready:\n%s", p.Name, p.Log())
	case <-time.After(90 * time.Second):
		t.Fatalf("kiln %s not ready within 90s:\n%s", p.Name, p.Log())
	}
}

// Restart starts the same command again (after Kill or Stop).
func (p *Proc) Restart(t testing.TB, ready *regexp.Regexp) {
	t.Helper()
	p.mu.Lock()
	p.log.WriteString("--- restarted ---\n")
	p.mu.Unlock()
	p.start(t, ready)
}

// Log returns what the process logged so far.
func (p *Proc) Log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.log.String()
}

// WaitLog waits until a line matching re is logged (since the last WaitLog) and
// returns it.
func (p *Proc) WaitLog(t testing.TB, re *regexp.Regexp, within time.Duration) string {
	t.Helper()
	deadline := time.After(within)
	for {
		select {
		case l := <-p.lines:
			if re.MatchString(l) {
				return l
			}
		case <-deadline:
			t.Fatalf("kiln %s did not log %q within %v:\n%s", p.Name, re, within, p.Log())
			return ""
		}
	}
}

// Signal sends sig (SIGSTOP, SIGCONT, SIGTERM).
func (p *Proc) Signal(sig syscall.Signal) { p.cmd.Process.Signal(sig) }

// Kill ends the process with SIGKILL, as a crash would, and waits for it.
func (p *Proc) Kill() {
	p.cmd.Process.Signal(syscall.SIGCONT) // a stopped process dies at once too
	p.cmd.Process.Kill()
	<-p.done
}

// Exited reports whether the process has ended.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Stop sends SIGTERM and waits up to a minute, then kills.
func (p *Proc) Stop(t testing.TB) {
	if p.cmd == nil || p.cmd.Process == nil || p.Exited() {
		return
	}
	p.cmd.Process.Signal(syscall.SIGCONT)
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(60 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
		t.Errorf("kiln %s did not stop within 60s of SIGTERM:\n%s", p.Name, p.Log())
	}
}

// Wait waits for the process to exit and returns its exit code.
func (p *Proc) Wait(within time.Duration) (int, error) {
	select {
	case <-p.done:
		return p.cmd.ProcessState.ExitCode(), nil
	case <-time.After(within):
		return 0, fmt.Errorf("kiln %s still runs after %v", p.Name, within)
	}
}
