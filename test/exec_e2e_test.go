package test

import (
	"encoding/base64"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	in_toto "github.com/in-toto/in-toto-golang/in_toto"
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
	checkBuildAttestation(t, r, ran)
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
	out, err = r.build(t, "//hostile:broken", "--verbose_failures")
	if err == nil || !strings.Contains(out, "undefined_symbol_kiln") || !strings.Contains(out, "error:") {
		t.Fatalf("compile error: err=%v, want the compiler's stderr\n%s", err, out)
	}
	// Bazel downloads the failed action's server log (kiln's sandbox report) and says where.
	m := regexp.MustCompile(`Server logs of failing action:\s+(\S+/kiln-sandbox)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("compile error: Bazel shows no kiln-sandbox server log\n%s", out)
	}
	if report, err := os.ReadFile(m[1]); err != nil || !strings.Contains(string(report), "exit code   1") || !strings.Contains(string(report), "policy      sha256:") {
		t.Fatalf("sandbox report from Bazel's download: %v\n%s", err, report)
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

// checkBuildAttestation: every action of the build has a link that in-toto-golang's
// own API verifies against the exported public key (none of kiln's verification code
// is used), and the binary's provenance and SBOM name the toolchain and every source.
func checkBuildAttestation(t *testing.T, r *remoteBuild, ran int) {
	t.Helper()
	data := r.srv.Data
	pub := harness.Run(t, "attest", "pubkey", "--data", data)
	if pub.Code != 0 {
		t.Fatalf("attest pubkey: %s", pub.Stderr)
	}
	pubFile := filepath.Join(t.TempDir(), "executor.pub")
	os.WriteFile(pubFile, []byte(pub.Stdout), 0o644)
	var key in_toto.Key
	if err := key.LoadKeyDefaults(pubFile); err != nil {
		t.Fatalf("in-toto cannot load the exported key: %v", err)
	}
	// The provenance walk waits for this process's pending links to be logged.
	prov, sbom := filepath.Join(t.TempDir(), "hello.intoto.json"), filepath.Join(t.TempDir(), "hello.cdx.json")
	hello := filepath.Join(r.bz.Workspace, "bazel-bin/app/hello")
	if res := harness.Run(t, "attest", "provenance", "--data", data, "--subject", hello, "--out", prov, "--sbom", sbom, "--wait", "30s"); res.Code != 0 {
		t.Fatalf("attest provenance: %s", res.Stderr)
	}
	// Envelopes are kept under attest/envelopes/AA/HEX once logged, and under
	// attest/pending/PROCESS/HEX_SIZE until then.
	envelopes := map[string]string{}
	logged, _ := filepath.Glob(filepath.Join(data, "attest", "envelopes", "*", "*"))
	pending, _ := filepath.Glob(filepath.Join(data, "attest", "pending", "*", "*_*"))
	for _, p := range append(logged, pending...) {
		envelopes[strings.SplitN(filepath.Base(p), "_", 2)[0]] = p
	}
	if len(envelopes) != ran {
		t.Fatalf("%d link envelopes for %d executed actions", len(envelopes), ran)
	}
	linkDir := t.TempDir()
	compiles := 0
	for name, p := range envelopes {
		b, _ := os.ReadFile(p)
		f := filepath.Join(linkDir, name+".link")
		os.WriteFile(f, b, 0o644)
		md, err := in_toto.LoadMetadata(f)
		if err != nil {
			t.Fatalf("in-toto cannot load envelope %s: %v", name, err)
		}
		if err := md.VerifySignature(key); err != nil {
			t.Fatalf("envelope %s: in-toto rejects the signature: %v", name, err)
		}
		link, ok := md.GetPayload().(in_toto.Link)
		if !ok {
			t.Fatalf("envelope %s holds %T, not a link", name, md.GetPayload())
		}
		if got := link.Materials["kiln:toolchain"]["sha256"]; "docker://kiln/debian-gcc@sha256:"+got != r.image {
			t.Fatalf("link %s: toolchain material %q, want %s", link.Name, got, r.image)
		}
		if _, ok := link.Materials["app/main.c"]; ok {
			compiles++
		}
	}
	if compiles == 0 {
		t.Fatal("no link has app/main.c among its materials")
	}
	if res := harness.Run(t, "attest", "verify", "--data", data, "--subject", hello, "--key", pubFile, "--provenance", prov, "--sbom", sbom); res.Code != 0 {
		t.Fatalf("attest verify: %s%s", res.Stdout, res.Stderr)
	}
	pb, _ := os.ReadFile(prov)
	sb, _ := os.ReadFile(sbom)
	payload := decodeEnvelopePayload(t, pb)
	digest := strings.TrimPrefix(r.image, "docker://kiln/debian-gcc@sha256:")
	for _, want := range []string{digest, "app/main.c", "lib/greet.c", "lib/greet.h", "lib/VERSION"} {
		if !strings.Contains(payload, want) {
			t.Errorf("provenance does not name %s", want)
		}
		if !strings.Contains(string(sb), want) {
			t.Errorf("SBOM does not name %s", want)
		}
	}
}

func decodeEnvelopePayload(t *testing.T, env []byte) string {
	t.Helper()
	var e struct {
		Payload string `json:"payload"`
	}
	if err := json.Unmarshal(env, &e); err != nil {
		t.Fatalf("provenance is not a DSSE envelope: %v", err)
	}
	b, err := base64.StdEncoding.DecodeString(e.Payload)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
