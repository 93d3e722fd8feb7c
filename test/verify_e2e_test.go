package test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/bazelbuild/remote-apis-sdks/go/pkg/client"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/digest"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/uploadinfo"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/verify"
	"github.com/kilnbuild/kiln/test/harness"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// verifyEnv is a data dir with the busybox toolchain for kiln verify.
type verifyEnv struct {
	data, image string
}

func newVerifyEnv(t *testing.T, recipe string) *verifyEnv {
	t.Helper()
	if testing.Short() {
		t.Skip("e2e")
	}
	data := t.TempDir()
	return &verifyEnv{data: data, image: harness.RecipeToolchain(t, data, recipe)}
}

// verify runs kiln verify with --json and returns the report and the exit code.
func (e *verifyEnv) verify(t *testing.T, args ...string) (*verify.Report, harness.Result) {
	t.Helper()
	full := append([]string{"verify", "--data", e.data, "--toolchain", e.image, "--json"}, args...)
	res := harness.Run(t, full...)
	if res.Code != 0 && res.Code != 1 {
		t.Fatalf("kiln verify exited %d: %s", res.Code, res.Stderr)
	}
	rep := &verify.Report{}
	if err := json.Unmarshal([]byte(res.Stdout), rep); err != nil {
		t.Fatalf("--json output: %v\n%s", err, res.Stdout)
	}
	if (res.Code == 0) != rep.Deterministic {
		t.Fatalf("exit code %d with deterministic=%v", res.Code, rep.Deterministic)
	}
	return rep, res
}

// only returns the single difference of a report, which must be output out.
func only(t *testing.T, rep *verify.Report, out string) verify.Difference {
	t.Helper()
	if rep.Deterministic || len(rep.Differences) != 1 || rep.Differences[0].Output != out {
		t.Fatalf("want exactly %s to differ: %+v", out, rep.Differences)
	}
	return rep.Differences[0]
}

func TestVerifyDeterministicAction(t *testing.T) {
	e := newVerifyEnv(t, "busybox")
	keep := filepath.Join(t.TempDir(), "keep")
	res := harness.Run(t, "verify", "--data", e.data, "--toolchain", e.image, "--runs", "3", "--keep", keep,
		"--env", "A=1", "--env", "B=2", "--output", "out.txt", "--output", "d",
		"--", "/bin/sh", "-c", "echo hello > out.txt; mkdir -p d/e; echo $A$B > d/e/f; ln -s e/f d/link; echo done")
	if res.Code != 0 || !strings.Contains(res.Stdout, "3 runs, deterministic (varied: hostname, uid, execroot, cpus, aslr, env-order, time)") {
		t.Fatalf("exit %d\n%s\n%s", res.Code, res.Stdout, res.Stderr)
	}
	// --keep holds every run's outputs and the reports.
	for _, run := range []string{"run-1", "run-2", "run-3"} {
		if b, err := os.ReadFile(filepath.Join(keep, run, "out/d/e/f")); err != nil || string(b) != "12\n" {
			t.Errorf("%s: %q %v", run, b, err)
		}
		if b, _ := os.ReadFile(filepath.Join(keep, run, "stdout")); string(b) != "done\n" {
			t.Errorf("%s stdout %q", run, b)
		}
	}
	var rep verify.Report
	b, _ := os.ReadFile(filepath.Join(keep, "report.json"))
	if err := json.Unmarshal(b, &rep); err != nil || !rep.Deterministic || rep.Outputs != 5 || len(rep.Runs) != 3 {
		t.Fatalf("report.json: %v %+v", err, rep)
	}
	// A non-empty --keep is refused before anything runs.
	if res := harness.Run(t, "verify", "--data", e.data, "--keep", keep, "--", "/bin/true"); res.Code != 2 || !strings.Contains(res.Stderr, "not empty") {
		t.Fatalf("non-empty --keep: %d %s", res.Code, res.Stderr)
	}
}

