package sandbox_test

import (
	"context"
	"fmt"
	"math"
	"os"
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

func TestExitCodesAndSignals(t *testing.T) {
	r := newRunner(t)
	o := run(t, r, nil, "/bin/sh", "-c", "echo out; echo err >&2; exit 3")
	if o.res.ExitCode != 3 || o.res.Signal != 0 || o.stdout != "out\n" || o.stderr != "err\n" {
		t.Fatalf("got %+v stdout %q stderr %q", o.res, o.stdout, o.stderr)
	}
	o = run(t, r, nil, "/bin/sh", "-c", "kill -SEGV $$")
	if o.res.Signal != int(syscall.SIGSEGV) || o.res.ExitCode != 128+11 || o.res.TimedOut || o.res.OOMKilled {
		t.Fatalf("got %+v", o.res)
	}
	o = run(t, r, nil, "/bin/true")
	if o.res.ExitCode != 0 || o.res.Wall <= 0 || o.res.MaxRSS <= 0 || !strings.HasPrefix(o.res.PolicyDigest, "sha256:") {
		t.Fatalf("got %+v", o.res)
	}
}

func TestStartErrors(t *testing.T) {
	r := newRunner(t)
	o := run(t, r, nil, "/no/such/program")
	if o.res.ExitCode != 127 || !strings.Contains(o.res.StartError, "exec /no/such/program") {
		t.Fatalf("got %+v", o.res)
	}
	o = run(t, r, nil, "not-on-path")
	if o.res.ExitCode != 127 || o.res.StartError == "" {
		t.Fatalf("got %+v", o.res)
	}
	o = run(t, r, nil, "/etc/passwd")
	if o.res.ExitCode != 126 || !strings.Contains(o.res.StartError, "permission denied") {
		t.Fatalf("got %+v", o.res)
	}
	o = run(t, r, func(s *sandbox.Spec) { s.Cwd = "/nonexistent" }, "/bin/true")
	if o.res.ExitCode != 127 || !strings.Contains(o.res.StartError, "chdir /nonexistent") {
		t.Fatalf("got %+v", o.res)
	}
}

// TestEnvironmentExactlyAsGiven: nothing added (no HOME), order and duplicates kept.
func TestEnvironmentExactlyAsGiven(t *testing.T) {
	r := newRunner(t)
	envs := []string{"ZED=1", "PATH=/bin", "ALPHA=2", "ZED=3", "EMPTY="}
	o := run(t, r, func(s *sandbox.Spec) { s.Env = envs }, "/bin/env")
	if got := strings.Split(strings.TrimSpace(o.stdout), "\n"); strings.Join(got, "|") != strings.Join(envs, "|") {
		t.Fatalf("env %q, want %q", got, envs)
	}
	o = run(t, r, func(s *sandbox.Spec) { s.Env = envs; s.ReverseEnv = true }, "/bin/env")
	want := []string{"EMPTY=", "ZED=3", "ALPHA=2", "PATH=/bin", "ZED=1"}
	if got := strings.Split(strings.TrimSpace(o.stdout), "\n"); strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("reversed env %q, want %q", got, want)
	}
	o = run(t, r, func(s *sandbox.Spec) { s.Env = nil }, "/bin/env")
	if o.stdout != "" || o.res.ExitCode != 0 {
		t.Fatalf("empty env gave %q (%+v)", o.stdout, o.res)
	}
}

// TestFixedEnvironmentAndVariations checks the defaults the action sees, and each
// reproducibility knob.
func TestFixedEnvironmentAndVariations(t *testing.T) {
	r := newRunner(t)
	er := execRoot(t)
	script := "hostname; id -u; id -g; pwd; umask; cat /proc/self/personality; grep Cpus_allowed_list /proc/self/status | cut -f2; stat -c %a /tmp"
	o := run(t, r, func(s *sandbox.Spec) { s.ExecRoot = er }, "/bin/sh", "-c", script)
	want := "kiln\n1000\n1000\n/kiln/execroot\n0022\n00000000\n"
	if !strings.HasPrefix(o.stdout, want) || !strings.HasSuffix(o.stdout, "\n1777\n") {
		t.Fatalf("defaults:\n%s\nwant prefix\n%s", o.stdout, want)
	}
	o = run(t, r, func(s *sandbox.Spec) {
		s.ExecRoot = er
		s.ExecRootPath = "/build/other/path"
		s.Hostname = "variant"
		s.UID, s.GID = 2345, 3456
		s.CPUs = "0"
		s.DisableASLR = true
		s.Cwd = "sub"
		os.MkdirAll(filepath.Join(er, "sub"), 0o777)
	}, "/bin/sh", "-c", script)
	want = "variant\n2345\n3456\n/build/other/path/sub\n0022\n00040000\n0\n1777\n"
	if o.stdout != want {
		t.Fatalf("variations:\n%s\nwant\n%s", o.stdout, want)
	}
}

