package test

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/kilnbuild/kiln/test/harness"
)

// remoteBuild is a kiln server with the debian-gcc toolchain and a Bazel workspace
// pointed at it for remote execution.
type remoteBuild struct {
	srv   *harness.Server
	bz    *harness.Bazel
	image string
}

func newRemoteBuild(t *testing.T, serveArgs ...string) *remoteBuild {
	t.Helper()
	if testing.Short() {
		t.Skip("e2e")
	}
	data := t.TempDir()
	digest := harness.RecipeToolchain(t, data, "debian-gcc")
	srv := harness.StartServer(t, append([]string{"--data", data}, serveArgs...)...)
	return &remoteBuild{srv: srv, bz: harness.NewBazel(t, "examples/bazel-hello"), image: "docker://kiln/debian-gcc@" + digest}
}

func (r *remoteBuild) build(t *testing.T, targets ...string) (string, error) {
	t.Helper()
	args := []string{"build", "--remote_executor=grpc://" + r.srv.Addr,
		"--remote_default_exec_properties=container-image=" + r.image, "--jobs=8"}
	return r.bz.Run(t, append(args, targets...)...)
}

// TestBazelRemoteExecution: Bazel 4.2.3 builds the example with every action run by
// kiln in its sandbox on the debian-gcc toolchain; the binary runs on the host; after
// `bazel clean` every action is a remote cache hit.
func TestBazelRemoteExecution(t *testing.T) {
	r := newRemoteBuild(t)
	out, err := r.build(t, "//...")
	if err != nil {
		t.Fatalf("build: %v\n%s\n%s", err, out, r.srv.Log())
	}
	p := harness.Processes(out)
	ran := p["total"] - p["internal"]
	if p["remote"] != ran || ran < 5 {
		t.Fatalf("process summary %v: every non-internal action must run remotely\n%s", p, out)
	}
	hello, err := exec.Command(filepath.Join(r.bz.Workspace, "bazel-bin/app/hello"), "bazel").CombinedOutput()
	if err != nil || strings.TrimSpace(string(hello)) != "hello, bazel (greet 1.0.0)" {
		t.Fatalf("built binary: %v %q", err, hello)
	}
	if n := r.srv.Metric(t, "kiln_executions_total", `outcome="ok"`); int(n) != ran {
		t.Fatalf("server ran %v actions, Bazel counted %d", n, ran)
	}
	if _, err := r.bz.Run(t, "clean"); err != nil {
		t.Fatal(err)
	}
	out, err = r.build(t, "//...")
	if err != nil {
		t.Fatalf("rebuild: %v\n%s", err, out)
	}
	if p := harness.Processes(out); p["remote cache hit"] != ran {
		t.Fatalf("rebuild after clean: %v, want %d remote cache hits\n%s", p, ran, out)
	}
}

// TestBazelRemoteFailures: what goes wrong inside kiln reaches the Bazel user.
func TestBazelRemoteFailures(t *testing.T) {
	r := newRemoteBuild(t, "--default-timeout", "3s")
	// A host listener the genrule would reach without the sandbox.
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("host secret\n"))
			c.Close()
		}
	}()
	port := lis.Addr().(*net.TCPAddr).Port
	hostile := filepath.Join(r.bz.Workspace, "hostile")
	os.MkdirAll(hostile, 0o755)
	build := `
genrule(
    name = "net",
    outs = ["net.txt"],
    cmd = "bash -c 'exec 3<>/dev/tcp/127.0.0.1/PORT && cat <&3' > $@",
)

genrule(
    name = "sleepy",
    outs = ["sleepy.txt"],
    cmd = "sleep 60 && touch $@",
)

cc_binary(
    name = "broken",
    srcs = ["broken.c"],
)
`
	os.WriteFile(filepath.Join(hostile, "BUILD"), []byte(strings.ReplaceAll(build, "PORT", itoa(port))), 0o644)
	os.WriteFile(filepath.Join(hostile, "broken.c"), []byte("int main(void) { return undefined_symbol_kiln; }\n"), 0o644)

	// The network genrule really would work on the host: prove the listener answers.
	if out, err := exec.Command("bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/"+itoa(port)+" && cat <&3").Output(); err != nil || !strings.Contains(string(out), "host secret") {
		t.Fatalf("host listener not reachable from the host: %v", err)
	}
	out, err := r.build(t, "//hostile:net")
	if err == nil || !strings.Contains(out, "Connection refused") || strings.Contains(out, "host secret") {
		t.Fatalf("network genrule: err=%v, want a failure showing the refused connection\n%s", err, out)
	}
	out, err = r.build(t, "//hostile:broken")
	if err == nil || !strings.Contains(out, "undefined_symbol_kiln") || !strings.Contains(out, "error:") {
		t.Fatalf("compile error: err=%v, want the compiler's stderr\n%s", err, out)
	}
	out, err = r.build(t, "//hostile:sleepy")
	if err == nil || !strings.Contains(out, "failed due to timeout") {
		t.Fatalf("sleeping genrule: err=%v, want Bazel to report the DEADLINE_EXCEEDED as a timeout\n%s", err, out)
	}
	if n := r.srv.Metric(t, "kiln_executions_total", `outcome="ok"`); n != 0 {
		t.Fatalf("%v failing actions counted as ok", n)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }
