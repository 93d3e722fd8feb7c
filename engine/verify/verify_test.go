package verify

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// fakeClock is a wall clock that moves only when told: each run takes 300 ms.
type fakeClock struct{ t time.Time }

func (c *fakeClock) Now() time.Time { return c.t }
func (c *fakeClock) Sleep(_ context.Context, d time.Duration) error {
	c.t = c.t.Add(d)
	return nil
}

// produced is what a fake action makes in one run.
type produced struct {
	files  map[string]string
	dirs   map[string]map[string]string // output directory -> file -> content
	links  map[string]string
	stdout string
	exit   int
}

// fakeRunner runs a Go function as the action and stores its outputs like the
// executor does; it records the settings it was given.
type fakeRunner struct {
	t     *testing.T
	cas   *cache.MemoryStore
	clock *fakeClock
	runs  []Setting
	act   func(s Setting, now time.Time, n int) produced
}

func (f *fakeRunner) Run(ctx context.Context, s Setting) (*repb.ActionResult, error) {
	f.runs = append(f.runs, s)
	p := f.act(s, f.clock.t, len(f.runs))
	f.clock.t = f.clock.t.Add(300 * time.Millisecond)
	put := func(content string) *repb.Digest {
		d, err := cache.PutBytes(ctx, f.cas, []byte(content))
		if err != nil {
			f.t.Fatal(err)
		}
		return d.Proto()
	}
	r := &repb.ActionResult{ExitCode: int32(p.exit), StdoutDigest: put(p.stdout)}
	for path, c := range p.files {
		r.OutputFiles = append(r.OutputFiles, &repb.OutputFile{Path: path, Digest: put(c)})
	}
	for path, t := range p.links {
		r.OutputSymlinks = append(r.OutputSymlinks, &repb.OutputSymlink{Path: path, Target: t})
	}
	for path, files := range p.dirs {
		root := &repb.Directory{}
		for name, c := range files {
			root.Files = append(root.Files, &repb.FileNode{Name: name, Digest: put(c)})
		}
		td, err := cache.PutProto(ctx, f.cas, &repb.Tree{Root: root})
		if err != nil {
			f.t.Fatal(err)
		}
		r.OutputDirectories = append(r.OutputDirectories, &repb.OutputDirectory{Path: path, TreeDigest: td.Proto()})
	}
	return r, nil
}

var defaults = Setting{Hostname: "kiln", UID: 1000, GID: 1000, ExecRootPath: "/kiln/execroot", ASLR: true}