// TestExecRootFiles: files the action writes belong to its uid, follow umask 022,
// and the host can read and delete them afterwards.
func TestExecRootFiles(t *testing.T) {
	r := newRunner(t)
	er := execRoot(t)
	o := run(t, r, func(s *sandbox.Spec) { s.ExecRoot = er },
		"/bin/sh", "-c", "mkdir -p out/d && echo data > out/d/f && chmod 000 out/d/f && ln -s /etc/passwd out/link")
	if o.res.ExitCode != 0 {
		t.Fatalf("%+v %s", o.res, o.stderr)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(er, "out", "d"), &st); err != nil {
		t.Fatal(err)
	}
	if st.Uid != sandbox.DefaultUID || st.Gid != sandbox.DefaultGID || st.Mode&0o777 != 0o755 {
		t.Fatalf("out/d: uid %d gid %d mode %o", st.Uid, st.Gid, st.Mode&0o777)
	}
	if b, err := os.ReadFile(filepath.Join(er, "out", "d", "f")); err != nil || string(b) != "data\n" {
		t.Fatalf("host cannot read the output: %q %v", b, err)
	}
	if err := os.RemoveAll(filepath.Join(er, "out")); err != nil {
		t.Fatalf("host cannot delete the output: %v", err)
	}
}

func TestMounts(t *testing.T) {
	r := newRunner(t)
	ro := t.TempDir()
	os.WriteFile(filepath.Join(ro, "in.txt"), []byte("input"), 0o644)
	rw := execRoot(t)
	file := filepath.Join(t.TempDir(), "single")
	os.WriteFile(file, []byte("one file"), 0o644)
	o := run(t, r, func(s *sandbox.Spec) {
		s.Mounts = []sandbox.Mount{
			{Source: ro, Target: "/inputs/ro"},
			{Source: rw, Target: "/outputs", Writable: true},
			{Source: file, Target: "/etc/single.conf"},
		}
	}, "/bin/sh", "-c", "cat /inputs/ro/in.txt; echo; cat /etc/single.conf; echo; touch /inputs/ro/x 2>/dev/null || echo ro-ok; echo w > /outputs/w && echo rw-ok")
	if o.stdout != "input\none file\nro-ok\nrw-ok\n" {
		t.Fatalf("got %q (%s)", o.stdout, o.stderr)
	}
	if b, _ := os.ReadFile(filepath.Join(rw, "w")); string(b) != "w\n" {
		t.Fatalf("writable mount: %q", b)
	}
	// The toolchain directory got none of the mount points.
	for _, p := range []string{"inputs", "outputs", "kiln", "etc/single.conf"} {
		if _, err := os.Lstat(filepath.Join(env.rootfs, p)); err == nil {
			t.Errorf("the sandbox created %s in the toolchain directory", p)
		}
	}
}

func TestStdinIsEmpty(t *testing.T) {
	r := newRunner(t)
	o := run(t, r, nil, "/bin/sh", "-c", "cat; echo done")
	if o.stdout != "done\n" {
		t.Fatalf("got %q", o.stdout)
	}
}

func TestPolicyDigest(t *testing.T) {
	r1, r2 := newRunner(t), newRunner(t)
	a := run(t, r1, nil, "/bin/true").res.PolicyDigest
	b := run(t, r2, func(s *sandbox.Spec) {
		s.Hostname, s.UID, s.GID, s.DisableASLR, s.CPUs = "other", 4242, 4242, true, "0"
		s.ExecRoot, s.ExecRootPath = execRoot(t), "/elsewhere"
		s.Env = []string{"X=1"}
		s.Timeout = time.Hour
	}, "/bin/true").res.PolicyDigest
	// With an exec root the policy has one more mount: compare like with like.
	c := run(t, r1, func(s *sandbox.Spec) { s.ExecRoot = execRoot(t) }, "/bin/true").res.PolicyDigest
	if a == "" || b != c {
		t.Fatalf("variations changed the policy digest: %s vs %s", b, c)
	}
	d := run(t, r1, func(s *sandbox.Spec) { s.Limits.MemoryBytes = 1 << 30 }, "/bin/true").res.PolicyDigest
	e := run(t, r1, func(s *sandbox.Spec) { s.Limits.Pids = 99 }, "/bin/true").res.PolicyDigest
	if d == a || e == a || d == e {
		t.Fatalf("limits did not change the policy digest: %s %s %s", a, d, e)
	}
	if a == c {
		t.Fatalf("an exec root mount did not change the digest")
	}
}