func TestVerifyNamesTheVariation(t *testing.T) {
	e := newVerifyEnv(t, "busybox")
	for _, tc := range []struct{ name, script, cause string }{
		{"time", "date +%s%N > out", verify.Time},
		{"hostname", "hostname > out", verify.Hostname},
		{"uid", "id -u > out", verify.UID},
		{"execroot", "pwd > out", verify.ExecRoot},
		{"aslr", "grep stack /proc/self/maps > out", verify.ASLR},
		{"cpus", "nproc > out", verify.CPUs},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.cause == verify.CPUs && runtime.NumCPU() < 2 {
				t.Skip("one CPU: the CPU set cannot vary")
			}
			rep, res := e.verify(t, "--diffoscope", "none", "--output", "out", "--", "/bin/sh", "-c", tc.script)
			d := only(t, rep, "out")
			if !reflect.DeepEqual(d.Causes, []string{tc.cause}) || d.Kind != verify.KindFile || d.FirstDifferentByte < 0 {
				t.Fatalf("difference %+v, want out under %s", d, tc.cause)
			}
			if res.Code != 1 || rep.ReportDir == "" {
				t.Fatalf("exit %d, report dir %q", res.Code, rep.ReportDir)
			}
			// The differing versions are kept for a look.
			a, _ := os.ReadFile(filepath.Join(rep.ReportDir, "run-1/out/out"))
			b, _ := os.ReadFile(filepath.Join(rep.ReportDir, fmt.Sprintf("run-%d/out/out", d.Run)))
			if len(a) == 0 || string(a) == string(b) || int64(len(a)) != d.Baseline.Size {
				t.Fatalf("kept versions %q and %q", a, b)
			}
			os.RemoveAll(rep.ReportDir)
		})
	}
}

// TestVerifyPIDIsDeterministic: a command that records its own PID is deterministic,
// whatever CPU set, host name, uid or exec root it runs under (the sandbox's pid
// namespace gives it the same PID every time).
func TestVerifyPIDIsDeterministic(t *testing.T) {
	e := newVerifyEnv(t, "busybox")
	rep, res := e.verify(t, "--diffoscope", "none", "--runs", "4", "--output", "out.txt",
		"--", "/bin/sh", "-c", "echo $$ > out.txt; sh -c 'echo $$' >> out.txt; true")
	if res.Code != 0 || !rep.Deterministic {
		t.Fatalf("exit %d, differences %+v\n%s", res.Code, rep.Differences, res.Stderr)
	}
}

// TestVerifyTextReport: the human report names the output, sizes, the offset and the
// cause; diffoscope's reports are there when it is installed, and the report says
// so when it is not.
func TestVerifyTextReport(t *testing.T) {
	e := newVerifyEnv(t, "busybox")
	args := []string{"verify", "--data", e.data, "--toolchain", e.image, "--output", "out", "--",
		"/bin/sh", "-c", "echo first line > out; hostname >> out"}
	t.Run("without diffoscope", func(t *testing.T) {
		// PATH without diffoscope: kiln needs nothing from PATH.
		cmd := exec.Command(harness.KilnBin(t), args...)
		cmd.Env = []string{"PATH=/nonexistent"}
		outb, err := cmd.Output()
		out := string(outb)
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
			t.Fatalf("exit %v\n%s", err, out)
		}
		for _, want := range []string{"out (file)", "run 1:  sha256:", "16 bytes", "first different byte: 15", "cause: hostname",
			"diffoscope: not installed", "NONDETERMINISTIC: out differs under hostname"} {
			if !strings.Contains(out, want) {
				t.Errorf("report lacks %q:\n%s", want, out)
			}
		}
		dir := reportDir(t, out)
		if _, err := os.Stat(filepath.Join(dir, "diffoscope")); err == nil {
			t.Error("diffoscope reports without diffoscope")
		}
		if b, _ := os.ReadFile(filepath.Join(dir, "report.txt")); !strings.Contains(string(b), "diffoscope: not installed") {
			t.Errorf("report.txt:\n%s", b)
		}
	})
	t.Run("with diffoscope", func(t *testing.T) {
		if _, err := exec.LookPath("diffoscope"); err != nil {
			t.Skip("diffoscope is optional and large, so setup.sh does not install it; apt-get install diffoscope-minimal to run this")
		}
		res := harness.Run(t, args...)
		if res.Code != 1 {
			t.Fatalf("exit %d %s", res.Code, res.Stderr)
		}
		dir := reportDir(t, res.Stdout)
		txt, err := os.ReadFile(filepath.Join(dir, "diffoscope/out/out.txt"))
		html, err2 := os.ReadFile(filepath.Join(dir, "diffoscope/out/out.html"))
		if err != nil || err2 != nil || !strings.Contains(string(txt), "+kiln-variant-1") || !strings.Contains(string(html), "<html") {
			t.Fatalf("diffoscope reports: %v %v\n%s", err, err2, txt)
		}
		if !strings.Contains(res.Stdout, "| -kiln") || !strings.Contains(res.Stdout, "| +kiln-variant-1") {
			t.Fatalf("no excerpt of diffoscope's text report:\n%s", res.Stdout)
		}
	})
}

