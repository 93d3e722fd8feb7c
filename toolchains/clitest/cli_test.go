// Package clitest drives the real kiln binary's `kiln toolchain` commands and the
// toolchain recipes. KILN_BIN names the binary (as `make test` sets it); otherwise
// TestMain builds one.
package clitest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"

	"github.com/kilnbuild/kiln/toolchains"
)

var kiln string // path of the kiln binary under test

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	kiln = os.Getenv("KILN_BIN")
	if kiln == "" {
		dir, err := os.MkdirTemp("", "kiln-clitest-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		kiln = filepath.Join(dir, "kiln")
		cmd := exec.Command("go", "build", "-tags", "seccomp", "-o", kiln, "./cmd/kiln")
		cmd.Dir = repoRoot()
		cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "build kiln: %v\n%s", err, out)
			return 1
		}
	}
	return m.Run()
}

// repoRoot is the module root (two levels above this file).
func repoRoot() string {
	_, f, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(f), "..", ".."))
}

type result struct {
	stdout, stderr string
	code           int
}

// kilnRun runs the binary with args and the given extra environment.
func kilnRun(t *testing.T, env []string, args ...string) result {
	t.Helper()
	cmd := exec.Command(kiln, args...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run kiln %v: %v", args, err)
	}
	return result{out.String(), errb.String(), code}
}

// ok runs kiln and fails the test unless it succeeds with an empty stderr.
func ok(t *testing.T, args ...string) string {
	t.Helper()
	r := kilnRun(t, nil, args...)
	if r.code != 0 || r.stderr != "" {
		t.Fatalf("kiln %v: exit %d, stderr %q", args, r.code, r.stderr)
	}
	return r.stdout
}

// fails runs kiln, expects a non-zero exit and exactly one stderr line "kiln: ..."
// containing want, and nothing on stdout.
func fails(t *testing.T, want string, args ...string) {
	t.Helper()
	r := kilnRun(t, nil, args...)
	lines := strings.Split(strings.TrimSuffix(r.stderr, "\n"), "\n")
	if r.code == 0 || len(lines) != 1 || !strings.HasPrefix(lines[0], "kiln: ") || !strings.Contains(lines[0], want) || r.stdout != "" {
		t.Errorf("kiln %v: exit %d, stdout %q, stderr %q; want failure with one line containing %q", args, r.code, r.stdout, r.stderr, want)
	}
}

var digestLine = regexp.MustCompile(`^sha256:[0-9a-f]{64}\n$`)

// smallRoot makes a little directory tree to build images from.
func smallRoot(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "root")
	must(t, os.MkdirAll(filepath.Join(dir, "bin"), 0o755))
	must(t, os.WriteFile(filepath.Join(dir, "bin", "tool"), []byte("#!/bin/sh\necho hi\n"), 0o755))
	must(t, os.Symlink("bin/tool", filepath.Join(dir, "tool")))
	return dir
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestBuildLsInspectExportImportRm(t *testing.T) {
	data := t.TempDir()
	root := smallRoot(t)
	out := ok(t, "toolchain", "build", "--data", data, "--rootfs", root, "--name", "kiln/small:1")
	if !digestLine.MatchString(out) {
		t.Fatalf("build printed %q", out)
	}
	d := strings.TrimSpace(out)
	if again := ok(t, "toolchain", "build", "--data", t.TempDir(), "--rootfs", root, "--name", "other:2"); strings.TrimSpace(again) != d {
		t.Errorf("second build gave %s, first %s", again, d)
	}

	ls := ok(t, "toolchain", "ls", "--data", data)
	if !strings.Contains(ls, d) || !strings.Contains(ls, "kiln/small:1") {
		t.Errorf("ls:\n%s", ls)
	}
	var ents []toolchains.Entry
	must(t, json.Unmarshal([]byte(ok(t, "toolchain", "ls", "--data", data, "--json")), &ents))
	if len(ents) != 1 || ents[0].Digest.String() != d {
		t.Errorf("ls --json: %+v", ents)
	}
	insp := ok(t, "toolchain", "inspect", "--data", data, "docker://kiln/small@"+d)
	if !strings.Contains(insp, "digest:    "+d) || !strings.Contains(insp, "(not unpacked)") {
		t.Errorf("inspect:\n%s", insp)
	}

	dir := strings.TrimSpace(ok(t, "toolchain", "unpack", "--data", data, d))
	if b, err := os.ReadFile(filepath.Join(dir, "bin", "tool")); err != nil || string(b) != "#!/bin/sh\necho hi\n" {
		t.Errorf("unpacked root: %q %v", b, err)
	}

	exp := filepath.Join(t.TempDir(), "small.tar")
	ok(t, "toolchain", "export", "--data", data, d, exp)
	data2 := t.TempDir()
	if got := ok(t, "toolchain", "import", "--data", data2, "--unpack", exp); strings.TrimSpace(got) != d {
		t.Errorf("re-import gave %q, want %s", got, d)
	}

	if got := ok(t, "toolchain", "rm", "--data", data, d); strings.TrimSpace(got) != d {
		t.Errorf("rm printed %q", got)
	}
	gc := ok(t, "toolchain", "gc", "--data", data, "--json")
	var st toolchains.GCStats
	must(t, json.Unmarshal([]byte(gc), &st))
	if st.Roots != 1 || st.Blobs != 3 {
		t.Errorf("gc: %+v", st)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("root survived gc: %v", err)
	}
}