func check(t *testing.T, runs int, vars []string, act func(s Setting, now time.Time, n int) produced) (*Report, *fakeRunner) {
	t.Helper()
	clock := &fakeClock{t: time.Date(2030, 1, 1, 0, 0, 0, 100e6, time.UTC)}
	f := &fakeRunner{t: t, cas: cache.NewMemoryStore(), clock: clock, act: act}
	rep, err := Verify(context.Background(), f.cas, f, Options{Action: "sha256:x/1", Runs: runs, Variations: vars,
		Defaults: defaults, CPUs: []int{0, 1, 2, 3}, Clock: clock}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return rep, f
}

func out(files ...string) produced {
	p := produced{files: map[string]string{}}
	for i := 0; i+1 < len(files); i += 2 {
		p.files[files[i]] = files[i+1]
	}
	return p
}

func causes(rep *Report) map[string][]string {
	m := map[string][]string{}
	for _, d := range rep.Differences {
		m[d.Output] = d.Causes
	}
	return m
}

func TestDeterministic(t *testing.T) {
	rep, f := check(t, 3, nil, func(Setting, time.Time, int) produced { return out("a", "same", "b/c", "x") })
	if !rep.Deterministic || len(rep.Differences) != 0 || len(f.runs) != 3 || rep.Outputs != 2 {
		t.Fatalf("report %+v, %d runs", rep, len(f.runs))
	}
	if !f.runs[0].IsBaseline() || f.runs[0].Hostname != "kiln" || !f.runs[0].ASLR {
		t.Fatalf("run 1 is not the defaults: %+v", f.runs[0])
	}
	r2, r3 := f.runs[1], f.runs[2]
	if !reflect.DeepEqual(r2.Varied, All) || r2.Hostname == "kiln" || r2.UID == 1000 || r2.ExecRootPath == "/kiln/execroot" ||
		r2.CPUs != "0" || r2.ASLR || !r2.ReverseEnv || !r2.NewSecond {
		t.Fatalf("run 2 does not vary everything: %+v", r2)
	}
	if r3.Hostname == r2.Hostname || r3.UID == r2.UID || r3.ExecRootPath == r2.ExecRootPath || r3.CPUs != "3" {
		t.Fatalf("run 3 repeats run 2's values: %+v", r3)
	}
	// The time variation: every varied run starts in a later second than the
	// baseline ended, and only the first one had to wait for it.
	baseEnd := rep.Runs[0].Started.Add(time.Duration(rep.Runs[0].Seconds * float64(time.Second)))
	for i := 1; i < len(rep.Runs); i++ {
		if rep.Runs[i].Started.Unix() <= baseEnd.Unix() {
			t.Fatalf("run %d started at %v, in the second the baseline ended (%v)", i+1, rep.Runs[i].Started, baseEnd)
		}
	}
	if gap := rep.Runs[2].Started.Sub(rep.Runs[1].Started); gap != 300*time.Millisecond {
		t.Fatalf("run 3 waited: %v after run 2 started", gap)
	}
	if s := rep.Summary(); s != "3 runs, deterministic (varied: hostname, uid, execroot, cpus, aslr, env-order, time)" {
		t.Fatalf("summary %q", s)
	}
}

func TestNarrowsEachVariation(t *testing.T) {
	for _, tc := range []struct {
		cause string
		act   func(s Setting, now time.Time, n int) produced
	}{
		{Hostname, func(s Setting, _ time.Time, _ int) produced { return out("out", s.Hostname, "same", "1") }},
		{UID, func(s Setting, _ time.Time, _ int) produced { return out("out", fmt.Sprint(s.UID), "same", "1") }},
		{ExecRoot, func(s Setting, _ time.Time, _ int) produced { return out("out", s.ExecRootPath, "same", "1") }},
		{CPUs, func(s Setting, _ time.Time, _ int) produced { return out("out", "nproc "+s.CPUs, "same", "1") }},
		{EnvOrder, func(s Setting, _ time.Time, _ int) produced { return out("out", fmt.Sprint(s.ReverseEnv), "same", "1") }},
		// Wall clock: the second the run happens in.
		{Time, func(_ Setting, now time.Time, _ int) produced { return out("out", fmt.Sprint(now.Unix()), "same", "1") }},
		// Addresses: random with ASLR on, fixed with it off.
		{ASLR, func(s Setting, _ time.Time, n int) produced {
			if s.ASLR {
				return out("out", fmt.Sprintf("0x%x", 0x7f0000+n*4096), "same", "1")
			}
			return out("out", "0x555555", "same", "1")
		}},
	} {
		t.Run(tc.cause, func(t *testing.T) {
			rep, _ := check(t, 2, nil, tc.act)
			if rep.Deterministic || len(rep.Differences) != 1 {
				t.Fatalf("differences %+v", rep.Differences)
			}
			d := rep.Differences[0]
			if d.Output != "out" || d.Kind != KindFile || d.Run != 2 || !reflect.DeepEqual(d.Causes, []string{tc.cause}) {
				t.Fatalf("difference %+v, want out under %s", d, tc.cause)
			}
			if d.FirstDifferentByte < 0 || d.Baseline == nil || d.Other == nil || d.Baseline.Digest == d.Other.Digest {
				t.Fatalf("difference %+v", d)
			}
			if !strings.Contains(rep.Summary(), "out differs under "+tc.cause) {
				t.Fatalf("summary %q", rep.Summary())
			}
		})
	}
}

func TestNarrowingSeveralOutputs(t *testing.T) {
	rep, f := check(t, 2, nil, func(s Setting, now time.Time, _ int) produced {
		p := out("host", s.Hostname, "stamp", fmt.Sprint(now.Unix()), "both", s.Hostname+s.ExecRootPath)
		// Only the two together change this one.
		if s.Hostname != "kiln" && s.UID != 1000 {
			p.files["combo"] = "yes"
		}
		p.stdout = "uid " + fmt.Sprint(s.UID)
		return p
	})
	got := causes(rep)
	want := map[string][]string{"host": {Hostname}, "stamp": {Time}, "both": {Hostname, ExecRoot}, "combo": {Combination}, "stdout": {UID}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("causes %v\nwant %v", got, want)
	}
	for _, d := range rep.Differences {
		if d.Output == "combo" && (d.Baseline != nil || d.Other == nil || d.FirstDifferentByte != -1) {
			t.Fatalf("an output only run 2 made: %+v", d)
		}
	}
	// Order: outputs by path, then stdout.
	var order []string
	for _, d := range rep.Differences {
		order = append(order, d.Output)
	}
	if !reflect.DeepEqual(order, []string{"both", "combo", "host", "stamp", "stdout"}) {
		t.Fatalf("order %v", order)
	}
	// baseline, variation, control, 2 ASLR runs, 6 single variations (time has none).
	if len(f.runs) != 11 || rep.Runs[2].Purpose != PurposeControl || !rep.Runs[2].Setting.IsBaseline() {
		t.Fatalf("%d runs: %+v", len(f.runs), rep.Runs)
	}
}

func TestNoNarrowAndVariationSubset(t *testing.T) {
	clock := &fakeClock{t: time.Unix(100, 0)}
	f := &fakeRunner{t: t, cas: cache.NewMemoryStore(), clock: clock, act: func(s Setting, _ time.Time, _ int) produced {
		return out("out", s.Hostname)
	}}
	rep, err := Verify(context.Background(), f.cas, f, Options{Runs: 2, Variations: []string{Hostname, CPUs}, Defaults: defaults,
		CPUs: []int{0}, NoNarrow: true, Clock: clock}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(f.runs) != 2 || rep.Deterministic || rep.Differences[0].Causes != nil {
		t.Fatalf("%d runs, %+v", len(f.runs), rep.Differences)
	}
	if !reflect.DeepEqual(f.runs[1].Varied, []string{Hostname}) || f.runs[1].CPUs != "" || f.runs[1].NewSecond {
		t.Fatalf("run 2 %+v: want only the hostname varied (one CPU, no time)", f.runs[1])
	}
	if rep.Unavailable[CPUs] == "" {
		t.Fatalf("cpus with one CPU not reported as unavailable: %v", rep.Unavailable)
	}
}

func TestExitCodeAndDirectories(t *testing.T) {
	rep, _ := check(t, 2, []string{UID}, func(s Setting, _ time.Time, _ int) produced {
		p := produced{dirs: map[string]map[string]string{"d": {"f": "x", "g": fmt.Sprint(s.UID)}}, links: map[string]string{"l": "d/f"}}
		if s.UID != 1000 {
			p.exit = 3
			p.links["l"] = "d/g"
		}
		return p
	})
	got := causes(rep)
	want := map[string][]string{"d/g": {UID}, "l": {UID}, "exit code": {UID}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("causes %v, want %v", got, want)
	}
	last := rep.Differences[len(rep.Differences)-1]
	if last.Kind != KindExitCode || *last.Baseline.ExitCode != 0 || *last.Other.ExitCode != 3 {
		t.Fatalf("exit code difference %+v", last)
	}
	if rep.Outputs != 4 { // d, d/f, d/g, l
		t.Fatalf("outputs %d", rep.Outputs)
	}
}

func TestBaselineFailed(t *testing.T) {
	rep, f := check(t, 3, nil, func(Setting, time.Time, int) produced { return produced{exit: 1} })
	if !rep.BaselineFailed || rep.Deterministic || len(f.runs) != 1 {
		t.Fatalf("%+v after %d runs", rep, len(f.runs))
	}
	if !strings.Contains(rep.Summary(), "exit code 1") {
		t.Fatal(rep.Summary())
	}
}

func TestGivenBaseline(t *testing.T) {
	cas := cache.NewMemoryStore()
	clock := &fakeClock{t: time.Unix(100, 0)}
	f := &fakeRunner{t: t, cas: cas, clock: clock, act: func(s Setting, _ time.Time, _ int) produced { return out("o", s.Hostname) }}
	base, _ := f.Run(context.Background(), defaults)
	f.runs = nil
	rep, err := Verify(context.Background(), cas, f, Options{Runs: 2, Variations: []string{Hostname}, Defaults: defaults, Clock: clock}, base)
	if err != nil {
		t.Fatal(err)
	}
	// The runner ran the variation and the narrowing (control, hostname), never run 1 again.
	if len(f.runs) != 3 || f.runs[0].IsBaseline() || rep.Runs[0].Purpose != PurposeBaseline || causes(rep)["o"][0] != Hostname {
		t.Fatalf("%d runs %+v; report %+v", len(f.runs), f.runs, rep.Runs)
	}
}

func TestBadOptions(t *testing.T) {
	for _, o := range []Options{{Runs: 1}, {Runs: MaxRuns + 1}, {Runs: 2, Variations: []string{"moon"}}} {
		if _, err := Verify(context.Background(), cache.NewMemoryStore(), RunnerFunc(func(context.Context, Setting) (*repb.ActionResult, error) {
			t.Fatal("ran")
			return nil, nil
		}), o, nil); err == nil {
			t.Errorf("options %+v accepted", o)
		}
	}
	if _, err := ParseVariations("hostname,moon"); err == nil {
		t.Error("unknown variation accepted")
	}
	if v, err := ParseVariations(" time, gid ,hostname"); err != nil || !reflect.DeepEqual(v, []string{Hostname, UID, Time}) {
		t.Errorf("parse: %v %v", v, err)
	}
	if v, _ := ParseVariations("all"); !reflect.DeepEqual(v, All) {
		t.Errorf("all: %v", v)
	}
}

func TestRunErrorNamesTheRun(t *testing.T) {
	n := 0
	_, err := Verify(context.Background(), cache.NewMemoryStore(), RunnerFunc(func(context.Context, Setting) (*repb.ActionResult, error) {
		n++
		if n == 2 {
			return nil, fmt.Errorf("sandbox exploded")
		}
		return &repb.ActionResult{}, nil
	}), Options{Runs: 2, Defaults: defaults, Clock: &fakeClock{}}, nil)
	if err == nil || !strings.Contains(err.Error(), "run 2 (variant-1)") || !strings.Contains(err.Error(), "sandbox exploded") {
		t.Fatalf("err %v", err)
	}
}

// TestRunErrorKeepsMissingBlobs: a run that fails for want of blobs (an input evicted
// between runs) reaches kiln verify's caller as FAILED_PRECONDITION naming each of them.
func TestRunErrorKeepsMissingBlobs(t *testing.T) {
	gone := []cache.Digest{cache.DigestOf([]byte("input a")), cache.DigestOf([]byte("input b"))}
	n := 0
	_, err := Verify(context.Background(), cache.NewMemoryStore(), RunnerFunc(func(context.Context, Setting) (*repb.ActionResult, error) {
		if n++; n == 2 {
			return nil, cache.MissingBlobsError("the input tree references blobs that are not in the CAS", gone)
		}
		return &repb.ActionResult{}, nil
	}), Options{Runs: 2, Defaults: defaults, Clock: &fakeClock{}}, nil)
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "run 2") {
		t.Fatalf("err %v", err)
	}
	if got := cache.MissingFromError(err); !reflect.DeepEqual(got, gone) {
		t.Fatalf("missing %v, want %v", got, gone)
	}
}

func TestFirstDifference(t *testing.T) {
	ctx := context.Background()
	cas := cache.NewMemoryStore()
	big := bytes.Repeat([]byte("0123456789abcdef"), 10000) // 160000 bytes, over two chunks
	changed := append([]byte(nil), big...)
	changed[131073] = 'X'
	for _, tc := range []struct {
		a, b []byte
		want int64
	}{
		{[]byte("abc"), []byte("abd"), 2},
		{[]byte("abc"), []byte("abcdef"), 3},
		{[]byte("abcdef"), []byte("ab"), 2},
		{[]byte(""), []byte("x"), 0},
		{big, changed, 131073},
		{big, big[:65536], 65536},
		{big, big, -1},
	} {
		da, _ := cache.PutBytes(ctx, cas, tc.a)
		db, _ := cache.PutBytes(ctx, cas, tc.b)
		got, err := FirstDifference(ctx, cas, da, db)
		if err != nil || got != tc.want {
			t.Errorf("%d vs %d bytes: %d %v, want %d", len(tc.a), len(tc.b), got, err, tc.want)
		}
	}
}

func TestWriteArtifactsWithoutDiffoscope(t *testing.T) {
	rep, f := check(t, 2, []string{Hostname}, func(s Setting, _ time.Time, _ int) produced {
		p := out("sub/out.txt", "host "+s.Hostname+"\n", "same", "1")
		p.stdout = s.Hostname
		return p
	})
	dir := filepath.Join(t.TempDir(), "report")
	if err := WriteArtifacts(context.Background(), f.cas, rep, ArtifactOptions{Dir: dir}); err != nil {
		t.Fatal(err)
	}
	for p, want := range map[string]string{
		"run-1/out/sub/out.txt": "host kiln\n", "run-2/out/sub/out.txt": "host kiln-variant-1\n",
		"run-1/stdout": "kiln", "run-2/stdout": "kiln-variant-1",
	} {
		if b, err := os.ReadFile(filepath.Join(dir, p)); err != nil || string(b) != want {
			t.Errorf("%s: %q %v, want %q", p, b, err, want)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "run-1/out/same")); err == nil {
		t.Error("an identical output was kept without KeepAll")
	}
	if rep.Diffoscope != DiffoscopeNotInstalled || rep.Differences[0].Diffoscope != nil {
		t.Fatalf("diffoscope %q %+v", rep.Diffoscope, rep.Differences[0].Diffoscope)
	}
	var txt bytes.Buffer
	WriteText(&txt, rep)
	if !strings.Contains(txt.String(), "diffoscope: not installed") || !strings.Contains(txt.String(), "sub/out.txt (file)") {
		t.Fatalf("text report:\n%s", txt.String())
	}
	var back Report
	b, _ := os.ReadFile(filepath.Join(dir, "report.json"))
	if err := json.Unmarshal(b, &back); err != nil || back.ReportDir != dir || len(back.Differences) != 2 {
		t.Fatalf("report.json: %v %+v", err, back)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "report.txt")); !bytes.Equal(b, txt.Bytes()) {
		t.Fatalf("report.txt differs from WriteText")
	}
	// A directory that holds something is never written into.
	if err := WriteArtifacts(context.Background(), f.cas, rep, ArtifactOptions{Dir: dir}); err == nil {
		t.Fatal("wrote into a non-empty directory")
	}
}

