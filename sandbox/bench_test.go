package sandbox_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/sandbox"
)

// BenchmarkSandboxOverhead measures create -> run /bin/true -> destroy for a kiln
// sandbox (full isolation: namespaces including net, seccomp, cgroups, read-only
// overlay root, kiln-init), interleaved in the same run with Debian's bubblewrap
// (bwrap --unshare-all --ro-bind ROOT / --dev /dev --proc /proc /bin/true) and a bare
// fork/exec of /bin/true, and reports p50/p95 of each, their ratios, and CPU per run.
//
// kiln's sandboxes are created two ways, each cold (prepared on demand) and warm
// (Prestart: 1). sandboxd-*: through kiln-sandboxd, built as `make build` builds it,
// which is what kiln built by make does. inproc-*: from this test process, as kiln
// built without the daemon (or with KILN_SANDBOX_DAEMON=0) does.
//
//	go test -tags seccomp -run '^$' -bench SandboxOverhead -benchtime 200x ./sandbox/
func BenchmarkSandboxOverhead(b *testing.B) {
	need(b)
	if env.daemon == nil {
		b.Skip("run in the daemon pass (the default), which has every way")
	}
	bwrap, err := exec.LookPath("bwrap")
	if err != nil {
		if os.Getenv("KILN_E2E") == "require" {
			b.Fatal("bubblewrap not installed")
		}
		b.Skip("bubblewrap not installed")
	}
	runner := func(cfg sandbox.Config, daemon []byte) *sandbox.Runner {
		cfg.StateDir = b.TempDir()
		r, err := sandbox.New(context.Background(), sandbox.ConfigFor(cfg, daemon))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { r.Close() })
		return r
	}
	runners := map[string]*sandbox.Runner{
		"sandboxd-cold": runner(sandbox.Config{}, env.daemon),
		"sandboxd-warm": runner(sandbox.Config{Prestart: 1}, env.daemon),
		"inproc-cold":   runner(sandbox.Config{}, nil),
		"inproc-warm":   runner(sandbox.Config{Prestart: 1}, nil),
	}
	out := b.TempDir()
	spec := sandbox.Spec{
		RootFS: env.rootfs,
		Args:   []string{"/bin/true"},
		Stdout: sandbox.Output{Path: filepath.Join(out, "stdout")},
		Stderr: sandbox.Output{Path: filepath.Join(out, "stderr")},
	}
	ctx := context.Background()
	trueBin := filepath.Join(env.rootfs, "bin", "true")
	kiln := func(r *sandbox.Runner) func() error {
		return func() error {
			res, err := r.Run(ctx, spec)
			if err == nil && res.ExitCode != 0 {
				b.Fatalf("kiln: %+v", res)
			}
			return err
		}
	}
	runs := map[string]func() error{
		"bwrap": func() error {
			return exec.Command(bwrap, "--unshare-all", "--ro-bind", env.rootfs, "/", "--dev", "/dev", "--proc", "/proc", "/bin/true").Run()
		},
		"bare": func() error { return exec.Command(trueBin).Run() },
	}
	for name, r := range runners {
		runs[name] = kiln(r)
	}
	kilns := []string{"sandboxd-cold", "sandboxd-warm", "inproc-cold", "inproc-warm"}
	order := append(append([]string(nil), kilns...), "bwrap", "bare")
	for _, name := range order { // warm up caches and the Runners' root overlays
		if err := runs[name](); err != nil {
			b.Fatalf("%s: %v", name, err)
		}
	}
	times := map[string][]time.Duration{}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for _, name := range order {
			start := time.Now()
			if err := runs[name](); err != nil {
				b.Fatalf("%s: %v", name, err)
			}
			times[name] = append(times[name], time.Since(start))
		}
	}
	b.StopTimer()
	pct := func(ds []time.Duration, p float64) float64 {
		s := append([]time.Duration(nil), ds...)
		sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
		return float64(s[int(p*float64(len(s)-1))].Microseconds()) / 1000
	}
	for _, name := range order {
		b.ReportMetric(pct(times[name], 0.50), name+"-p50-ms")
		b.ReportMetric(pct(times[name], 0.95), name+"-p95-ms")
	}
	for _, k := range kilns {
		for _, peer := range []string{"bwrap", "bare"} {
			b.ReportMetric(pct(times[k], 0.50)/pct(times[peer], 0.50), k+"/"+peer+"-p50")
			b.ReportMetric(pct(times[k], 0.95)/pct(times[peer], 0.95), k+"/"+peer+"-p95")
		}
	}
	// CPU per run (this process and its children, kernel and user, plus the sandbox
	// daemon and its children for the daemon runs), measured variant by variant so
	// that each one's background work is its own; for the warm runs it includes
	// preparing the next sandbox.
	const cpuRuns = 50
	cpu := map[string]float64{}
	for _, name := range order {
		daemonPid := 0
		if r := runners[name]; r != nil {
			daemonPid = sandbox.DaemonPid(r)
		}
		before := cpuTime(b, daemonPid)
		for i := 0; i < cpuRuns; i++ {
			if err := runs[name](); err != nil {
				b.Fatalf("%s: %v", name, err)
			}
		}
		cpu[name] = float64((cpuTime(b, daemonPid) - before).Microseconds()) / 1000 / cpuRuns
		b.ReportMetric(cpu[name], name+"-cpu-ms")
	}
	for _, k := range kilns {
		b.ReportMetric(cpu[k]/cpu["bwrap"], k+"/bwrap-cpu")
	}
	for _, w := range []string{"cold", "warm"} {
		b.ReportMetric(cpu["sandboxd-"+w]/cpu["inproc-"+w], "sandboxd/inproc-"+w+"-cpu")
		b.ReportMetric(pct(times["sandboxd-"+w], 0.50)/pct(times["inproc-"+w], 0.50), "sandboxd/inproc-"+w+"-p50")
	}
	b.ReportMetric(0, "ns/op")
}

// cpuTime is the user+system time of this process and its reaped children, plus
// that of process daemonPid (if not 0) and its reaped children.
func cpuTime(b *testing.B, daemonPid int) time.Duration {
	var self, kids syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &self)
	syscall.Getrusage(syscall.RUSAGE_CHILDREN, &kids)
	t := time.Duration(self.Utime.Nano() + self.Stime.Nano() + kids.Utime.Nano() + kids.Stime.Nano())
	if daemonPid != 0 {
		st, err := os.ReadFile("/proc/" + strconv.Itoa(daemonPid) + "/stat")
		if err != nil {
			b.Fatal(err)
		}
		s := string(st)
		// pid (comm) state ppid ... utime(14) stime(15) cutime(16) cstime(17), in clock ticks
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
		for _, i := range []int{14, 15, 16, 17} {
			ticks, err := strconv.ParseInt(f[i-3], 10, 64)
			if err != nil {
				b.Fatal(err)
			}
			t += time.Duration(ticks) * time.Second / clockTicks
		}
	}
	return t
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat times (100 on Linux).
const clockTicks = 100

// BenchmarkRun is one kiln sandbox run of /bin/true per op (for profiling).
func BenchmarkRun(b *testing.B) {
	r := newRunner(b)
	spec := sandbox.Spec{RootFS: env.rootfs, Args: []string{"/bin/true"}}
	ctx := context.Background()
	if _, err := r.Run(ctx, spec); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := r.Run(ctx, spec); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRunPrestart is BenchmarkRun with a pool of one prepared sandbox.
func BenchmarkRunPrestart(b *testing.B) {
	r := newRunnerWith(b, sandbox.Config{Prestart: 1})
	spec := sandbox.Spec{RootFS: env.rootfs, Args: []string{"/bin/true"}}
	ctx := context.Background()
	if _, err := r.Run(ctx, spec); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := r.Run(ctx, spec); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkConcurrency keeps KILN_BENCH_CONC (default 6) sandboxes busy at once, each
// running a command that computes for KILN_BENCH_WORK iterations of a shell loop
// (default 2000, some milliseconds), and reports the runs per second and how busy
// the machine's CPUs were (CPU time of this process, its sandbox daemon and
// everything they reaped, over wall time times the CPU count): with more sandboxes
// than CPUs, anything that serializes their set-up or tear-down leaves CPUs idle.
//
//	go test -tags seccomp -run '^$' -bench Concurrency -benchtime 200x ./sandbox/
func BenchmarkConcurrency(b *testing.B) {
	conc, work := 6, 2000
	if v, err := strconv.Atoi(os.Getenv("KILN_BENCH_CONC")); err == nil && v > 0 {
		conc = v
	}
	if v, err := strconv.Atoi(os.Getenv("KILN_BENCH_WORK")); err == nil && v >= 0 {
		work = v
	}
	prestart := 0
	if v, err := strconv.Atoi(os.Getenv("KILN_BENCH_PRESTART")); err == nil && v >= 0 {
		prestart = v
	}
	r := newRunnerWith(b, sandbox.Config{Prestart: prestart})
	spec := sandbox.Spec{
		RootFS: env.rootfs, Env: []string{"PATH=/bin"},
		Args: []string{"/bin/sh", "-c", "i=0; while [ $i -lt " + strconv.Itoa(work) + " ]; do i=$((i+1)); done"},
	}
	ctx := context.Background()
	if _, err := r.Run(ctx, spec); err != nil {
		b.Fatal(err)
	}
	daemon := sandbox.DaemonPid(r)
	jobs := make(chan struct{})
	errs := make(chan error, conc)
	done := make(chan struct{})
	for g := 0; g < conc; g++ {
		go func() {
			for range jobs {
				res, err := r.Run(ctx, spec)
				if err == nil && res.ExitCode != 0 {
					err = fmt.Errorf("exit %d", res.ExitCode)
				}
				if err != nil {
					errs <- err
				}
			}
			done <- struct{}{}
		}()
	}
	before := cpuTime(b, daemon)
	idle0, total0 := hostIdle(b)
	start := time.Now()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		jobs <- struct{}{}
	}
	close(jobs)
	for g := 0; g < conc; g++ {
		<-done
	}
	b.StopTimer()
	wall := time.Since(start)
	cpu := cpuTime(b, daemon) - before
	idle1, total1 := hostIdle(b)
	select {
	case err := <-errs:
		b.Fatal(err)
	default:
	}
	b.ReportMetric(float64(b.N)/wall.Seconds(), "runs/s")
	b.ReportMetric(100*cpu.Seconds()/(wall.Seconds()*float64(runtime.NumCPU())), "cpu-busy-%")
	b.ReportMetric(float64(cpu.Microseconds())/1000/float64(b.N), "cpu-ms/run")
	b.ReportMetric(100*float64(idle1-idle0)/float64(total1-total0), "host-idle-%")
	b.ReportMetric(0, "ns/op")
}

// hostIdle returns the idle and total jiffies of all CPUs (/proc/stat): what the
// machine did not use, whoever else runs on it.
func hostIdle(b *testing.B) (idle, total uint64) {
	st, err := os.ReadFile("/proc/stat")
	if err != nil {
		b.Fatal(err)
	}
	line, _, _ := strings.Cut(string(st), "\n")
	for i, f := range strings.Fields(line)[1:] {
		v, _ := strconv.ParseUint(f, 10, 64)
		total += v
		if i == 3 || i == 4 { // idle, iowait
			idle += v
		}
	}
	return idle, total
}
