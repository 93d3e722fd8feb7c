//go:build linux && cgo

package spawn

/*
#include <stdlib.h>
#include "spawn.h"
*/
import "C"

import (
	_ "embed"
	"fmt"
	"os"
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Source is spawn.c, the code that sets a sandbox up; its digest is part of the
// sandbox policy, so a link names the set-up code that ran.
//
//go:embed spawn.c
var Source []byte

// Enabled says whether this build can start sandboxes (linux, cgo).
const Enabled = true

// The step kinds of types.go are spawn.h's: this fails to compile if they differ.
var _ = [1]struct{}{}[(Mount-C.KILN_MOUNT)|(Mknod-C.KILN_MKNOD)|(Symlink-C.KILN_SYMLINK)|(Mkdir-C.KILN_MKDIR)|
	(Mask-C.KILN_MASK)|(ReadOnly-C.KILN_READONLY)|(Pivot-C.KILN_PIVOT)|(Chdir-C.KILN_CHDIR)|(Bind-C.KILN_BIND)]

// Start creates the process and returns once it has exec'd Init, or failed (then
// it has been reaped). The calling thread is the new process's parent, so a
// parent-death signal follows it: call Start from a thread that outlives the
// sandbox.
func Start(p *Params) (*Process, error) {
	if len(p.Filter) == 0 || len(p.Filter) > 0xffff {
		return nil, fmt.Errorf("spawn: seccomp program of %d instructions", len(p.Filter))
	}
	var strs []*C.char
	cstr := func(s string) *C.char {
		c := C.CString(s)
		strs = append(strs, c)
		return c
	}
	defer func() {
		for _, c := range strs {
			C.free(unsafe.Pointer(c))
		}
	}()
	nsteps := len(p.Steps)
	steps := (*[1 << 20]C.struct_kiln_step)(C.calloc(C.size_t(max(nsteps, 1)), C.size_t(unsafe.Sizeof(C.struct_kiln_step{}))))[:max(nsteps, 1):max(nsteps, 1)]
	defer C.free(unsafe.Pointer(&steps[0]))
	for i, st := range p.Steps {
		c := &steps[i]
		c.kind = C.int(st.Kind)
		if st.Src != "" {
			c.src = cstr(st.Src)
		}
		c.dst = cstr(st.Dst)
		if st.FSType != "" {
			c.fstype = cstr(st.FSType)
		}
		if st.Data != "" {
			c.data = cstr(st.Data)
		}
		c.flags = C.ulong(st.Flags)
		c.mode = C.uint(st.Mode)
		c.dev = C.ulonglong(st.Dev)
	}
	ncg := len(p.CgroupProcs)
	cgs := (*[64]C.int)(C.calloc(C.size_t(max(ncg, 1)), C.size_t(unsafe.Sizeof(C.int(0)))))[:max(ncg, 1):max(ncg, 1)]
	defer C.free(unsafe.Pointer(&cgs[0]))
	for i, f := range p.CgroupProcs {
		cgs[i] = C.int(f.Fd())
	}
	fsize := C.size_t(len(p.Filter)) * C.size_t(unsafe.Sizeof(unix.SockFilter{}))
	filter := C.malloc(fsize)
	defer C.free(filter)
	copy(unsafe.Slice((*unix.SockFilter)(filter), len(p.Filter)), p.Filter)

	s := (*C.struct_kiln_spawn)(C.calloc(1, C.size_t(unsafe.Sizeof(C.struct_kiln_spawn{}))))
	defer C.free(unsafe.Pointer(s))
	s.clone_flags = C.int(p.CloneFlags)
	s.cgroup_procs = &cgs[0]
	s.n_cgroup_procs = C.int(ncg)
	s.steps = &steps[0]
	s.n_steps = C.int(nsteps)
	if p.Hostname != "" {
		s.hostname = cstr(p.Hostname)
	}
	if p.Loopback {
		s.loopback = 1
	}
	s.nofile = C.ulong(p.NoFile)
	s.uid, s.gid = C.int(p.UID), C.int(p.GID)
	s.last_cap = C.int(lastCap)
	s.filter = filter
	s.filter_len = C.ushort(len(p.Filter))
	for i, f := range []*os.File{p.Stdout, p.Stderr, p.Init, p.Extra4, p.Extra5} {
		if f == nil {
			return nil, fmt.Errorf("spawn: descriptor %d missing", i+1)
		}
		s.fds[i] = C.int(f.Fd())
	}
	pid := C.kiln_spawn(s)
	runtime.KeepAlive(p)
	if pid < 0 {
		return nil, &Error{Stage: stage(p, int(s.failed_step)), Errno: syscall.Errno(s.failed_errno)}
	}
	return &Process{Pid: int(pid), Pidfd: int(s.pidfd)}, nil
}

// lastCap is the highest capability number this kernel knows.
var lastCap = func() int {
	b, err := os.ReadFile("/proc/sys/kernel/cap_last_cap")
	if err != nil {
		return 63
	}
	n := 0
	for _, c := range b {
		if c >= '0' && c <= '9' {
			n = n*10 + int(c-'0')
		}
	}
	return n
}()
