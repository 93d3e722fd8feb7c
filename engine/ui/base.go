package ui

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/kilnbuild/kiln/cache"
)

// ActionURL is the page of action d on the UI served at base (a public URL).
func ActionURL(base string, d cache.Digest) string {
	return strings.TrimRight(base, "/") + ActionPath(d)
}

// RecordBase writes the UI's public URL and this process's PID to path (atomically), so
// that CLI commands on the same data dir can link an action's page; remove undoes it.
func RecordBase(path, base string) (remove func(), err error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".ui-url-*")
	if err != nil {
		return func() {}, err
	}
	_, err = fmt.Fprintf(tmp, "%s\n%d\n", base, os.Getpid())
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return func() {}, err
	}
	pid := os.Getpid()
	return func() {
		if _, p := readBase(path); p == pid { // a newer server's record stays
			os.Remove(path)
		}
	}, nil
}

// RecordedBase is the URL a server running on the data dir recorded with RecordBase, or
// "" when none did or the recording process is gone (killed without removing it).
func RecordedBase(path string) string {
	base, pid := readBase(path)
	if base == "" || pid <= 0 {
		return ""
	}
	if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
		return ""
	}
	return base
}

func readBase(path string) (string, int) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", 0
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return "", 0
	}
	pid, err := strconv.Atoi(f[1])
	if err != nil {
		return "", 0
	}
	return f[0], pid
}
