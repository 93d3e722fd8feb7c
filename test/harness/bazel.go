package harness

import (
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// Bazel is a copy of a workspace with its own output base, built by Debian's Bazel 4.2.3.
type Bazel struct {
	Bin        string
	Workspace  string
	outputBase string
	userRoot   string
}

// NewBazel copies the workspace at src (relative to the repository root) into a temp
// dir and prepares a clean output base. The Bazel server is shut down when t ends.
func NewBazel(t testing.TB, src string) *Bazel {
	t.Helper()
	bin := RequireCommand(t, "bazel")
	ws := filepath.Join(t.TempDir(), "ws")
	if err := CopyTree(filepath.Join(RepoRoot(), src), ws); err != nil {
		t.Fatal(err)
	}
	// The install base (Bazel's unpacked self) is shared across tests to save its
	// extraction; the output base is private, so each test starts clean.
	userRoot := filepath.Join(os.TempDir(), "kiln-test-bazel-root")
	b := &Bazel{Bin: bin, Workspace: ws, outputBase: filepath.Join(t.TempDir(), "ob"), userRoot: userRoot}
	t.Cleanup(func() { b.Run(t, "shutdown") })
	return b
}

// Run runs `bazel ARGS...` in the workspace and returns its combined output.
func (b *Bazel) Run(t testing.TB, args ...string) (string, error) {
	t.Helper()
	full := append([]string{"--output_user_root=" + b.userRoot, "--output_base=" + b.outputBase, "--max_idle_secs=300", "--nohome_rc"}, args...)
	cmd := exec.Command(b.Bin, full...)
	cmd.Dir = b.Workspace
	cmd.Env = append(os.Environ(), "HOME="+filepath.Dir(b.outputBase))
	out, err := cmd.CombinedOutput()
	return string(out), err
}

var procRe = regexp.MustCompile(`INFO: (\d+) process(?:es)?(?:: (.*?))?\.\n`)

// Processes parses Bazel's summary ("INFO: 14 processes: 8 remote cache hit, 6
// internal.") into counts by kind, with "total" for the whole.
func Processes(out string) map[string]int {
	m := procRe.FindAllStringSubmatch(out, -1)
	if m == nil {
		return nil
	}
	last := m[len(m)-1]
	res := map[string]int{}
	res["total"], _ = strconv.Atoi(last[1])
	for _, part := range strings.Split(last[2], ", ") {
		if part == "" {
			continue
		}
		sp := strings.IndexByte(part, ' ')
		n, _ := strconv.Atoi(part[:sp])
		res[part[sp+1:]] = n
	}
	return res
}

// CopyTree copies a directory tree of regular files, directories and symlinks.
func CopyTree(src, dst string) error {
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		if strings.HasPrefix(d.Name(), "bazel-") && d.Type()&fs.ModeSymlink != 0 {
			return nil
		}
		target := filepath.Join(dst, rel)
		switch {
		case d.IsDir():
			return os.MkdirAll(target, 0o755)
		case d.Type()&fs.ModeSymlink != 0:
			l, err := os.Readlink(p)
			if err != nil {
				return err
			}
			return os.Symlink(l, target)
		default:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			info, _ := d.Info()
			return os.WriteFile(target, b, info.Mode().Perm())
		}
	})
}
