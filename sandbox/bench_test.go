package sandbox_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"syscall"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/sandbox"
)

// BenchmarkSandboxOverhead measures create -> run /bin/true -> destroy for a kiln
// sandbox (full isolation: namespaces including net, seccomp, cgroups, read-only
// overlay root, kiln-init), interleaved in the same run with Debian's bubblewrap
// (bwrap --unshare-all --ro-bind ROOT / --dev /dev --proc /proc /bin/true) and a bare
// fork/exec of /bin/true, and reports p50/p95 of each and their ratios.
//
//	go test -tags seccomp -run '^$' -bench SandboxOverhead -benchtime 200x ./sandbox/
func BenchmarkSandboxOverhead(b *testing.B) {
	need(b)
	bwrap, err := exec.LookPath("bwrap")
	if err != nil {
		if os.Getenv("KILN_E2E") == "require" {
			b.Fatal("bubblewrap not installed")
		}
		b.Skip("bubblewrap not installed")
	}
	cold := newRunner(b)
	warm := newRunnerWith(b, sandbox.Config{Prestart: 1})
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
		"kiln-cold": kiln(cold),
		"kiln-warm": kiln(warm),
		"bwrap": func() error {
			return exec.Command(bwrap, "--unshare-all", "--ro-bind", env.rootfs, "/", "--dev", "/dev", "--proc", "/proc", "/bin/true").Run()
		},
		"bare": func() error { return exec.Command(trueBin).Run() },
	}
	order := []string{"kiln-cold", "kiln-warm", "bwrap", "bare"}
	for _, name := range order { // warm up caches and the Runner's root overlay
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
	for _, k := range []string{"kiln-cold", "kiln-warm"} {
		for _, peer := range []string{"bwrap", "bare"} {
			b.ReportMetric(pct(times[k], 0.50)/pct(times[peer], 0.50), k+"/"+peer+"-p50")
			b.ReportMetric(pct(times[k], 0.95)/pct(times[peer], 0.95), k+"/"+peer+"-p95")
		}
	}
	// CPU per run (this process and its children, kernel and user), measured
	// variant by variant so that each one's background work is its own; for
	// kiln-warm it includes preparing the next sandbox.
	const cpuRuns = 30
	for _, name := range order {
		before := cpuTime()
		for i := 0; i < cpuRuns; i++ {
			if err := runs[name](); err != nil {
				b.Fatalf("%s: %v", name, err)
			}
		}
		b.ReportMetric(float64((cpuTime()-before).Microseconds())/1000/cpuRuns, name+"-cpu-ms")
	}
	b.ReportMetric(0, "ns/op")
}

// cpuTime is the user+system time of this process and its reaped children.
func cpuTime() time.Duration {
	var self, kids syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &self)
	syscall.Getrusage(syscall.RUSAGE_CHILDREN, &kids)
	return time.Duration(self.Utime.Nano() + self.Stime.Nano() + kids.Utime.Nano() + kids.Stime.Nano())
}

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