func TestInvalidSpecs(t *testing.T) {
	r := newRunner(t)
	ok := sandbox.Spec{RootFS: env.rootfs, Args: []string{"/bin/true"}}
	for name, c := range map[string]struct {
		mut  func(*sandbox.Spec)
		code codes.Code
	}{
		"no rootfs":          {func(s *sandbox.Spec) { s.RootFS = "" }, codes.InvalidArgument},
		"rootfs is a file":   {func(s *sandbox.Spec) { s.RootFS = "/etc/passwd" }, codes.InvalidArgument},
		"no args":            {func(s *sandbox.Spec) { s.Args = nil }, codes.InvalidArgument},
		"bad env":            {func(s *sandbox.Spec) { s.Env = []string{"NOEQUALS"} }, codes.InvalidArgument},
		"relative target":    {func(s *sandbox.Spec) { s.Mounts = []sandbox.Mount{{Source: "/tmp", Target: "rel"}} }, codes.InvalidArgument},
		"target under /proc": {func(s *sandbox.Spec) { s.Mounts = []sandbox.Mount{{Source: "/tmp", Target: "/proc/x"}} }, codes.InvalidArgument},
		"missing source":     {func(s *sandbox.Spec) { s.Mounts = []sandbox.Mount{{Source: "/nonexistent", Target: "/x"}} }, codes.InvalidArgument},
		"exec root path /":   {func(s *sandbox.Spec) { s.ExecRoot = t.TempDir(); s.ExecRootPath = "/" }, codes.InvalidArgument},
		"unclean path":       {func(s *sandbox.Spec) { s.ExecRoot = t.TempDir(); s.ExecRootPath = "/a/../b" }, codes.InvalidArgument},
		"too many files":     {func(s *sandbox.Spec) { s.Limits.OpenFiles = 1 << 40 }, codes.ResourceExhausted},
		"tiny memory":        {func(s *sandbox.Spec) { s.Limits.MemoryBytes = 1024 }, codes.InvalidArgument},
		"bad cpuset":         {func(s *sandbox.Spec) { s.CPUs = "0-a" }, codes.InvalidArgument},
		"NaN cpus":           {func(s *sandbox.Spec) { s.Limits.CPUs = math.NaN() }, codes.InvalidArgument},
		"huge uid":           {func(s *sandbox.Spec) { s.UID = 1 << 40 }, codes.InvalidArgument},
		"nested mounts": {func(s *sandbox.Spec) {
			s.ExecRoot = t.TempDir()
			s.Mounts = []sandbox.Mount{{Source: "/tmp", Target: "/kiln/execroot/x"}}
		}, codes.InvalidArgument},
	} {
		s := ok
		c.mut(&s)
		_, err := r.Run(context.Background(), s)
		if status.Code(err) != c.code {
			t.Errorf("%s: got %v, want %v", name, err, c.code)
		}
	}
}

