package sandbox

import (
	"fmt"
	"os"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"
)

// attachMounts bind-mounts each mount's host source onto its target inside the
// mount namespace of the container whose init is pid. The container is started but
// has not exec'd anything of the command yet, and its root is read-only: targets are
// the skeleton's mount points and cannot have been tampered with.
//
// Binding late is what lets a container be set up before its command (and exec
// root) is known. The sources are cloned as detached mounts in the host namespace
// (open_tree), flagged nosuid, nodev and read-only as asked, and moved into the
// container from a thread that joins its mount namespace; that thread is then
// discarded, as it no longer shares the process's view of the filesystem.
func attachMounts(pid int, mounts []Mount) error {
	if len(mounts) == 0 {
		return nil
	}
	fds := make([]int, 0, len(mounts))
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	for _, m := range mounts {
		fd, err := unix.OpenTree(unix.AT_FDCWD, m.Source, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
		if err != nil {
			return fmt.Errorf("open_tree %s: %w", m.Source, err)
		}
		fds = append(fds, fd)
		attr := &unix.MountAttr{Attr_set: unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV}
		if !m.Writable {
			attr.Attr_set |= unix.MOUNT_ATTR_RDONLY
		}
		if err := unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH, attr); err != nil {
			return fmt.Errorf("mount_setattr %s: %w", m.Source, err)
		}
	}
	ns, err := os.Open("/proc/" + strconv.Itoa(pid) + "/ns/mnt")
	if err != nil {
		return fmt.Errorf("container mount namespace: %w", err)
	}
	defer ns.Close()
	errc := make(chan error, 1)
	go func() {
		// Never unlocked: the runtime ends this thread when the goroutine returns.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			errc <- fmt.Errorf("unshare(CLONE_FS): %w", err)
			return
		}
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNS); err != nil {
			errc <- fmt.Errorf("setns into the container: %w", err)
			return
		}
		for i, m := range mounts {
			if err := unix.MoveMount(fds[i], "", unix.AT_FDCWD, m.Target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
				errc <- fmt.Errorf("move_mount %s to %s: %w", m.Source, m.Target, err)
				return
			}
		}
		errc <- nil
	}()
	return <-errc
}
