package sandbox

import (
	"container/list"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// A sandbox's root is a read-only overlay of two lower layers: a small skeleton
// directory owned by the Runner, holding every mount point the sandbox needs (/proc,
// /dev, /sys, /tmp, the exec root, each bind target), above the toolchain directory.
// The toolchain is therefore never written, not even to create mount points, and
// needs no particular layout. Overlays are mounted once per (toolchain, layout) and
// shared by every sandbox with that key: they are read-only, so sharing leaks nothing.

// mountPoint is a path the skeleton must hold, as a directory or an empty file.
type mountPoint struct {
	Path string `json:"path"` // absolute, clean
	File bool   `json:"file,omitempty"`
}

// maxRoots bounds how many idle overlays a Runner keeps mounted.
const maxRoots = 64

type rootEntry struct {
	key     string
	target  string // the mounted overlay
	refs    int
	elem    *list.Element // in idle, when refs == 0
	mounted bool
	err     error
	ready   chan struct{}
}

// roots mounts and caches sandbox root overlays under dir.
type roots struct {
	dir  string // StateDir/roots: skel/<key> and mnt/<key>
	mu   sync.Mutex
	m    map[string]*rootEntry
	idle *list.List // of *rootEntry, least recently used first
}

func newRoots(dir string) *roots {
	return &roots{dir: dir, m: map[string]*rootEntry{}, idle: list.New()}
}

func rootKey(rootfs string, mps []mountPoint) string {
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00", rootfs)
	for _, mp := range mps {
		fmt.Fprintf(h, "%s\x00%t\x00", mp.Path, mp.File)
	}
	return hex.EncodeToString(h.Sum(nil))[:32]
}

// acquire returns the path of a mounted root for rootfs with the given mount points;
// release it with the returned function.
func (r *roots) acquire(rootfs string, mps []mountPoint) (string, func(), error) {
	sort.Slice(mps, func(i, j int) bool { return mps[i].Path < mps[j].Path })
	key := rootKey(rootfs, mps)
	r.mu.Lock()
	e, ok := r.m[key]
	if !ok {
		e = &rootEntry{key: key, target: filepath.Join(r.dir, "mnt", key), ready: make(chan struct{})}
		r.m[key] = e
		e.refs++
		r.mu.Unlock()
		e.err = r.mount(e, rootfs, mps)
		e.mounted = e.err == nil
		close(e.ready)
		r.mu.Lock()
		if e.err != nil {
			delete(r.m, key)
		}
	} else {
		e.refs++
		if e.elem != nil {
			r.idle.Remove(e.elem)
			e.elem = nil
		}
		r.mu.Unlock()
		<-e.ready
		r.mu.Lock()
	}
	if e.err != nil {
		e.refs--
		r.mu.Unlock()
		return "", nil, e.err
	}
	r.mu.Unlock()
	var once sync.Once
	return e.target, func() { once.Do(func() { r.release(e) }) }, nil
}

func (r *roots) release(e *rootEntry) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e.refs--
	if e.refs > 0 {
		return
	}
	e.elem = r.idle.PushBack(e)
	for r.idle.Len() > maxRoots {
		old := r.idle.Remove(r.idle.Front()).(*rootEntry)
		old.elem = nil
		delete(r.m, old.key)
		_ = unmountRoot(old.target)
		_ = os.RemoveAll(filepath.Join(r.dir, "skel", old.key))
	}
}

// closeAll unmounts every root; sandboxes must no longer run.
func (r *roots) closeAll() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var first error
	for key, e := range r.m {
		if e.mounted {
			if err := unmountRoot(e.target); err != nil && first == nil {
				first = err
			}
		}
		delete(r.m, key)
	}
	r.idle.Init()
	return first
}

func (r *roots) mount(e *rootEntry, rootfs string, mps []mountPoint) error {
	skel := filepath.Join(r.dir, "skel", e.key)
	if err := buildSkeleton(skel, mps); err != nil {
		return fmt.Errorf("root skeleton: %w", err)
	}
	if err := os.MkdirAll(e.target, 0o755); err != nil {
		return err
	}
	return mountOverlay(e.target, skel, rootfs)
}

// buildSkeleton creates dir with every mount point, each directory mode 0755.
func buildSkeleton(dir string, mps []mountPoint) error {
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return err
	}
	for _, mp := range mps {
		p := filepath.Join(dir, mp.Path)
		parent := p
		if mp.File {
			parent = filepath.Dir(p)
		}
		if err := os.MkdirAll(parent, 0o755); err != nil {
			return err
		}
		if mp.File {
			f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY, 0o644)
			if err != nil {
				return err
			}
			f.Close()
		}
	}
	return nil
}

// setLowerDirs gives the overlay its layers, top first. fsconfig string values are
// capped at 256 bytes by the kernel, so long data-dir paths cannot go in one
// "lowerdir" string: layers are passed one at a time as directory file descriptors
// ("lowerdir+", Linux 6.13+), else one at a time as paths (6.8+), else as one string.
func setLowerDirs(fsfd int, dirs ...string) error {
	fdErr := func() error {
		for _, d := range dirs {
			dfd, err := unix.Open(d, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
			if err != nil {
				return err
			}
			err = unix.FsconfigSetFd(fsfd, "lowerdir+", dfd)
			unix.Close(dfd)
			if err != nil {
				return err
			}
		}
		return nil
	}()
	if fdErr == nil {
		return nil
	}
	if fdErr == unix.ENOENT || fdErr == unix.ENOTDIR {
		return fdErr
	}
	var err error
	for _, d := range dirs {
		if err = unix.FsconfigSetString(fsfd, "lowerdir+", d); err != nil {
			break
		}
	}
	if err == nil {
		return nil
	}
	esc := make([]string, len(dirs))
	for i, d := range dirs {
		esc[i] = escapeLowerDir(d)
	}
	return unix.FsconfigSetString(fsfd, "lowerdir", strings.Join(esc, ":"))
}

// escapeLowerDir escapes the separators of overlayfs's lowerdir option.
func escapeLowerDir(p string) string {
	return strings.ReplaceAll(strings.ReplaceAll(p, `\`, `\\`), `:`, `\:`)
}

// mountOverlay mounts a read-only overlay of upper over lower at target, through the
// new mount API (no comma parsing of the paths).
func mountOverlay(target, upper, lower string) error {
	fsfd, err := unix.Fsopen("overlay", unix.FSOPEN_CLOEXEC)
	if err != nil {
		return fmt.Errorf("fsopen overlay: %w", err)
	}
	defer unix.Close(fsfd)
	if err := setLowerDirs(fsfd, upper, lower); err != nil {
		return fmt.Errorf("overlay lowerdir: %w", err)
	}
	_ = unix.FsconfigSetString(fsfd, "xino", "off")
	if err := unix.FsconfigCreate(fsfd); err != nil {
		return fmt.Errorf("overlay of %s: %w", lower, err)
	}
	mfd, err := unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, unix.MOUNT_ATTR_RDONLY|unix.MOUNT_ATTR_NOSUID|unix.MOUNT_ATTR_NODEV)
	if err != nil {
		return fmt.Errorf("fsmount overlay: %w", err)
	}
	defer unix.Close(mfd)
	if err := unix.MoveMount(mfd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("move_mount overlay to %s: %w", target, err)
	}
	return nil
}

func unmountRoot(target string) error {
	if err := unix.Unmount(target, unix.MNT_DETACH); err != nil && err != unix.EINVAL && err != unix.ENOENT {
		return fmt.Errorf("unmount %s: %w", target, err)
	}
	return nil
}