func reportDir(t *testing.T, out string) string {
	t.Helper()
	for _, l := range strings.Split(out, "\n") {
		if rest, ok := strings.CutPrefix(l, "report dir  "); ok {
			t.Cleanup(func() { os.RemoveAll(rest) })
			return rest
		}
	}
	t.Fatalf("no report dir in:\n%s", out)
	return ""
}

// TestVerifyJSONSchema pins --json's field names: scripts depend on them.
func TestVerifyJSONSchema(t *testing.T) {
	e := newVerifyEnv(t, "busybox")
	res := harness.Run(t, "verify", "--data", e.data, "--toolchain", e.image, "--json", "--diffoscope", "none",
		"--variations", "hostname,uid", "--output", "out", "--", "/bin/sh", "-c", "hostname > out")
	var m map[string]any
	if err := json.Unmarshal([]byte(res.Stdout), &m); err != nil || res.Code != 1 {
		t.Fatalf("%d %v\n%s", res.Code, err, res.Stdout)
	}
	keys := func(v any) []string {
		var out []string
		for k := range v.(map[string]any) {
			out = append(out, k)
		}
		sort.Strings(out)
		return out
	}
	want := map[string][]string{
		"report":     {"action", "baseline_failed", "compared_runs", "deterministic", "differences", "diffoscope", "outputs", "report_dir", "runs", "unavailable", "variations"},
		"run":        {"differs", "exit_code", "index", "purpose", "seconds", "setting", "started", "stderr", "stdout"},
		"setting":    {"aslr", "cpus", "exec_root", "gid", "hostname", "name", "new_second", "reverse_env", "uid", "varied"},
		"difference": {"baseline", "causes", "first_different_byte", "kind", "other", "output", "run"},
		"entry":      {"digest", "kind", "size"},
	}
	runs := m["runs"].([]any)
	diff := m["differences"].([]any)[0].(map[string]any)
	got := map[string][]string{"report": keys(m), "run": keys(runs[0]), "setting": keys(runs[0].(map[string]any)["setting"]),
		"difference": keys(diff), "entry": keys(diff["baseline"])}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("schema:\n got %v\nwant %v", got, want)
	}
	if m["deterministic"] != false || diff["output"] != "out" || diff["causes"].([]any)[0] != "hostname" || m["diffoscope"] != "disabled" ||
		!reflect.DeepEqual(m["variations"], []any{"hostname", "uid"}) {
		t.Fatalf("values: %s", res.Stdout)
	}
	purposes := []string{}
	for _, r := range runs {
		purposes = append(purposes, r.(map[string]any)["purpose"].(string))
	}
	if !reflect.DeepEqual(purposes, []string{"baseline", "variation", "control", "narrow", "narrow"}) {
		t.Fatalf("runs %v", purposes)
	}
}

// TestVerifyUnsortedListing: an action that lists a directory in readdir order is
// deterministic only because kiln lays out every exec root the same way (see
// docs/verify.md): verify passes, although the listing is not sorted.
func TestVerifyUnsortedListing(t *testing.T) {
	e := newVerifyEnv(t, "busybox")
	in := t.TempDir()
	os.MkdirAll(filepath.Join(in, "d"), 0o755)
	for i := 1; i <= 40; i++ {
		os.WriteFile(filepath.Join(in, "d", fmt.Sprintf("f%d", i*7919%1000)), []byte("x"), 0o644)
	}
	rep, res := e.verify(t, "--input", in, "--output", "list", "--runs", "3", "--", "/bin/sh", "-c", "find d > list")
	if !rep.Deterministic {
		t.Fatalf("unsorted listing of an input directory: %s", res.Stdout)
	}
	// What the action saw really was unsorted (else this test shows nothing).
	out := t.TempDir()
	if r := harness.Run(t, "exec", "--data", e.data, "--toolchain", e.image, "--input", in, "--output", "list", "--out", out,
		"--", "/bin/sh", "-c", "find d > list"); r.Code != 0 {
		t.Fatal(r.Stderr)
	}
	b, _ := os.ReadFile(filepath.Join(out, "list"))
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) != 41 || sort.StringsAreSorted(lines) {
		t.Logf("readdir order on this filesystem is sorted; the listing does not show unsorted order: %v", lines[:5])
	}
}

