package sandbox_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/sandbox"
)

// TestPrestartedSandboxesAreFresh: with a pool, every command still gets a sandbox
// nobody used before: its own /tmp, pid namespace and exec root.
func TestPrestartedSandboxesAreFresh(t *testing.T) {
	r := newRunnerWith(t, sandbox.Config{Prestart: 2})
	for i := 0; i < 5; i++ {
		er := execRoot(t)
		o := run(t, r, func(s *sandbox.Spec) { s.ExecRoot = er },
			"/bin/sh", "-c", "ls /tmp; echo x > /tmp/marker; n=0; for p in /proc/[0-9]*; do n=$((n+1)); done; echo $n; pwd; echo out > result")
		// An empty /tmp; only kiln-init and sh in the pid namespace (the glob is sh's own).
		if o.stdout != "2\n/kiln/execroot\n" {
			t.Fatalf("run %d saw %q; want an empty /tmp, 2 processes, its exec root", i, o.stdout)
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
	r, err := sandbox.New(context.Background(), testConfig(sandbox.Config{StateDir: dir, Prestart: 3}))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Run(context.Background(), sandbox.Spec{RootFS: env.rootfs, ExecRoot: execRoot(t), Args: []string{"/bin/true"}}); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	requireNothingLeft(t, dir)
	b, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(b), dir) {
		t.Errorf("mounts left under %s", dir)
	}
}

// preparedInits lists the pids of kiln-init processes (comm "memfd:kiln-init": exec'd
// from its memory file) whose parent is r's sandbox daemon, or this process.
func preparedInits(t *testing.T, r *sandbox.Runner) []int {
	t.Helper()
	parent := sandbox.DaemonPid(r)
	if parent == 0 {
		parent = os.Getpid()
	}
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 || !strings.HasSuffix(s[:i], "(memfd:kiln-init") {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) > 1 && f[1] == strconv.Itoa(parent) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// TestDeadPreparedSandboxIsReplaced: a prepared sandbox killed from outside is not
// handed to a command.
func TestDeadPreparedSandboxIsReplaced(t *testing.T) {
	r := newRunnerWith(t, sandbox.Config{Prestart: 1})
	run(t, r, nil, "/bin/true")
	var pids []int
	for i := 0; i < 500 && len(pids) == 0; i++ {
		pids = preparedInits(t, r)
		time.Sleep(10 * time.Millisecond)
	}
	if len(pids) == 0 {
		t.Fatal("no prepared sandbox appeared")
	}
	for _, pid := range pids {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	// Wait until the kill has landed (the processes are zombies, not yet reaped).
	for _, pid := range pids {
		for i := 0; i < 500; i++ {
			b, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
			if s := string(b); s == "" || strings.Contains(s[strings.LastIndexByte(s, ')'):], ") Z") {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	o := run(t, r, nil, "/bin/sh", "-c", "echo fine")
	if o.stdout != "fine\n" || o.res.ExitCode != 0 {
		t.Fatalf("got %q %+v", o.stdout, o.res)
	}
}

// TestThreadExitsDoNotKillSandboxes: sandboxes are started with a parent-death
// signal, which Linux sends when the *thread* that started them ends. Goroutines that
// lock their thread and return end threads all the time (kiln's own mount binding
// does); sandboxes being started or waiting in the pool must survive.
func TestThreadExitsDoNotKillSandboxes(t *testing.T) {
	r := newRunnerWith(t, sandbox.Config{Prestart: 2})
	stop := make(chan struct{})
	var churn sync.WaitGroup
	churn.Add(1)
	go func() {
		defer churn.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			var wg sync.WaitGroup
			for i := 0; i < 8; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					runtime.LockOSThread() // returning locked ends the thread
					time.Sleep(200 * time.Microsecond)
				}()
			}
			wg.Wait()
		}
	}()
	defer func() { close(stop); churn.Wait() }()
	var wg sync.WaitGroup
	errs := make(chan string, 64)
	for g := 0; g < 6; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 5; i++ {
				res, err := r.Run(context.Background(), sandbox.Spec{RootFS: env.rootfs, Args: []string{"/bin/true"}})
				if err != nil || res.ExitCode != 0 {
					errs <- fmt.Sprint(err, res.ExitCode, res.Signal)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}