func TestErrorsAreOneLine(t *testing.T) {
	data := t.TempDir()
	root := smallRoot(t)
	d := strings.TrimSpace(ok(t, "toolchain", "build", "--data", data, "--rootfs", root))
	absent := "sha256:" + strings.Repeat("ab", 32)

	// A tampered export: flip a byte in the layer blob.
	lay := filepath.Join(t.TempDir(), "lay")
	ok(t, "toolchain", "export", "--data", data, d, lay)
	var idx struct {
		Manifests []struct{ Digest string }
	}
	b, err := os.ReadFile(filepath.Join(lay, "index.json"))
	must(t, err)
	must(t, json.Unmarshal(b, &idx))
	mf, err := os.ReadFile(filepath.Join(lay, "blobs", "sha256", strings.TrimPrefix(idx.Manifests[0].Digest, "sha256:")))
	must(t, err)
	var m struct{ Layers []struct{ Digest string } }
	must(t, json.Unmarshal(mf, &m))
	lp := filepath.Join(lay, "blobs", "sha256", strings.TrimPrefix(m.Layers[0].Digest, "sha256:"))
	lb, err := os.ReadFile(lp)
	must(t, err)
	lb[len(lb)/2] ^= 1
	must(t, os.WriteFile(lp, lb, 0o644))
	fresh := t.TempDir()
	fails(t, "does not match its digest", "toolchain", "import", "--data", fresh, lay)
	if ls := ok(t, "toolchain", "ls", "--data", fresh, "--json"); strings.TrimSpace(ls) != "[]" {
		t.Errorf("refused import listed: %s", ls)
	}

	fails(t, "no such file", "toolchain", "import", "--data", data, filepath.Join(t.TempDir(), "nope"))
	fails(t, "unpinned", "toolchain", "inspect", "--data", data, "kiln/small:1")
	fails(t, "unpinned", "toolchain", "inspect", "--data", data, "docker://debian:bookworm")
	fails(t, "malformed", "toolchain", "inspect", "--data", data, "kiln/small@sha256:xyz")
	fails(t, "not in the store", "toolchain", "inspect", "--data", data, absent)
	fails(t, "not in the store", "toolchain", "rm", "--data", data, absent)
	fails(t, "unpinned", "toolchain", "rm", "--data", data, "latest")
	fails(t, "already exists", "toolchain", "export", "--data", data, d, lay)
	fails(t, "--rootfs DIR is required", "toolchain", "build", "--data", data)
	fails(t, "no such file", "toolchain", "build", "--data", data, "--rootfs", filepath.Join(t.TempDir(), "nope"))
	fails(t, "without a digest", "toolchain", "build", "--data", data, "--rootfs", root, "--name", "x@"+absent)
	fails(t, "accepts 1 arg", "toolchain", "import", "--data", data)
	r := kilnRun(t, []string{"SOURCE_DATE_EPOCH=yesterday"}, "toolchain", "build", "--data", data, "--rootfs", root)
	if r.code == 0 || !strings.Contains(r.stderr, "SOURCE_DATE_EPOCH") {
		t.Errorf("bad SOURCE_DATE_EPOCH: %+v", r)
	}
}

