package sandboxtest

import (
	_ "embed"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

//go:embed probe/probe.c
var probeSource []byte

// BuildProbe compiles the hostile-action probe (probe/probe.c) as a static binary at
// dst with gcc, so that it runs in any root filesystem.
func BuildProbe(dst string) error {
	if _, err := exec.LookPath("gcc"); err != nil {
		return fmt.Errorf("%w: gcc not installed (apt-get install gcc libc6-dev): %v", ErrMissing, err)
	}
	dir, err := os.MkdirTemp("", "kiln-probe-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	src := filepath.Join(dir, "probe.c")
	if err := os.WriteFile(src, probeSource, 0o644); err != nil {
		return err
	}
	out, err := exec.Command("gcc", "-static", "-O1", "-Wall", "-o", dst, src).CombinedOutput()
	if err != nil {
		return fmt.Errorf("gcc probe.c: %v\n%s", err, out)
	}
	return os.Chmod(dst, 0o755)
}
