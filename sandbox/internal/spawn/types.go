// Package spawn starts the first process of a sandbox with one clone(2): new
// namespaces, its cgroups, the file system the caller planned, no privileges, the
// seccomp filter, then an exec of the init executable (see spawn.c). It is the whole
// of a sandbox's set-up that runs in the sandbox; package sandbox plans it.
package spawn

import (
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// Kind is what a Step does.
type Kind int

// Step kinds (see spawn.h).
const (
	Mount    Kind = 1 // mount(Src, Dst, FSType, Flags, Data)
	Mknod    Kind = 2 // mknod(Dst, Mode, Dev)
	Symlink  Kind = 3 // symlink(Src, Dst)
	Mkdir    Kind = 4 // mkdir(Dst, Mode)
	Mask     Kind = 5 // if Dst exists: an empty read-only tmpfs on a directory, Src (/dev/null) on a file
	ReadOnly Kind = 6 // if Dst exists: bind it onto itself read-only
	Pivot    Kind = 7 // Dst becomes the root; the old one is detached
	Chdir    Kind = 8 // chdir(Dst)
	Bind     Kind = 9 // bind Src (alone) on Dst, adding nosuid, nodev and Flags (MS_RDONLY)
)

// Step is one step of the file system set-up, run in order in the new process.
type Step struct {
	Kind         Kind
	Src, Dst     string
	FSType, Data string
	Flags        uintptr
	Mode         uint32
	Dev          uint64
	Describe     string // for errors: what the step is for
}

// Params is everything the new process does before it execs Init.
type Params struct {
	CloneFlags  int        // CLONE_NEW* (the cgroup namespace is added after joining)
	CgroupProcs []*os.File // cgroup.procs files to join (opened for writing)
	Steps       []Step
	Hostname    string
	Loopback    bool   // bring lo up
	NoFile      uint64 // RLIMIT_NOFILE (RLIMIT_CORE is 0)
	UID, GID    int
	Filter      []unix.SockFilter // seccomp program, loaded last
	// The new process's descriptors 1 to 5; 0 is /dev/null of its new root. Init is
	// executed (it must be an executable file; it is fd 3 there).
	Stdout, Stderr, Init, Extra4, Extra5 *os.File
}

// Process is a started sandbox: its first process, in its own pid namespace.
type Process struct {
	Pid   int
	Pidfd int // owned by the caller: close it after reaping
}

// Error says which set-up stage failed in the new process, and why.
type Error struct {
	Stage string
	Errno syscall.Errno
}

func (e *Error) Error() string { return e.Stage + ": " + e.Errno.Error() }

func stage(p *Params, i int) string {
	if i >= 0 && i < len(p.Steps) {
		st := p.Steps[i]
		if st.Describe != "" {
			return st.Describe
		}
		return fmt.Sprintf("step %d (%d) on %s", i, st.Kind, st.Dst)
	}
	switch i {
	case -2:
		return "clone"
	case -3:
		return "joining the cgroups"
	case -4:
		return "cgroup namespace"
	case -5:
		return "making mounts private"
	case -6:
		return "sethostname"
	case -7:
		return "bringing up lo"
	case -8:
		return "setrlimit"
	case -9:
		return "descriptors"
	case -10:
		return "dropping capabilities"
	case -11:
		return "setting uid and gid"
	case -12:
		return "no_new_privs"
	case -13:
		return "loading the seccomp filter"
	case -14:
		return "exec of the init"
	case -15:
		return "parent-death signal"
	}
	return fmt.Sprintf("stage %d", i)
}