// TestVerifyStoredAction: --action verifies an action kiln exec stored.
func TestVerifyStoredAction(t *testing.T) {
	e := newVerifyEnv(t, "busybox")
	r := harness.Run(t, "exec", "--data", e.data, "--toolchain", e.image, "--output", "o", "--", "/bin/sh", "-c", "hostname > o")
	var digest string
	for _, l := range strings.Split(r.Stdout, "\n") {
		if d, ok := strings.CutPrefix(l, "action "); ok {
			digest = d
		}
	}
	if r.Code != 0 || digest == "" {
		t.Fatalf("kiln exec: %d %s %s", r.Code, r.Stdout, r.Stderr)
	}
	res := harness.Run(t, "verify", "--data", e.data, "--json", "--diffoscope", "none", "--action", digest)
	var rep verify.Report
	if err := json.Unmarshal([]byte(res.Stdout), &rep); err != nil || res.Code != 1 || rep.Action != digest {
		t.Fatalf("%d %v %s", res.Code, err, res.Stderr)
	}
	only(t, &rep, "o")
	os.RemoveAll(rep.ReportDir)
	for _, bad := range [][]string{
		{"--action", digest, "--output", "x"},
		{"--action", digest, "--", "/bin/true"},
		{"--action", "sha256:" + strings.Repeat("0", 64) + "/5"},
		{"--runs", "11", "--", "/bin/true"},
		{"--variations", "moon", "--", "/bin/true"},
		{},
	} {
		res := harness.Run(t, append([]string{"verify", "--data", e.data}, bad...)...)
		if res.Code != 2 || strings.Count(strings.TrimSpace(res.Stderr), "\n") != 0 || !strings.HasPrefix(res.Stderr, "kiln: ") {
			t.Errorf("%v: exit %d, stderr %q: want 2 and one line", bad, res.Code, res.Stderr)
		}
	}
	// An action that fails is a set-up error, with its stderr shown.
	res = harness.Run(t, "verify", "--data", e.data, "--toolchain", e.image, "--", "/bin/sh", "-c", "echo broken >&2; exit 3")
	if res.Code != 2 || !strings.Contains(res.Stderr, "broken") || !strings.Contains(res.Stderr, "exit code 3") {
		t.Fatalf("failing action: %d %q", res.Code, res.Stderr)
	}
}

// TestVerifyCAction compiles C with gcc from the debian-gcc toolchain. With -g, gcc
// records the build directory (DW_AT_comp_dir), so the object and the binary differ
// under the exec-root variation (a real finding, and its build id with it);
// -ffile-prefix-map makes both identical under every variation.
func TestVerifyCAction(t *testing.T) {
	e := newVerifyEnv(t, "debian-gcc")
	in := t.TempDir()
	os.WriteFile(filepath.Join(in, "hello.c"), []byte("#include <stdio.h>\nstatic const char *who(void) { return \"kiln\"; }\nint main(void) { printf(\"hello, %s\\n\", who()); return 0; }\n"), 0o644)
	build := func(flags string) []string {
		return []string{"--input", in, "--output", "hello.o", "--output", "hello", "--env", "PATH=/usr/bin:/bin", "--",
			"/bin/sh", "-c", "gcc -O2 -g " + flags + " -c hello.c -o hello.o && gcc hello.o -o hello"}
	}
	rep, res := e.verify(t, append([]string{"--runs", "3"}, build("-ffile-prefix-map=$PWD=.")...)...)
	if !rep.Deterministic || rep.Outputs != 2 || len(rep.Runs) != 3 {
		t.Fatalf("gcc with -ffile-prefix-map: %s", res.Stdout)
	}
	rep, res = e.verify(t, append([]string{"--diffoscope", "none"}, build("")...)...)
	if rep.Deterministic || len(rep.Differences) != 2 {
		t.Fatalf("gcc -g without a prefix map was deterministic: %s", res.Stdout)
	}
	for _, d := range rep.Differences {
		if !reflect.DeepEqual(d.Causes, []string{verify.ExecRoot}) {
			t.Fatalf("%s: causes %v, want execroot", d.Output, d.Causes)
		}
	}
	os.RemoveAll(rep.ReportDir)
}

