package test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/test/harness"
)

// lockBazel is a Bazel 4.2.3 workspace with an http_archive, and its own output base.
type lockBazel struct {
	bin, ws, outputBase, userRoot string
}

const lockBuild = `genrule(
    name = "out",
    srcs = ["@dep//:data.txt"],
    outs = ["out.txt"],
    cmd = "cat $(location @dep//:data.txt) > $@",
)
`

// newLockBazel writes a workspace whose WORKSPACE pins @dep to url and sha256.
func newLockBazel(t *testing.T, url, sha256 string) *lockBazel {
	t.Helper()
	bin := harness.RequireCommand(t, "bazel")
	b := &lockBazel{bin: bin, ws: filepath.Join(t.TempDir(), "ws"), outputBase: filepath.Join(t.TempDir(), "ob"),
		userRoot: filepath.Join(os.TempDir(), "kiln-test-bazel-root")}
	os.MkdirAll(b.ws, 0o755)
	ws := `load("@bazel_tools//tools/build_defs/repo:http.bzl", "http_archive")

http_archive(
    name = "dep",
    urls = ["` + url + `"],
    sha256 = "` + sha256 + `",
    strip_prefix = "dep-1.0",
)
`
	if err := os.WriteFile(filepath.Join(b.ws, "WORKSPACE"), []byte(ws), 0o644); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(b.ws, "BUILD"), []byte(lockBuild), 0o644)
	t.Cleanup(func() { b.run("shutdown") })
	return b
}

