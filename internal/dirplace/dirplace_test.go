package dirplace

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/kilnbuild/kiln/internal/dirplace/dirplacetest"
)

func TestSpreadMarksExt4(t *testing.T) {
	dir := t.TempDir()
	dirplacetest.SkipUnlessExt(t, dir)
	if m, err := Marked(dir); err != nil || m {
		t.Fatalf("fresh dir: marked %v, %v", m, err)
	}
	for range 2 { // idempotent
		if err := Spread(dir); err != nil {
			t.Fatal(err)
		}
	}
	if m, err := Marked(dir); err != nil || !m {
		t.Fatalf("after Spread: marked %v, %v", m, err)
	}
	// Only the directory itself carries the flag: its subdirectories are ordinary.
	sub := filepath.Join(dir, "sub")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if m, err := Marked(sub); err != nil || m {
		t.Fatalf("subdirectory: marked %v, %v", m, err)
	}
}

func TestSpreadWithoutTheFlagIsNoError(t *testing.T) {
	if _, err := os.Stat("/dev/shm"); err != nil {
		t.Skip("no /dev/shm")
	}
	dir, err := os.MkdirTemp("/dev/shm", "dirplace")
	if err != nil {
		t.Skip(err)
	}
	defer os.RemoveAll(dir)
	if err := Spread(dir); err != nil {
		t.Fatalf("tmpfs: %v", err)
	}
	if m, err := Marked(dir); err != nil || m {
		t.Fatalf("tmpfs: marked %v, %v", m, err)
	}
}

func TestSpreadMissingDir(t *testing.T) {
	if err := Spread(filepath.Join(t.TempDir(), "absent")); !os.IsNotExist(err) {
		t.Fatalf("got %v, want not-exist", err)
	}
}