func TestCancelKillsEverything(t *testing.T) {
	r := newRunner(t)
	er := execRoot(t)
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		for {
			if _, err := os.Stat(filepath.Join(er, "started")); err == nil {
				cancel()
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	_, err := r.Run(ctx, sandbox.Spec{RootFS: env.rootfs, ExecRoot: er, Env: []string{"PATH=/bin"},
		Args: []string{"/bin/sh", "-c", "touch started; sleep 600 & sleep 600"}})
	if status.Code(err) != codes.Canceled {
		t.Fatalf("got %v, want CANCELED", err)
	}
	_, err = r.Run(ctx, sandbox.Spec{RootFS: env.rootfs, Args: []string{"/bin/true"}})
	if status.Code(err) != codes.Canceled {
		t.Fatalf("Run on a cancelled context: got %v", err)
	}
}

func TestConcurrentRuns(t *testing.T) {
	r := newRunner(t)
	var wg sync.WaitGroup
	errs := make(chan string, 32)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for j := 0; j < 3; j++ {
				out := filepath.Join(t.TempDir(), "out")
				res, err := r.Run(context.Background(), sandbox.Spec{
					RootFS: env.rootfs, Env: []string{"N=" + string(rune('a'+i))},
					Args: []string{"/bin/sh", "-c", "echo $N"}, Stdout: sandbox.Output{Path: out},
				})
				b, _ := os.ReadFile(out)
				if err != nil || res.ExitCode != 0 || string(b) != string(rune('a'+i))+"\n" {
					errs <- fmt.Sprint(err, res, string(b))
				}
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}

func TestRunnerLifecycle(t *testing.T) {
	need(t)
	dir := t.TempDir()
	r, err := sandbox.New(context.Background(), testConfig(sandbox.Config{StateDir: dir}))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sandbox.New(context.Background(), testConfig(sandbox.Config{StateDir: dir})); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("second Runner on a locked state dir: %v", err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Run(context.Background(), sandbox.Spec{RootFS: env.rootfs, Args: []string{"/bin/true"}}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("Run after Close: %v", err)
	}
	if _, err := sandbox.New(context.Background(), testConfig(sandbox.Config{})); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("New without a state dir: %v", err)
	}
}

// TestFirstPIDIsFixed: the command is PID 2 of its pid namespace (kiln-init is 1) in
// every run, whether its sandbox was prepared ahead or on demand, under every
// variation: an output that records a PID must not differ for a reason of kiln's.
func TestFirstPIDIsFixed(t *testing.T) {
	const script = "echo $$; sh -c 'echo $$'; true"
	for _, prestart := range []int{0, 2} {
		r := newRunnerWith(t, sandbox.Config{Prestart: prestart})
		for _, v := range []struct {
			name  string
			tweak func(*sandbox.Spec)
		}{
			{"defaults", nil},
			{"cpuset 0", func(s *sandbox.Spec) { s.CPUs = "0" }},
			{"one-off", func(s *sandbox.Spec) { s.OneOff = true }},
			{"variations", func(s *sandbox.Spec) {
				s.Hostname, s.UID, s.GID, s.DisableASLR, s.ReverseEnv = "other", 2345, 3456, true, true
			}},
			{"cpu quota", func(s *sandbox.Spec) { s.Limits.CPUs = 0.5 }},
		} {
			for i := 0; i < 3; i++ {
				o := run(t, r, v.tweak, "/bin/sh", "-c", script)
				if o.stdout != "2\n3\n" {
					t.Fatalf("prestart %d, %s, run %d: pids %q, want 2 and 3 (stderr %q)", prestart, v.name, i, o.stdout, o.stderr)
				}
			}
		}
	}
}

// TestCgroupsHoldTheLimits reads, from the host, the cgroups a running command is in:
// its own memory and pids cgroups with the Spec's limits (no swap), and the Runner's
// devices cgroup that allows only the sandbox's six devices.
func TestCgroupsHoldTheLimits(t *testing.T) {
	r := newRunner(t)
	if _, err := os.Stat("/sys/fs/cgroup/memory"); err != nil {
		t.Skip("not a cgroup v1 host")
	}
	er := execRoot(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	mark := "KILN_TEST_MARK=" + filepath.Base(er) + strconv.Itoa(os.Getpid())
	go func() {
		_, err := r.Run(ctx, sandbox.Spec{
			RootFS: env.rootfs, ExecRoot: er, Env: []string{"PATH=/bin", mark},
			Limits: sandbox.Limits{MemoryBytes: 96 << 20, Pids: 77},
			Args:   []string{"/bin/sh", "-c", "touch started; exec sleep 600"},
		})
		done <- err
	}()
	var pid int
	for i := 0; pid == 0; i++ {
		if i > 500 {
			t.Fatal("the sandbox did not start")
		}
		time.Sleep(10 * time.Millisecond)
		if _, err := os.Stat(filepath.Join(er, "started")); err != nil {
			continue
		}
		// The sleep: the process with the mark in its environment.
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			if b, err := os.ReadFile("/proc/" + e.Name() + "/environ"); err == nil && strings.Contains(string(b), mark+"\x00") {
				fmt.Sscan(e.Name(), &pid)
			}
		}
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		t.Fatal(err)
	}
	dirs := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.SplitN(line, ":", 3)
		dirs[f[1]] = f[2]
	}
	read := func(sub, file string) string {
		t.Helper()
		b, err := os.ReadFile(filepath.Join("/sys/fs/cgroup", sub, dirs[sub], file))
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(b))
	}
	for _, c := range []struct{ sub, file, want string }{
		{"memory", "memory.limit_in_bytes", strconv.Itoa(96 << 20)},
		{"memory", "memory.memsw.limit_in_bytes", strconv.Itoa(96 << 20)},
		{"pids", "pids.max", "77"},
		{"devices", "devices.list", "c 1:3 rwm\nc 1:5 rwm\nc 1:7 rwm\nc 1:8 rwm\nc 1:9 rwm\nc 5:0 rwm"},
	} {
		if !strings.Contains(dirs[c.sub], "kiln-sandbox-") {
			t.Errorf("%s cgroup %q is not the Runner's", c.sub, dirs[c.sub])
			continue
		}
		if got := read(c.sub, c.file); got != c.want {
			t.Errorf("%s: %q, want %q", c.file, got, c.want)
		}
	}
	cancel()
	<-done
}