func TestWriteArtifactsKeepAll(t *testing.T) {
	rep, f := check(t, 2, []string{Hostname}, func(s Setting, _ time.Time, _ int) produced {
		p := produced{dirs: map[string]map[string]string{"d": {"f": "x"}}, links: map[string]string{"l": "../../etc/passwd"}}
		return p
	})
	dir := t.TempDir()
	if err := WriteArtifacts(context.Background(), f.cas, rep, ArtifactOptions{Dir: dir, KeepAll: true}); err != nil {
		t.Fatal(err)
	}
	for _, run := range []string{"run-1", "run-2"} {
		if b, err := os.ReadFile(filepath.Join(dir, run, "out/d/f")); err != nil || string(b) != "x" {
			t.Errorf("%s/out/d/f: %q %v", run, b, err)
		}
		if tgt, err := os.Readlink(filepath.Join(dir, run, "out/l")); err != nil || tgt != "../../etc/passwd" {
			t.Errorf("%s/out/l: %q %v", run, tgt, err)
		}
	}
	if rep.Runs[1].OutputDir != "run-2" || rep.Diffoscope != "" {
		t.Fatalf("%+v %q", rep.Runs[1], rep.Diffoscope)
	}
}

func TestWriteArtifactsDiffoscope(t *testing.T) {
	rep, f := check(t, 2, []string{Hostname}, func(s Setting, _ time.Time, _ int) produced {
		return out("out.txt", "line one\nhost "+s.Hostname+"\nline three\n")
	})
	t.Run("failing", func(t *testing.T) {
		// diffoscope's own failure is reported with the difference; the verdict stands.
		fake := filepath.Join(t.TempDir(), "diffoscope")
		os.WriteFile(fake, []byte("#!/bin/sh\necho 'internal error: kaboom' >&2\nexit 2\n"), 0o755)
		if err := WriteArtifacts(context.Background(), f.cas, rep, ArtifactOptions{Dir: t.TempDir(), Diffoscope: fake}); err != nil {
			t.Fatal(err)
		}
		ds := rep.Differences[0].Diffoscope
		if ds == nil || !strings.Contains(ds.Error, "kaboom") || ds.HTML != "" {
			t.Fatalf("%+v", ds)
		}
	})
	t.Run("real", func(t *testing.T) {
		bin := LookDiffoscope()
		if bin == "" {
			t.Skip("diffoscope not installed (it is optional; apt-get install diffoscope-minimal)")
		}
		dir := t.TempDir()
		if err := WriteArtifacts(context.Background(), f.cas, rep, ArtifactOptions{Dir: dir, Diffoscope: bin}); err != nil {
			t.Fatal(err)
		}
		ds := rep.Differences[0].Diffoscope
		if rep.Diffoscope != DiffoscopeRan || ds == nil || ds.Error != "" || ds.Text == "" || ds.HTML == "" {
			t.Fatalf("%q %+v", rep.Diffoscope, ds)
		}
		txt, _ := os.ReadFile(filepath.Join(dir, ds.Text))
		html, _ := os.ReadFile(filepath.Join(dir, ds.HTML))
		if !strings.Contains(string(txt), "-host kiln") || !strings.Contains(string(txt), "+host kiln-variant-1") || !bytes.Contains(html, []byte("<html")) {
			t.Fatalf("text report:\n%s", txt)
		}
		var b bytes.Buffer
		WriteText(&b, rep)
		if !strings.Contains(b.String(), "| +host kiln-variant-1") {
			t.Fatalf("excerpt missing:\n%s", b.String())
		}
	})
}
