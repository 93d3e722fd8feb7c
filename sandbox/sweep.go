package sandbox

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/opencontainers/cgroups"
	"golang.org/x/sys/unix"
)

// sweep removes what an earlier Runner on the same state directory left behind when
// its process died: its sandboxes' cgroups (killing any process still in them; the
// sandboxes themselves die with the process that started them, and their mounts
// with their mount namespaces), the root overlays mounted under the directory, and
// older state.
func (r *localRunner) sweep(ctx context.Context) error {
	var errs []error
	ids, err := removeCgroupTree(ctx, r.cgName)
	if err != nil {
		errs = append(errs, err)
	}
	for _, id := range ids {
		r.log.Info("sandbox: swept leftover sandbox", "id", id)
	}
	if err := unmountUnder(r.dir); err != nil {
		errs = append(errs, err)
	}
	// "containers" held libcontainer's state before kiln started sandboxes itself.
	for _, d := range []string{filepath.Join(r.dir, "containers"), filepath.Join(r.dir, "roots")} {
		if err := os.RemoveAll(d); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// cgroupDirs returns, for every mounted v1 hierarchy (and the v2 one), the path of
// name below this process's own cgroup there.
func cgroupDirs(name string) ([]string, error) {
	own, err := cgroups.ParseCgroupFile("/proc/self/cgroup")
	if err != nil {
		return nil, err
	}
	mounts, err := cgroups.GetCgroupMounts(true)
	if err != nil {
		return nil, err
	}
	var dirs []string
	seen := map[string]bool{}
	for _, m := range mounts {
		if seen[m.Mountpoint] {
			continue
		}
		seen[m.Mountpoint] = true
		rel := "/"
		for _, sub := range m.Subsystems {
			if p, ok := own[sub]; ok {
				rel = p
				break
			}
		}
		dirs = append(dirs, filepath.Join(m.Mountpoint, rel, name))
	}
	if p, ok := own[""]; ok && cgroups.IsCgroup2HybridMode() {
		dirs = append(dirs, filepath.Join("/sys/fs/cgroup/unified", p, name))
	}
	return dirs, nil
}

// removeCgroupTree kills every process below the cgroup parent name in every
// hierarchy and removes the cgroups, deepest first. It returns the names of the
// sandbox cgroups it found below the parent.
func removeCgroupTree(ctx context.Context, name string) ([]string, error) {
	dirs, err := cgroupDirs(name)
	if err != nil {
		return nil, err
	}
	var errs []error
	var ids []string
	seen := map[string]bool{}
	for _, d := range dirs {
		if _, err := os.Stat(d); err != nil {
			continue
		}
		if ents, err := os.ReadDir(d); err == nil {
			for _, e := range ents {
				if e.IsDir() && !seen[e.Name()] {
					seen[e.Name()] = true
					ids = append(ids, e.Name())
				}
			}
		}
		var all []string
		_ = filepath.WalkDir(d, func(p string, e os.DirEntry, err error) error {
			if err == nil && e.IsDir() {
				all = append(all, p)
			}
			return nil
		})
		sort.Slice(all, func(i, j int) bool { return len(all[i]) > len(all[j]) })
		for _, p := range all {
			if err := killAndRemoveCgroup(ctx, p); err != nil {
				errs = append(errs, err)
			}
		}
	}
	sort.Strings(ids)
	return ids, errors.Join(errs...)
}

// removeCgroupParent removes the Runner's (empty) cgroup parent from every hierarchy.
func removeCgroupParent(name string) error {
	dirs, err := cgroupDirs(name)
	if err != nil {
		return err
	}
	var errs []error
	for _, d := range dirs {
		if err := unix.Rmdir(d); err != nil && err != unix.ENOENT {
			errs = append(errs, fmt.Errorf("rmdir %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

// forceRemoveCgroups kills whatever is in the cgroups at paths and removes them,
// waiting for the processes to go; it returns the processes it found ("pid comm").
func forceRemoveCgroups(paths map[string]string) []string {
	var found []string
	for _, p := range paths {
		pids, _ := readPids(filepath.Join(p, "cgroup.procs"))
		for _, pid := range pids {
			comm, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
			found = append(found, strconv.Itoa(pid)+" "+strings.TrimSpace(string(comm)))
		}
	}
	for _, p := range paths {
		_ = killAndRemoveCgroup(context.Background(), p)
	}
	return found
}

func killAndRemoveCgroup(ctx context.Context, dir string) error {
	for i := 0; ; i++ {
		pids, _ := readPids(filepath.Join(dir, "cgroup.procs"))
		for _, pid := range pids {
			_ = unix.Kill(pid, unix.SIGKILL)
		}
		err := unix.Rmdir(dir)
		if err == nil || err == unix.ENOENT {
			return nil
		}
		if err != unix.EBUSY || i >= 50 || ctx.Err() != nil {
			return fmt.Errorf("rmdir %s: %w", dir, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func readPids(path string) ([]int, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var pids []int
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if pid, err := strconv.Atoi(strings.TrimSpace(sc.Text())); err == nil && pid > 0 {
			pids = append(pids, pid)
		}
	}
	return pids, sc.Err()
}

// unmountUnder detaches every mount at or below dir, deepest first.
func unmountUnder(dir string) error {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	var targets []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMountinfo(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			targets = append(targets, mp)
		}
	}
	sort.Slice(targets, func(i, j int) bool { return len(targets[i]) > len(targets[j]) })
	var errs []error
	for _, t := range targets {
		if err := unix.Unmount(t, unix.MNT_DETACH); err != nil && err != unix.EINVAL && err != unix.ENOENT {
			errs = append(errs, fmt.Errorf("unmount %s: %w", t, err))
		}
	}
	return errors.Join(errs...)
}

// unescapeMountinfo undoes the octal escapes (\040 for space, ...) of mountinfo.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
