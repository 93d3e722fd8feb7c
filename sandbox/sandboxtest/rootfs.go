// Package sandboxtest builds the tiny root filesystems the sandbox tests run in: Debian's
// busybox-static with one symlink per applet, plus optional static probe programs.
package sandboxtest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// ErrMissing marks an error caused by a missing prerequisite (a Debian package).
var ErrMissing = errors.New("missing prerequisite")

// BusyboxPath is where Debian's busybox-static package installs the binary.
const BusyboxPath = "/bin/busybox"

// BuildBusyboxRootfs fills dir with a minimal root filesystem: /bin/busybox, a
// symlink per applet in /bin, /etc/passwd and /etc/group with root and a "kiln" user
// (uid/gid 1000), and empty /tmp, /proc, /dev, /sys.
func BuildBusyboxRootfs(dir string) error {
	bb := BusyboxPath
	fi, err := os.Stat(bb)
	if err != nil {
		return fmt.Errorf("%w: busybox-static not installed (apt-get install busybox-static): %v", ErrMissing, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", bb)
	}
	out, err := exec.Command(bb, "--list").Output()
	if err != nil {
		return fmt.Errorf("busybox --list: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return err
	}
	for _, d := range []string{"bin", "etc", "tmp", "proc", "dev", "sys", "usr/bin"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return err
		}
	}
	if err := os.Chmod(filepath.Join(dir, "tmp"), 0o1777); err != nil {
		return err
	}
	data, err := os.ReadFile(bb)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "bin", "busybox"), data, 0o755); err != nil {
		return err
	}
	for _, name := range strings.Fields(string(bytes.TrimSpace(out))) {
		if name == "busybox" {
			continue
		}
		if err := os.Symlink("busybox", filepath.Join(dir, "bin", name)); err != nil && !os.IsExist(err) {
			return err
		}
	}
	files := map[string]string{
		"etc/passwd": "root:x:0:0:root:/root:/bin/sh\nkiln:x:1000:1000:kiln:/home/kiln:/bin/sh\n",
		"etc/group":  "root:x:0:\nkiln:x:1000:\n",
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			return err
		}
	}
	return nil
}
