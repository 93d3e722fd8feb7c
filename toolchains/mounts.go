package toolchains

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// mountPaths is every path a mount of this mount namespace stands on: mount points,
// and the layers of overlays (lowerdir, upperdir, workdir).
type mountPaths []string

// mountedPaths reads /proc/self/mountinfo. kiln's sandboxes mount their roots as
// overlays in kiln's own mount namespace, so a toolchain root one of them uses
// appears here as a lower layer.
func mountedPaths() (mountPaths, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("mounts: %w", err)
	}
	defer f.Close()
	var out mountPaths
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		fields := strings.Fields(pre)
		if !ok || len(fields) < 5 {
			continue
		}
		out = append(out, unescapeMount(fields[4]))
		if sf := strings.Fields(post); len(sf) >= 3 && sf[0] == "overlay" {
			for _, opt := range strings.Split(sf[2], ",") {
				k, v, _ := strings.Cut(opt, "=")
				switch k {
				case "lowerdir": // all layers, ':'-separated
					for _, p := range strings.Split(v, ":") {
						out = append(out, unescapeMount(p))
					}
				case "lowerdir+", "datadir+", "upperdir", "workdir": // one path each
					out = append(out, unescapeMount(v))
				}
			}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("mounts: %w", err)
	}
	return out, nil
}

// uses reports whether a mount stands on dir or anything below it.
func (m mountPaths) uses(dir string) bool {
	dir = filepath.Clean(dir)
	for _, p := range m {
		if p == dir || strings.HasPrefix(p, dir+"/") {
			return true
		}
	}
	return false
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space, ...).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
