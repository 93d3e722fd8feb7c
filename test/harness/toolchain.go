package harness

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// RecipeToolchain builds (or takes from the recipe cache) the toolchain recipe name
// (busybox, debian-gcc) into the data dir and returns its manifest digest.
func RecipeToolchain(t testing.TB, data, name string) string {
	t.Helper()
	RequireRoot(t)
	if name == "debian-gcc" {
		RequireCommand(t, "debootstrap")
	} else {
		RequireCommand(t, "busybox")
	}
	cmd := exec.Command(filepath.Join(RepoRoot(), "toolchains", name, "build.sh"), "--data", data, "--kiln", KilnBin(t))
	var errb strings.Builder
	cmd.Stderr = &errb
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("toolchain recipe %s: %v\n%s", name, err, errb.String())
	}
	return strings.TrimSpace(string(out))
}
