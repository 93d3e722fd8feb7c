//go:build cgo && seccomp

package seccomp

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"

	"github.com/opencontainers/runc/libcontainer/configs"
	libseccomp "github.com/seccomp/libseccomp-golang"
	"golang.org/x/sys/unix"
)

// Enabled says whether Compile can compile the profile (kiln built with cgo and the
// seccomp tag, linking libseccomp).
const Enabled = true

// Compile turns the profile into the seccomp BPF program every sandbox loads:
// libseccomp compiles the rules (native ABI only; other ABIs kill the process), and
// a short prologue of kiln's makes native system calls numbered above every call
// the profile names fail with ENOSYS instead of the default EPERM, so that libc
// falls back to an older call it knows.
func Compile() ([]unix.SockFilter, error) {
	c := Config()
	eperm := libseccomp.ActErrno.SetReturnCode(int16(*c.DefaultErrnoRet))
	f, err := libseccomp.NewFilter(eperm)
	if err != nil {
		return nil, fmt.Errorf("seccomp: new filter: %w", err)
	}
	defer f.Release()
	// no_new_privs is set by the sandbox itself, before it loads the program.
	if err := f.SetNoNewPrivsBit(false); err != nil {
		return nil, fmt.Errorf("seccomp: %w", err)
	}
	// A binary tree of the calls rather than a linear scan of ~330 of them.
	if err := f.SetOptimize(2); err != nil {
		return nil, fmt.Errorf("seccomp: optimize: %w", err)
	}
	var last libseccomp.ScmpSyscall
	for _, s := range c.Syscalls {
		nr, err := libseccomp.GetSyscallFromName(s.Name)
		if err != nil {
			return nil, fmt.Errorf("seccomp: libseccomp does not know %s: %w", s.Name, err)
		}
		last = max(last, nr)
		act := libseccomp.ActAllow
		switch s.Action {
		case configs.Allow:
		case configs.Errno:
			act = libseccomp.ActErrno.SetReturnCode(int16(*s.ErrnoRet))
		default:
			return nil, fmt.Errorf("seccomp: %s: action %v is not used by the profile", s.Name, s.Action)
		}
		var conds []libseccomp.ScmpCondition
		for _, a := range s.Args {
			op, ok := ops[a.Op]
			if !ok {
				return nil, fmt.Errorf("seccomp: %s: operator %v", s.Name, a.Op)
			}
			cond, err := libseccomp.MakeCondition(a.Index, op, a.Value, a.ValueTwo)
			if err != nil {
				return nil, fmt.Errorf("seccomp: %s: %w", s.Name, err)
			}
			conds = append(conds, cond)
		}
		if len(conds) == 0 {
			err = f.AddRule(nr, act)
		} else {
			err = f.AddRuleConditional(nr, act, conds)
		}
		if err != nil {
			return nil, fmt.Errorf("seccomp: rule for %s: %w", s.Name, err)
		}
	}
	body, err := export(f)
	if err != nil {
		return nil, err
	}
	return append(enosysPrologue(uint32(last)), body...), nil
}

var ops = map[configs.Operator]libseccomp.ScmpCompareOp{
	configs.EqualTo:              libseccomp.CompareEqual,
	configs.NotEqualTo:           libseccomp.CompareNotEqual,
	configs.GreaterThan:          libseccomp.CompareGreater,
	configs.LessThan:             libseccomp.CompareLess,
	configs.MaskEqualTo:          libseccomp.CompareMaskedEqual,
	configs.GreaterThanOrEqualTo: libseccomp.CompareGreaterEqual,
	configs.LessThanOrEqualTo:    libseccomp.CompareLessOrEqual,
}

// export reads libseccomp's BPF program of f.
func export(f *libseccomp.ScmpFilter) ([]unix.SockFilter, error) {
	fd, err := unix.MemfdCreate("seccomp-bpf", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("seccomp: memfd: %w", err)
	}
	m := os.NewFile(uintptr(fd), "seccomp-bpf")
	defer m.Close()
	if err := f.ExportBPF(m); err != nil {
		return nil, fmt.Errorf("seccomp: export: %w", err)
	}
	if _, err := m.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	b, err := io.ReadAll(m)
	if err != nil {
		return nil, err
	}
	if len(b) == 0 || len(b)%8 != 0 {
		return nil, fmt.Errorf("seccomp: libseccomp exported %d bytes", len(b))
	}
	prog := make([]unix.SockFilter, len(b)/8)
	for i := range prog {
		r := b[8*i:]
		prog[i] = unix.SockFilter{
			Code: binary.NativeEndian.Uint16(r[0:2]), Jt: r[2], Jf: r[3],
			K: binary.NativeEndian.Uint32(r[4:8]),
		}
	}
	return prog, nil
}