func (b *lockBazel) run(args ...string) (string, error) {
	full := append([]string{"--output_user_root=" + b.userRoot, "--output_base=" + b.outputBase, "--max_idle_secs=120", "--nohome_rc"}, args...)
	cmd := exec.Command(b.bin, full...)
	cmd.Dir = b.ws
	cmd.Env = append(os.Environ(), "HOME="+filepath.Dir(b.outputBase))
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// build builds //:out with kiln as remote cache and remote downloader. The repository
// cache is off, so every fetch goes to kiln.
func (b *lockBazel) build(addr string) (string, error) {
	return b.run("build", "--repository_cache=", "--remote_cache=grpc://"+addr, "--experimental_remote_downloader=grpc://"+addr,
		"--noremote_upload_local_results", "--spawn_strategy=local", "//:out")
}

// TestLockBazelRemoteDownloader builds a target that depends on an http_archive with
// Bazel 4.2.3 fetching through kiln's Remote Asset API, and checks each refusal.
func TestLockBazelRemoteDownloader(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	origin := newLockOrigin(t)
	archive := lockTarGz(t, "dep-1.0", map[string]string{"BUILD.bazel": "exports_files([\"data.txt\"])\n", "data.txt": "hello from dep\n"})
	origin.set("/dep-1.0.tar.gz", archive)
	url := origin.URL + "/dep-1.0.tar.gz"
	d := cache.DigestOf(archive)
	blobPath := func(data string) string { return filepath.Join(data, "store", "cas", d.Hash[:2], d.Hash) }

	t.Run("pinned, fetched, then served from the CAS", func(t *testing.T) {
		dir := t.TempDir()
		// kiln lock add pins the URL (its own cache is elsewhere, so the server downloads).
		if r := lockKiln(t, dir, "lock", "add", "dep", url, "--data", filepath.Join(dir, "cli-data")); r.Code != 0 {
			t.Fatalf("lock add: %s", r.Stderr)
		}
		data := filepath.Join(dir, "data")
		srv := harness.StartServer(t, "--data", data, "--fetch-allow", origin.host(), "--lockfile", filepath.Join(dir, "kiln.lock"))
		bz := newLockBazel(t, url, d.Hash)
		hits := origin.hits.Load()
		out, err := bz.build(srv.Addr)
		if err != nil {
			t.Fatalf("build: %v\n%s\nserver:\n%s", err, out, srv.Log())
		}
		if got, _ := os.ReadFile(filepath.Join(bz.ws, "bazel-bin", "out.txt")); string(got) != "hello from dep\n" {
			t.Fatalf("out.txt = %q", got)
		}
		if origin.hits.Load() != hits+1 || !strings.Contains(srv.Log(), `msg="asset fetched"`) {
			t.Fatalf("origin hits %d, want 1; server:\n%s", origin.hits.Load()-hits, srv.Log())
		}
		if _, err := os.Stat(blobPath(data)); err != nil {
			t.Fatalf("the archive is not in the CAS: %v", err)
		}
		// After expunging Bazel's copy the archive comes from kiln's CAS, not the origin.
		if out, err := bz.run("clean", "--expunge"); err != nil {
			t.Fatalf("clean: %v\n%s", err, out)
		}
		if out, err := bz.build(srv.Addr); err != nil {
			t.Fatalf("second build: %v\n%s", err, out)
		}
		if origin.hits.Load() != hits+1 || !strings.Contains(srv.Log(), `msg="asset served from the CAS"`) {
			t.Fatalf("second build contacted the origin (%d requests); server:\n%s", origin.hits.Load()-hits-1, srv.Log())
		}
	})

	t.Run("wrong sha256 fails the build and caches nothing", func(t *testing.T) {
		data := filepath.Join(t.TempDir(), "data")
		srv := harness.StartServer(t, "--data", data, "--fetch-allow", origin.host())
		wrong := cache.DigestOf([]byte("not the archive")).Hash
		bz := newLockBazel(t, url, wrong)
		out, err := bz.build(srv.Addr)
		if err == nil {
			t.Fatalf("build with a wrong sha256 succeeded:\n%s", out)
		}
		for _, want := range []string{"content does not match its pin", url, "want sha256:" + wrong, "got sha256:" + d.Hash} {
			if !strings.Contains(out, want) {
				t.Errorf("Bazel's output lacks %q:\n%s", want, out)
			}
		}
		if !strings.Contains(srv.Log(), "nothing cached") || !strings.Contains(srv.Log(), d.Hash) {
			t.Errorf("the server did not log the mismatch with both digests:\n%s", srv.Log())
		}
		if _, err := os.Stat(blobPath(data)); !os.IsNotExist(err) {
			t.Errorf("mismatching content was cached: %v", err)
		}
	})

	t.Run("host not on the allowlist", func(t *testing.T) {
		srv := harness.StartServer(t, "--data", filepath.Join(t.TempDir(), "data"), "--fetch-allow", "mirror.example")
		bz := newLockBazel(t, url, d.Hash)
		hits := origin.hits.Load()
		out, err := bz.build(srv.Addr)
		if err == nil || !strings.Contains(out, "PERMISSION_DENIED") || !strings.Contains(out, "is not on the fetch allowlist") {
			t.Fatalf("build from a host off the allowlist: %v\n%s", err, out)
		}
		if origin.hits.Load() != hits {
			t.Error("the origin was contacted")
		}
	})

	t.Run("lockfile refuses an unpinned URL", func(t *testing.T) {
		dir := t.TempDir()
		origin.set("/pinned.tar.gz", archive)
		if r := lockKiln(t, dir, "lock", "add", "pinned", origin.URL+"/pinned.tar.gz", "--data", filepath.Join(dir, "cli-data")); r.Code != 0 {
			t.Fatalf("lock add: %s", r.Stderr)
		}
		srv := harness.StartServer(t, "--data", filepath.Join(dir, "data"), "--fetch-allow", origin.host(), "--lockfile", filepath.Join(dir, "kiln.lock"))
		bz := newLockBazel(t, url, d.Hash)
		hits := origin.hits.Load()
		out, err := bz.build(srv.Addr)
		if err == nil || !strings.Contains(out, "PERMISSION_DENIED: "+url+" is not pinned in the lockfile") {
			t.Fatalf("build of an unpinned URL: %v\n%s", err, out)
		}
		if origin.hits.Load() != hits {
			t.Error("the origin was contacted")
		}
	})

	t.Run("origin changes the archive", func(t *testing.T) {
		origin.set("/changed.tar.gz", archive)
		curl := origin.URL + "/changed.tar.gz"
		srv := harness.StartServer(t, "--data", filepath.Join(t.TempDir(), "data"), "--fetch-allow", origin.host())
		bz := newLockBazel(t, curl, d.Hash)
		if out, err := bz.build(srv.Addr); err != nil {
			t.Fatalf("build: %v\n%s", err, out)
		}
		// Same URL, new bytes; a fresh server (empty CAS) must download and refuse them.
		origin.set("/changed.tar.gz", lockTarGz(t, "dep-1.0", map[string]string{"BUILD.bazel": "exports_files([\"data.txt\"])\n", "data.txt": "backdoored\n"}))
		srv2 := harness.StartServer(t, "--data", filepath.Join(t.TempDir(), "data"), "--fetch-allow", origin.host())
		bz.run("clean", "--expunge")
		out, err := bz.build(srv2.Addr)
		if err == nil || !strings.Contains(out, "content does not match its pin") {
			t.Fatalf("build of a changed archive: %v\n%s", err, out)
		}
	})
}