// verifyServer is kiln serve with the busybox toolchain and a REAPI client.
type verifyServer struct {
	srv   *harness.Server
	image string
	c     *client.Client
	exec  func(ctx context.Context, req *repb.ExecuteRequest) (*repb.ExecuteResponse, error)
	ac    func(ctx context.Context, d digest.Digest) error
}

func newVerifyServer(t *testing.T, args ...string) *verifyServer {
	t.Helper()
	if testing.Short() {
		t.Skip("e2e")
	}
	data := t.TempDir()
	image := harness.RecipeToolchain(t, data, "busybox")
	srv := harness.StartServer(t, append([]string{"--data", data}, args...)...)
	c := sdkClient(t, srv.Addr)
	return &verifyServer{srv: srv, image: image, c: c,
		exec: func(ctx context.Context, req *repb.ExecuteRequest) (*repb.ExecuteResponse, error) {
			op, err := c.ExecuteAndWait(ctx, req)
			if err != nil {
				return nil, err
			}
			resp := &repb.ExecuteResponse{}
			if err := op.GetResponse().UnmarshalTo(resp); err != nil {
				return nil, err
			}
			return resp, nil
		},
		ac: func(ctx context.Context, d digest.Digest) error {
			_, err := c.GetActionResult(ctx, &repb.GetActionResultRequest{InstanceName: c.InstanceName, ActionDigest: d.ToProto()})
			return err
		},
	}
}

// action uploads a Command running script and its Action with the given extra
// platform properties, and returns the Action's digest.
func (s *verifyServer) action(t *testing.T, script string, props ...string) digest.Digest {
	t.Helper()
	plat := &repb.Platform{Properties: []*repb.Platform_Property{{Name: "container-image", Value: s.image}}}
	for i := 0; i+1 < len(props); i += 2 {
		plat.Properties = append(plat.Properties, &repb.Platform_Property{Name: props[i], Value: props[i+1]})
	}
	sort.Slice(plat.Properties, func(i, j int) bool { return plat.Properties[i].Name < plat.Properties[j].Name })
	cmd := &repb.Command{Arguments: []string{"/bin/sh", "-c", script}, OutputPaths: []string{"out"}, Platform: plat}
	root := &repb.Directory{}
	var entries []*uploadinfo.Entry
	add := func(m proto.Message) digest.Digest {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		e := uploadinfo.EntryFromBlob(b)
		entries = append(entries, e)
		return e.Digest
	}
	cd, rd := add(cmd), add(root)
	ad := add(&repb.Action{CommandDigest: cd.ToProto(), InputRootDigest: rd.ToProto(), Platform: plat})
	if _, _, err := s.c.UploadIfMissing(context.Background(), entries...); err != nil {
		t.Fatal(err)
	}
	return ad
}

func (s *verifyServer) execute(t *testing.T, d digest.Digest) *repb.ExecuteResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	resp, err := s.exec(ctx, &repb.ExecuteRequest{InstanceName: "e2e", ActionDigest: d.ToProto()})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetStatus().GetCode() != 0 || resp.GetResult().GetExitCode() != 0 {
		t.Fatalf("execute: %v exit %d", resp.GetStatus(), resp.GetResult().GetExitCode())
	}
	return resp
}

// reproducibility returns the kiln:reproducibility byproduct of the link the
// result references.
func (s *verifyServer) reproducibility(t *testing.T, r *repb.ActionResult) string {
	t.Helper()
	env, ok, err := attest.LinkFromResult(r)
	if err != nil || !ok {
		t.Fatalf("no link in the result: %v", err)
	}
	b, _, err := s.c.ReadBlob(context.Background(), digest.Digest{Hash: env.Hash, Size: env.Size})
	if err != nil {
		t.Fatal(err)
	}
	var dsse struct{ Payload []byte }
	var link struct {
		Byproducts map[string]any `json:"byproducts"`
	}
	if err := json.Unmarshal(b, &dsse); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(dsse.Payload, &link); err != nil {
		t.Fatalf("link payload: %v\n%s", err, dsse.Payload)
	}
	got, _ := link.Byproducts[attest.ByproductReproducibility].(string)
	return got
}

