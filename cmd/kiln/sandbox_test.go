package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/kilnbuild/kiln/sandbox"
	"github.com/kilnbuild/kiln/sandbox/sandboxtest"
)

func TestParseBind(t *testing.T) {
	for in, want := range map[string]sandbox.Mount{
		"/a:/b":    {Source: "/a", Target: "/b"},
		"/a:/b:rw": {Source: "/a", Target: "/b", Writable: true},
		"/a:/b:ro": {Source: "/a", Target: "/b"},
	} {
		got, err := parseBind(in)
		if err != nil || got != want {
			t.Errorf("parseBind(%q) = %+v, %v", in, got, err)
		}
	}
	for _, bad := range []string{"", "/a", ":/b", "/a:", "/a:/b:x", "/a:/b:rw:z"} {
		if _, err := parseBind(bad); err == nil {
			t.Errorf("parseBind(%q): no error", bad)
		}
	}
}

func TestParseBytes(t *testing.T) {
	for in, want := range map[string]int64{"": 0, "123": 123, "4K": 4096, "64M": 64 << 20, "1G": 1 << 30, "2Gi": 2 << 30, "3MiB": 3 << 20, "5kb": 5 << 10} {
		if got, err := parseBytes(in); err != nil || got != want {
			t.Errorf("parseBytes(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"x", "-1", "1X", "99999999999T"} {
		if _, err := parseBytes(bad); err == nil {
			t.Errorf("parseBytes(%q): no error", bad)
		}
	}
}

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

// kilnBin is $KILN_BIN (set by make test) or a binary built once for this test run.
func kilnBin(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("KILN_BIN"); p != "" {
		return p
	}
	binOnce.Do(func() {
		dir, err := os.MkdirTemp("", "kiln-sandbox-cli-")
		if err != nil {
			binErr = err
			return
		}
		binPath = filepath.Join(dir, "kiln")
		out, err := exec.Command("go", "build", "-tags", "seccomp", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			binErr = err
			t.Logf("%s", out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

// TestSandboxRunCLI drives `kiln sandbox run` through its exit codes.
func TestSandboxRunCLI(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("KILN_E2E") == "require" {
			t.Fatal("kiln sandbox run needs root")
		}
		t.Skip("kiln sandbox run needs root")
	}
	rootfs := filepath.Join(t.TempDir(), "rootfs")
	if err := sandboxtest.BuildBusyboxRootfs(rootfs); err != nil {
		if os.Getenv("KILN_E2E") != "require" {
			t.Skip(err)
		}
		t.Fatal(err)
	}
	bin := kilnBin(t)
	data := t.TempDir()
	kiln := func(args ...string) (string, string, int) {
		t.Helper()
		cmd := exec.Command(bin, append([]string{"sandbox", "run", "--data", data, "--rootfs", rootfs}, args...)...)
		var out, errb strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return out.String(), errb.String(), code
	}
	if out, _, code := kiln("--env", "PATH=/bin", "--env", "A=1", "--", "sh", "-c", "echo $A; hostname; exit 4"); out != "1\nkiln\n" || code != 4 {
		t.Errorf("plain run: %q, exit %d", out, code)
	}
	if _, errOut, code := kiln("--timeout", "200ms", "--", "/bin/sh", "-c", "while :; do :; done"); code != 124 || !strings.Contains(errOut, "timed out") {
		t.Errorf("timeout: exit %d, stderr %q", code, errOut)
	}
	if _, errOut, code := kiln("--memory", "16M", "--", "/bin/sh", "-c", "x=a; while :; do x=$x$x; done"); code != 137 || !strings.Contains(errOut, "OOM") {
		t.Errorf("OOM: exit %d, stderr %q", code, errOut)
	}
	if _, errOut, code := kiln("--", "/no/such/binary"); code != 127 || strings.Count(errOut, "\n") != 1 {
		t.Errorf("not found: exit %d, stderr %q", code, errOut)
	}
	if _, errOut, code := kiln("--pids", "-5", "--", "/bin/true"); code != 125 || !strings.HasPrefix(errOut, "kiln: ") || strings.Count(errOut, "\n") != 1 {
		t.Errorf("sandbox failure: exit %d, stderr %q", code, errOut)
	}
	if _, errOut, code := kiln("--bind", "nocolon", "--", "/bin/true"); code != 2 || !strings.Contains(errOut, "--bind") {
		t.Errorf("bad flag: exit %d, stderr %q", code, errOut)
	}
	outFile := filepath.Join(t.TempDir(), "out")
	out, _, code := kiln("--json", "--stdout", outFile, "--bind", "/etc/hostname:/etc/h", "--", "/bin/cat", "/etc/h")
	var res sandbox.Result
	if err := json.Unmarshal([]byte(out), &res); err != nil || code != 0 || res.Stdout.Path != outFile || res.Stdout.Size == 0 {
		t.Errorf("--json: %v, exit %d, %q", err, code, out)
	}
	if ents, _ := os.ReadDir(filepath.Join(data, "sandbox-cli")); len(ents) != 0 {
		t.Errorf("state dirs left behind: %v", ents)
	}
}
