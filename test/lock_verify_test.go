package test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/lockfiles"
)

// TestLockAddVerifyFetch drives the real binary: pin a download, verify it, alter the
// stored blob on disk and see verify catch it, then refill the cache with lock fetch.
func TestLockAddVerifyFetch(t *testing.T) {
	origin := newLockOrigin(t)
	body := lockTarGz(t, "dep-1.0", map[string]string{"BUILD.bazel": "exports_files([\"data.txt\"])\n", "data.txt": "hello\n"})
	origin.set("/dep-1.0.tar.gz", body)
	other := []byte("a plain file")
	origin.set("/other.txt", other)
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	url := origin.URL + "/dep-1.0.tar.gz"

	r := lockKiln(t, dir, "lock", "add", "dep", url, "--data", data, "--json")
	if r.Code != 0 {
		t.Fatalf("lock add: exit %d: %s", r.Code, r.Stderr)
	}
	var added struct {
		SHA256  string `json:"sha256"`
		Size    int64  `json:"size"`
		Archive string `json:"archive"`
	}
	if err := json.Unmarshal([]byte(r.Stdout), &added); err != nil {
		t.Fatalf("lock add --json: %v\n%s", err, r.Stdout)
	}
	want := cache.DigestOf(body)
	if added.SHA256 != want.Hash || added.Size != want.Size || added.Archive != "tar.gz" {
		t.Fatalf("lock add recorded %+v, want %v", added, want)
	}
	if r := lockKiln(t, dir, "lock", "add", "other", origin.URL+"/other.txt", "--data", data, "--sha256", cache.DigestOf(other).Hash); r.Code != 0 {
		t.Fatalf("lock add --sha256: exit %d: %s", r.Code, r.Stderr)
	}
	// A wrong --sha256 is refused and nothing is pinned.
	r = lockKiln(t, dir, "lock", "add", "wrong", url, "--data", data, "--sha256", cache.DigestOf(other).Hash)
	if r.Code == 0 || !strings.Contains(r.Stderr, "does not match") {
		t.Fatalf("lock add with a wrong --sha256: exit %d: %s", r.Code, r.Stderr)
	}
	l, err := lockfiles.Load(filepath.Join(dir, "kiln.lock"))
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Dependencies) != 2 {
		t.Fatalf("lockfile has %v", l.DependencyNames())
	}
	if r := lockKiln(t, dir, "lock", "verify", "--data", data); r.Code != 0 || !strings.Contains(r.Stdout, "all 2 dependencies verified") {
		t.Fatalf("verify of a sound cache: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}

	// Flip one byte of the stored blob (files in the store are 0444; root writes anyway).
	path := filepath.Join(data, "store", "cas", want.Hash[:2], want.Hash)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("blob not where the store keeps it: %v", err)
	}
	b[len(b)/2] ^= 0x01
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o444); err != nil {
		t.Fatal(err)
	}
	os.Chmod(path, 0o444)
	r = lockKiln(t, dir, "lock", "verify", "--data", data, "--json")
	if r.Code != 1 {
		t.Fatalf("verify of an altered blob: exit %d, want 1\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
	if !strings.Contains(r.Stderr, "1 of 2 dependencies failed verification: dep (corrupt)") {
		t.Errorf("stderr does not list the bad entry: %q", r.Stderr)
	}
	var report struct {
		OK           bool
		Dependencies []struct{ Name, Status string }
	}
	if err := json.Unmarshal([]byte(r.Stdout), &report); err != nil || report.OK || len(report.Dependencies) != 2 ||
		report.Dependencies[0].Status != "corrupt" || report.Dependencies[1].Status != "ok" {
		t.Errorf("verify --json: %v %+v\n%s", err, report, r.Stdout)
	}

	// lock fetch refetches what is missing (the corrupt blob was removed) and verifies it.
	before := origin.hits.Load()
	r = lockKiln(t, dir, "lock", "fetch", "--data", data)
	if r.Code != 0 || !strings.Contains(r.Stdout, "fetched  dep") || !strings.Contains(r.Stdout, "present  other") {
		t.Fatalf("lock fetch: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
	if origin.hits.Load() != before+1 {
		t.Errorf("lock fetch made %d requests, want 1 (only the missing blob)", origin.hits.Load()-before)
	}
	if r := lockKiln(t, dir, "lock", "verify", "--data", data); r.Code != 0 {
		t.Fatalf("verify after fetch: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}

	// The origin now serves other bytes: lock fetch into an empty cache refuses them.
	origin.set("/dep-1.0.tar.gz", append([]byte{}, append(body, 0)...))
	r = lockKiln(t, dir, "lock", "fetch", "--data", filepath.Join(dir, "data2"))
	if r.Code != 1 || !strings.Contains(r.Stdout, "content does not match its pin") || !strings.Contains(r.Stderr, "dep") {
		t.Fatalf("lock fetch of changed content: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
	if r := lockKiln(t, dir, "lock", "verify", "--data", filepath.Join(dir, "data2")); r.Code != 1 || !strings.Contains(r.Stderr, "dep (missing)") {
		t.Fatalf("changed content was stored: verify exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
}

// TestLockBadLockfileAndToolchainPin checks CLI errors: a bad lockfile is named by line
// and column, and a toolchain reference without a digest is refused.
func TestLockBadLockfileAndToolchainPin(t *testing.T) {
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	os.WriteFile(filepath.Join(dir, "kiln.lock"), []byte("{\n  \"version\": 1,\n  \"dependencies\": {\n    \"x\": {\"urls\": [\"https://h.example/x\"], \"sha256\": \"nope\"}\n  }\n}\n"), 0o644)
	r := lockKiln(t, dir, "lock", "verify", "--data", data)
	if r.Code != 2 || !strings.Contains(r.Stderr, "kiln.lock:4:54: dependency \"x\": sha256 \"nope\"") {
		t.Fatalf("bad lockfile: exit %d: %q", r.Code, r.Stderr)
	}
	lock := filepath.Join(dir, "tc.lock")
	digest := "sha256:" + strings.Repeat("ab", 32)
	r = lockKiln(t, dir, "lock", "pin-toolchain", "debian:12", "docker.io/library/debian@"+digest, "--lockfile", lock, "--data", data)
	if r.Code != 0 {
		t.Fatalf("pin-toolchain: exit %d: %s", r.Code, r.Stderr)
	}
	l, err := lockfiles.Load(lock)
	if err != nil {
		t.Fatal(err)
	}
	if d, ok := l.PinnedDigest("debian:12"); !ok || d != digest {
		t.Errorf("pinned %q, %v", d, ok)
	}
	r = lockKiln(t, dir, "lock", "pin-toolchain", "debian:12", "debian:12", "--lockfile", lock, "--data", data)
	if r.Code == 0 || !strings.Contains(r.Stderr, "has no digest") {
		t.Fatalf("pin-toolchain with a tag: exit %d: %s", r.Code, r.Stderr)
	}
}
