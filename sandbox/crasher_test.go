package sandbox_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/sandbox"
)

// crasher runs in a child test process (KILN_SANDBOX_TEST_CRASHER=state dir): it
// starts a long sandbox and waits to be killed, leaving everything behind. With
// KILN_SANDBOX_TEST_DAEMON naming kiln-sandboxd, it runs the sandbox through that
// daemon and writes the daemon's pid to daemon.pid.
func crasher(dir string) {
	var exe []byte
	if p := os.Getenv("KILN_SANDBOX_TEST_DAEMON"); p != "" {
		var err error
		if exe, err = os.ReadFile(p); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	r, err := sandbox.New(context.Background(), sandbox.ConfigFor(sandbox.Config{StateDir: filepath.Join(dir, "state")}, exe))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if err := os.WriteFile(filepath.Join(dir, "daemon.pid"), []byte(strconv.Itoa(sandbox.DaemonPid(r))), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	_, err = r.Run(context.Background(), sandbox.Spec{
		RootFS:   os.Getenv("KILN_SANDBOX_TEST_ROOTFS"),
		ExecRoot: filepath.Join(dir, "execroot"),
		Args:     []string{"/bin/sh", "-c", "touch started; exec sleep 600"},
	})
	fmt.Fprintln(os.Stderr, "crasher: Run returned", err)
	os.Exit(1)
}

// cgroupLeftovers lists the cgroup directories named like a Runner's parent.
func cgroupLeftovers(t *testing.T, name string) []string {
	t.Helper()
	var found []string
	_ = filepath.WalkDir("/sys/fs/cgroup", func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		if strings.HasPrefix(d.Name(), name) {
			found = append(found, p)
			return filepath.SkipDir
		}
		return nil
	})
	return found
}

// waitGone waits until process pid has exited: it is gone, or a zombie whose threads
// have all exited too (only then are its descriptors, and so its locks, released); it
// fails t if that takes more than ten seconds.
func waitGone(t *testing.T, pid int) {
	t.Helper()
	for i := 0; i < 1000; i++ {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil {
			return
		}
		if s := string(b); strings.HasPrefix(s[strings.LastIndexByte(s, ')'):], ") Z") {
			if tasks, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/task"); err != nil || len(tasks) <= 1 {
				return
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("process %d is still alive", pid)
}

// requireNothingLeft fails t if a closed Runner's state dir still holds mounts or
// cgroups.
func requireNothingLeft(t *testing.T, dir string) {
	t.Helper()
	if n := mountsUnder(t, dir); n != 0 {
		t.Errorf("%d mounts left", n)
	}
	if left := cgroupLeftovers(t, sandbox.CgroupName(dir)); len(left) != 0 {
		t.Errorf("cgroups left: %v", left)
	}
}

func mountsUnder(t *testing.T, dir string) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), " "+dir+"/")
}

// cgroupProcesses lists the processes in the cgroups below dirs.
func cgroupProcesses(dirs []string) []string {
	var procs []string
	for _, d := range dirs {
		_ = filepath.WalkDir(d, func(p string, e os.DirEntry, err error) error {
			if err == nil && e.Name() == "cgroup.procs" {
				if b, _ := os.ReadFile(p); len(strings.TrimSpace(string(b))) > 0 {
					procs = append(procs, p+": "+strings.Join(strings.Fields(string(b)), " "))
				}
			}
			return nil
		})
	}
	return procs
}

// TestSweepAfterCrash kills a process in the middle of a Run: its sandbox dies with
// it, and New on the same state directory removes the cgroups and mounts left.
func TestSweepAfterCrash(t *testing.T) {
	need(t)
	dir := t.TempDir()
	er := filepath.Join(dir, "execroot")
	if err := os.Mkdir(er, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(er, sandbox.DefaultUID, sandbox.DefaultGID); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "KILN_SANDBOX_TEST_CRASHER="+dir, "KILN_SANDBOX_TEST_ROOTFS="+env.rootfs,
		"KILN_SANDBOX_TEST_DAEMON="+env.daemonPath)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	for i := 0; ; i++ {
		if _, err := os.Stat(filepath.Join(er, "started")); err == nil {
			break
		}
		if i > 1000 {
			cmd.Process.Kill()
			t.Fatal("the crasher's sandbox never started")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	// Its sandbox daemon, if it had one, dies with it (parent-death signal).
	if b, err := os.ReadFile(filepath.Join(dir, "daemon.pid")); err != nil {
		t.Fatal(err)
	} else if pid, _ := strconv.Atoi(string(b)); pid != 0 {
		waitGone(t, pid)
	} else if env.daemon != nil {
		t.Fatal("the crasher ran no sandbox daemon")
	}

	state := filepath.Join(dir, "state")
	cg := sandbox.CgroupName(state)
	if len(cgroupLeftovers(t, cg)) == 0 || mountsUnder(t, state) == 0 {
		t.Fatalf("the crash left nothing to sweep (cgroups %v, mounts %d): the test proves nothing",
			cgroupLeftovers(t, cg), mountsUnder(t, state))
	}
	// The sandbox died with the process that started it (parent-death signal on its
	// PID 1, which takes its pid namespace along).
	for i := 0; len(cgroupProcesses(cgroupLeftovers(t, cg))) > 0; i++ {
		if i > 500 {
			t.Fatalf("processes of the sandbox outlived the crash: %v", cgroupProcesses(cgroupLeftovers(t, cg)))
		}
		time.Sleep(10 * time.Millisecond)
	}

	r, err := sandbox.New(context.Background(), testConfig(sandbox.Config{StateDir: state}))
	if err != nil {
		t.Fatal(err)
	}
	if n := mountsUnder(t, state); n != 0 {
		t.Errorf("%d mounts left under the state dir", n)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if left := cgroupLeftovers(t, cg); len(left) != 0 {
		t.Errorf("cgroups left after the sweep and Close: %v", left)
	}
}