func (s *verifyServer) cached(t *testing.T, d digest.Digest) bool {
	t.Helper()
	err := s.ac(context.Background(), d)
	if err != nil && status.Code(err) != codes.NotFound {
		t.Fatal(err)
	}
	return err == nil
}

// TestServerVerifyProperty: kiln-verify=2 through a real REAPI client. A
// nondeterministic action's result comes back (the build goes on) with a message
// saying what differs under which variation, is not cached (the next Execute runs it
// again) and is counted; a deterministic one is cached.
func TestServerVerifyProperty(t *testing.T) {
	s := newVerifyServer(t)
	bad := s.action(t, "hostname > out", "kiln-verify", "2")
	for i := 1; i <= 2; i++ {
		resp := s.execute(t, bad)
		if resp.GetCachedResult() || len(resp.GetResult().GetOutputFiles()) != 1 {
			t.Fatalf("execute %d: %v", i, resp)
		}
		msg := resp.GetMessage()
		if !strings.Contains(msg, "NONDETERMINISTIC: out differs under hostname") || !strings.Contains(msg, "not cached") {
			t.Fatalf("message %q", msg)
		}
		if s.cached(t, bad) {
			t.Fatal("nondeterministic result in the action cache")
		}
		if n := s.srv.Metric(t, "kiln_nondeterministic_actions_total"); n != float64(i) {
			t.Fatalf("kiln_nondeterministic_actions_total %v after %d executions", n, i)
		}
		// The link's byproducts record the outcome.
		if got := s.reproducibility(t, resp.GetResult()); !strings.Contains(got, "NONDETERMINISTIC: out differs under hostname") {
			t.Fatalf("link byproduct kiln:reproducibility %q", got)
		}
	}
	good := s.action(t, "echo same > out", "kiln-verify", "3")
	resp := s.execute(t, good)
	if resp.GetCachedResult() || resp.GetMessage() != "" || !s.cached(t, good) {
		t.Fatalf("deterministic: cached=%v message %q", resp.GetCachedResult(), resp.GetMessage())
	}
	if got := s.reproducibility(t, resp.GetResult()); !strings.HasPrefix(got, "kiln-verify: 3 runs, deterministic") {
		t.Fatalf("link byproduct kiln:reproducibility %q", got)
	}
	if resp := s.execute(t, good); !resp.GetCachedResult() {
		t.Fatal("second execute of a verified action was not a cache hit")
	}
	if n := s.srv.Metric(t, "kiln_verified_actions_total", `outcome="deterministic"`); n != 1 {
		t.Fatalf("deterministic checks %v", n)
	}
	// Per bad execution: a variation, a control, one per variation; 2 for the good one.
	if n := s.srv.Metric(t, "kiln_verify_runs_total"); n < 2*3+2 {
		t.Fatalf("extra runs %v", n)
	}
	if n := s.srv.Metric(t, "kiln_nondeterministic_actions_total"); n != 2 {
		t.Fatalf("kiln_nondeterministic_actions_total %v", n)
	}
}

// TestServerVerifyRate: --verify-rate 1 checks actions that do not ask for it.
func TestServerVerifyRate(t *testing.T) {
	s := newVerifyServer(t, "--verify-rate", "1")
	bad := s.action(t, "id -u > out")
	resp := s.execute(t, bad)
	if !strings.Contains(resp.GetMessage(), "out differs under uid") || s.cached(t, bad) {
		t.Fatalf("message %q", resp.GetMessage())
	}
	good := s.action(t, "echo ok > out")
	if resp := s.execute(t, good); resp.GetMessage() != "" || !s.cached(t, good) {
		t.Fatalf("deterministic action under --verify-rate 1: %q", resp.GetMessage())
	}
	if r := harness.Run(t, "serve", "--data", t.TempDir(), "--verify-rate", "1.5"); r.Code != 2 || !strings.Contains(r.Stderr, "--verify-rate") {
		t.Fatalf("--verify-rate 1.5: %d %s", r.Code, r.Stderr)
	}
}