// TestSourceDateEpoch: the epoch changes the digest, deterministically.
func TestSourceDateEpoch(t *testing.T) {
	root := smallRoot(t)
	run := func(epoch string) string {
		r := kilnRun(t, []string{"SOURCE_DATE_EPOCH=" + epoch}, "toolchain", "build", "--data", t.TempDir(), "--rootfs", root)
		if r.code != 0 {
			t.Fatalf("build: %+v", r)
		}
		return r.stdout
	}
	if a, b, c := run("1700000000"), run("1700000000"), run("0"); a != b || a == c {
		t.Errorf("epoch builds: %s %s %s", a, b, c)
	}
}

// TestServerSeesCLIImport: a Store opened before (like `kiln serve`) resolves an image
// the CLI imports afterwards, without reopening.
func TestServerSeesCLIImport(t *testing.T) {
	ctx := context.Background()
	data := t.TempDir()
	server, err := toolchains.Open(ctx, data, toolchains.Options{})
	must(t, err)
	lay := filepath.Join(t.TempDir(), "lay")
	src := t.TempDir()
	d := strings.TrimSpace(ok(t, "toolchain", "build", "--data", src, "--rootfs", smallRoot(t)))
	ok(t, "toolchain", "export", "--data", src, d, lay)
	if _, err := server.Resolve(ctx, d); err == nil {
		t.Fatal("resolved before import")
	}
	ok(t, "toolchain", "import", "--data", data, lay)
	img, err := server.Resolve(ctx, "docker://kiln/x@"+d)
	if err != nil || img.Digest.String() != d {
		t.Fatalf("server after CLI import: %v", err)
	}
}

// needPrereq skips (or, with KILN_E2E=require, fails) when a prerequisite is missing.
func needPrereq(t *testing.T, ok bool, why string) {
	t.Helper()
	if ok {
		return
	}
	if os.Getenv("KILN_E2E") == "require" {
		t.Fatalf("prerequisite missing: %s", why)
	}
	t.Skip(why)
}

// TestBusyboxRecipe builds the busybox recipe twice (the second from the recipe cache)
// and checks the root it gives.
func TestBusyboxRecipe(t *testing.T) {
	_, err := os.Stat("/bin/busybox")
	needPrereq(t, err == nil, "busybox-static is not installed")
	script := filepath.Join(repoRoot(), "toolchains", "busybox", "build.sh")
	cache := t.TempDir()
	build := func(data string, extra ...string) (string, string) {
		cmd := exec.Command(script, append([]string{"--data", data, "--kiln", kiln}, extra...)...)
		cmd.Env = append(os.Environ(), "KILN_RECIPE_CACHE="+cache)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Run(); err != nil {
			t.Fatalf("%s: %v\n%s", script, err, errb.String())
		}
		if !digestLine.MatchString(out.String()) {
			t.Fatalf("recipe printed %q", out.String())
		}
		return strings.TrimSpace(out.String()), errb.String()
	}
	data := t.TempDir()
	d1, log1 := build(data)
	d2, log2 := build(t.TempDir())
	if d1 != d2 {
		t.Errorf("cached recipe gave %s, built %s", d2, d1)
	}
	if strings.Contains(log1, "importing cached") || !strings.Contains(log2, "importing cached") {
		t.Errorf("cache not used as expected:\n%s\n%s", log1, log2)
	}
	d3, log3 := build(t.TempDir(), "--rebuild")
	if d3 != d1 || strings.Contains(log3, "importing cached") {
		t.Errorf("rebuild: %s (want %s)\n%s", d3, d1, log3)
	}
	root := strings.TrimSpace(ok(t, "toolchain", "unpack", "--data", data, d1))
	if l, err := os.Readlink(filepath.Join(root, "bin", "sh")); err != nil || l != "/bin/busybox" {
		t.Errorf("bin/sh -> %q %v", l, err)
	}
	pw, err := os.ReadFile(filepath.Join(root, "etc", "passwd"))
	if err != nil || !strings.Contains(string(pw), "build:x:1000:1000:") {
		t.Errorf("etc/passwd: %q %v", pw, err)
	}
	if fi, err := os.Stat(filepath.Join(root, "tmp")); err != nil || !fi.IsDir() {
		t.Errorf("tmp: %v", err)
	}
	// The busybox in the root runs (it is static).
	out, err := exec.Command(filepath.Join(root, "bin", "busybox"), "echo", "ok").Output()
	if err != nil || string(out) != "ok\n" {
		t.Errorf("busybox echo: %q %v", out, err)
	}
}
