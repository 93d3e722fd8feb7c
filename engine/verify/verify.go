// Package verify checks that an action is deterministic: it runs the action several
// times in fresh sandboxes, each run with a different set of variations (host name,
// uid/gid, exec-root path, CPU set, ASLR, environment order, wall clock), compares
// every output bit for bit, and narrows each difference down to the variation that
// causes it by rerunning with one variation at a time.
//
// The package runs nothing itself: a Runner (package engine) runs the action. Its
// comparison (Manifest, Compare, FillOffsets) and reporting (Report, WriteText,
// WriteArtifacts with diffoscope) serve any check of products against a reference,
// such as a rebuild.
package verify

import (
	"context"
	"fmt"
	"sort"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/internal/clock"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Runner runs the action under test once, in a fresh sandbox with setting s,
// neither reading nor writing the action cache. Outputs are left in the CAS.
type Runner interface {
	Run(ctx context.Context, s Setting) (*repb.ActionResult, error)
}

// RunnerFunc adapts a function to Runner.
type RunnerFunc func(ctx context.Context, s Setting) (*repb.ActionResult, error)

// Run implements Runner.
func (f RunnerFunc) Run(ctx context.Context, s Setting) (*repb.ActionResult, error) { return f(ctx, s) }

// Clock is the wall clock the time variation waits on; tests inject a fake.
type Clock interface {
	Now() time.Time
	Sleep(ctx context.Context, d time.Duration) error
}

// MaxRuns bounds Options.Runs (as the kiln-verify platform property does).
const MaxRuns = 10

// Options configures a check.
type Options struct {
	Action string // the action's digest, for the report
	// Runs is the number of runs compared, the baseline included (2 if 0).
	Runs int
	// Variations to apply (nil: All). Run 1 is the baseline; run k applies every
	// variation with value set k-1.
	Variations []string
	// Defaults is the baseline: kiln's fixed sandbox (the Runner maps a Setting
	// with no Varied names to exactly what a normal execution gets).
	Defaults Setting
	// Unavailable are variations the caller knows cannot change anything for this
	// action (e.g. env-order with fewer than two variables), with the reason.
	Unavailable map[string]string
	// CPUs the runs may use; nil means those this process may run on.
	CPUs []int
	// NoNarrow skips the reruns that find each difference's cause.
	NoNarrow bool
	Clock    Clock // nil: the real clock
}

// Report is the outcome of a check; it is also --json's schema.
type Report struct {
	Action        string `json:"action"`
	Deterministic bool   `json:"deterministic"`
	// BaselineFailed: the action failed (non-zero exit) in run 1, so nothing more ran.
	BaselineFailed bool              `json:"baseline_failed"`
	Variations     []string          `json:"variations"`
	Unavailable    map[string]string `json:"unavailable"`
	// Compared is how many runs were compared (Options.Runs); Runs also lists the
	// narrowing runs.
	Compared    int          `json:"compared_runs"`
	Outputs     int          `json:"outputs"` // outputs of the baseline (files, symlinks, directories)
	Runs        []RunReport  `json:"runs"`
	Differences []Difference `json:"differences"`
	// ReportDir holds the kept outputs, diffoscope's reports, report.json and
	// report.txt (WriteArtifacts); empty if none were written.
	ReportDir string `json:"report_dir"`
	// Diffoscope says whether diffoscope ran: "ran", or why not.
	Diffoscope string `json:"diffoscope"`

	manifests []Manifest // by run, for WriteArtifacts
}

// RunReport describes one run.
type RunReport struct {
	Index   int       `json:"index"`   // 1-based
	Purpose string    `json:"purpose"` // baseline, variation, control, narrow
	Setting Setting   `json:"setting"`
	Exit    int       `json:"exit_code"`
	Started time.Time `json:"started"`
	Seconds float64   `json:"seconds"`
	// Stdout and Stderr are the digests ("sha256:HEX/SIZE") of what the run printed.
	Stdout string `json:"stdout"`
	Stderr string `json:"stderr"`
	// Differs lists the outputs that differ from the baseline's in this run.
	Differs []string `json:"differs"`
	// OutputDir is where this run's outputs were kept, relative to ReportDir.
	OutputDir string `json:"output_dir,omitempty"`
}

// Purposes of runs.
const (
	PurposeBaseline  = "baseline"
	PurposeVariation = "variation"
	PurposeControl   = "control"
	PurposeNarrow    = "narrow"
)

// verifier is one check in progress.
type verifier struct {
	cas    cache.BlobStore
	runner Runner
	clock  Clock
	rep    *Report
	cpus   []int
}

// Verify runs the check. With a non-nil baseline (kiln serve: the execution that
// will be returned) run 1 is not run again. An error means the check could not be
// completed (a run failed to start, or ctx ended); a nondeterministic action is a
// Report with Deterministic false.
func Verify(ctx context.Context, cas cache.BlobStore, r Runner, opts Options, baseline *repb.ActionResult) (*Report, error) {
	if opts.Runs == 0 {
		opts.Runs = 2
	}
	if opts.Runs < 2 || opts.Runs > MaxRuns {
		return nil, status.Errorf(codes.InvalidArgument, "verify: %d runs: want 2 to %d", opts.Runs, MaxRuns)
	}
	if opts.Variations == nil {
		opts.Variations = All
	}
	for _, n := range opts.Variations {
		if !isVariation(n) {
			return nil, status.Errorf(codes.InvalidArgument, "verify: unknown variation %q", n)
		}
	}
	v := &verifier{cas: cas, runner: r, clock: opts.Clock, cpus: opts.CPUs}
	if v.clock == nil {
		v.clock = clock.System()
	}
	if v.cpus == nil {
		v.cpus = allowedCPUs()
	}
	rep := &Report{Action: opts.Action, Variations: append([]string{}, opts.Variations...), Compared: opts.Runs,
		Unavailable: map[string]string{}, Differences: []Difference{}}
	v.rep = rep
	for n, why := range opts.Unavailable {
		rep.Unavailable[n] = why
	}
	if contains(opts.Variations, CPUs) && len(v.cpus) < 2 && rep.Unavailable[CPUs] == "" {
		rep.Unavailable[CPUs] = "only one CPU is available"
	}
	var active []string
	for _, n := range opts.Variations {
		if rep.Unavailable[n] == "" {
			active = append(active, n)
		}
	}
	for n := range rep.Unavailable {
		if !contains(opts.Variations, n) {
			delete(rep.Unavailable, n)
		}
	}

	base := opts.Defaults
	base.Name, base.Varied, base.NewSecond = "baseline", nil, false
	var b *run
	var err error
	if baseline != nil {
		b, err = v.record(ctx, PurposeBaseline, base, baseline)
	} else {
		b, err = v.run(ctx, PurposeBaseline, base, nil)
	}
	if err != nil {
		return nil, err
	}
	rep.Outputs = b.m.Count()
	if b.m.ExitCode != 0 {
		rep.BaselineFailed = true
		return rep, nil
	}

	first := map[string]int{} // difference key -> index in rep.Differences
	for k := 1; k < opts.Runs; k++ {
		r, err := v.run(ctx, PurposeVariation, with(base, fmt.Sprintf("variant-%d", k), active, k, v.cpus), b)
		if err != nil {
			return nil, err
		}
		for _, d := range v.compare(b, r) {
			if _, ok := first[d.key()]; !ok {
				d.Run = r.index
				first[d.key()] = len(rep.Differences)
				rep.Differences = append(rep.Differences, d)
			}
		}
	}
	sortDifferences(rep.Differences)
	if len(rep.Differences) == 0 {
		rep.Deterministic = true
		return rep, nil
	}
	if err := FillOffsets(ctx, cas, rep.Differences); err != nil {
		return nil, err
	}
	if !opts.NoNarrow {
		if err := v.narrow(ctx, base, b, active); err != nil {
			return nil, err
		}
	}
	return rep, nil
}

// run is one finished run.
type run struct {
	index int
	m     Manifest
	end   time.Time
}

// run runs the action once with s and records it. With s.NewSecond it first waits
// for a later wall-clock second than the run it will be compared with (ref) ended:
// anything the action reads from the clock, even in whole seconds, then differs.
// Only that pair needs it, so N runs wait about once, not N times.
func (v *verifier) run(ctx context.Context, purpose string, s Setting, ref *run) (*run, error) {
	if s.NewSecond && ref != nil {
		next := ref.end.Truncate(time.Second).Add(time.Second)
		if d := next.Sub(v.clock.Now()); d > 0 {
			if err := v.clock.Sleep(ctx, d); err != nil {
				return nil, status.FromContextError(err).Err()
			}
		}
	}
	start := v.clock.Now()
	res, err := v.runner.Run(ctx, s)
	if err != nil {
		return nil, grpcerr.Wrap(err, "verify run %d (%s)", len(v.rep.Runs)+1, s.Name)
	}
	end := v.clock.Now()
	return v.add(ctx, purpose, s, res, start, end)
}

// record adds a run that already happened (the server's execution).
func (v *verifier) record(ctx context.Context, purpose string, s Setting, res *repb.ActionResult) (*run, error) {
	end := v.clock.Now() // the run is over: a later second is later than all it saw
	start := end
	if ts := res.GetExecutionMetadata().GetExecutionStartTimestamp(); ts != nil {
		start = ts.AsTime()
	}
	return v.add(ctx, purpose, s, res, start, end)
}

func (v *verifier) add(ctx context.Context, purpose string, s Setting, res *repb.ActionResult, start, end time.Time) (*run, error) {
	m, err := ManifestOf(ctx, v.cas, res)
	if err != nil {
		return nil, grpcerr.Wrap(err, "verify run %d (%s)", len(v.rep.Runs)+1, s.Name)
	}
	if s.Varied == nil {
		s.Varied = []string{}
	}
	r := &run{index: len(v.rep.Runs) + 1, m: m, end: end}
	v.rep.Runs = append(v.rep.Runs, RunReport{Index: r.index, Purpose: purpose, Setting: s, Exit: m.ExitCode,
		Started: start.UTC(), Seconds: end.Sub(start).Seconds(), Stdout: m.Stdout.Digest, Stderr: m.Stderr.Digest, Differs: []string{}})
	v.rep.manifests = append(v.rep.manifests, m)
	return r, nil
}

// compare compares run r with the baseline b and notes what differs in r's report.
func (v *verifier) compare(b, r *run) []Difference {
	diffs := Compare(b.m, r.m)
	rr := &v.rep.Runs[r.index-1]
	for _, d := range diffs {
		rr.Differs = append(rr.Differs, d.Output)
	}
	return diffs
}

// narrow finds which variation makes each difference appear.
//
// A control run repeats the baseline's settings (in a later second when time
// varies): what differs there changes from run to run whatever the settings. If
// ASLR varies, two runs with ASLR off tell addresses (stable with ASLR off) from
// the clock and other run-to-run noise (cause "time"). Every other difference is
// rerun with one variation at a time against the baseline; what no single
// variation reproduces is a Combination.
func (v *verifier) narrow(ctx context.Context, base Setting, b *run, active []string) error {
	diffs := v.rep.Differences
	k0 := MaxRuns
	for _, d := range diffs {
		k0 = min(k0, d.Run-1) // the value set of the first run that differed
	}
	pending := map[string]bool{}
	for _, d := range diffs {
		pending[d.key()] = true
	}
	causes := map[string][]string{}
	keys := func(ds []Difference) map[string]bool {
		out := map[string]bool{}
		for _, d := range ds {
			out[d.key()] = true
		}
		return out
	}
	varyTime := contains(active, Time)

	ctl := base
	ctl.Name, ctl.NewSecond = "control", varyTime
	c, err := v.run(ctx, PurposeControl, ctl, b)
	if err != nil {
		return err
	}
	runToRun := map[string]bool{}
	for k := range keys(v.compare(b, c)) {
		if pending[k] {
			runToRun[k] = true
		}
	}
	if len(runToRun) > 0 {
		if contains(active, ASLR) {
			off := with(base, "aslr-off", []string{ASLR}, 1, v.cpus)
			a1, err := v.run(ctx, PurposeNarrow, off, b)
			if err != nil {
				return err
			}
			off.Name, off.NewSecond = "aslr-off-again", varyTime
			a2, err := v.run(ctx, PurposeNarrow, off, a1)
			if err != nil {
				return err
			}
			v.compare(b, a1)
			v.compare(b, a2)
			unstable := keys(Compare(a1.m, a2.m))
			for k := range runToRun {
				if unstable[k] {
					causes[k] = []string{Time}
				} else {
					causes[k] = []string{ASLR}
				}
			}
		} else {
			for k := range runToRun {
				causes[k] = []string{Time}
			}
		}
	}
	rest := 0
	for k := range pending {
		if !runToRun[k] {
			rest++
		}
	}
	if rest > 0 {
		for _, n := range active {
			if n == Time {
				continue
			}
			r, err := v.run(ctx, PurposeNarrow, with(base, n, []string{n}, k0, v.cpus), b)
			if err != nil {
				return err
			}
			for k := range keys(v.compare(b, r)) {
				if pending[k] && !runToRun[k] {
					causes[k] = append(causes[k], n)
				}
			}
		}
	}
	for i := range diffs {
		k := diffs[i].key()
		if len(causes[k]) == 0 {
			causes[k] = []string{Combination}
		}
		diffs[i].Causes = causes[k]
	}
	return nil
}

// sortDifferences orders outputs by path, then stdout, stderr, exit code.
func sortDifferences(ds []Difference) {
	rank := func(d Difference) int {
		switch d.Kind {
		case KindStdout:
			return 1
		case KindStderr:
			return 2
		case KindExitCode:
			return 3
		}
		return 0
	}
	sort.SliceStable(ds, func(i, j int) bool {
		ri, rj := rank(ds[i]), rank(ds[j])
		if ri != rj {
			return ri < rj
		}
		return ds[i].Output < ds[j].Output
	})
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// allowedCPUs lists the CPUs this process may run on.
func allowedCPUs() []int {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		return []int{0}
	}
	var out []int
	for i := 0; i < 1024 && len(out) < set.Count(); i++ {
		if set.IsSet(i) {
			out = append(out, i)
		}
	}
	if len(out) == 0 {
		out = []int{0}
	}
	return out
}
