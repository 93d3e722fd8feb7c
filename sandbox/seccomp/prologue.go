package seccomp

import "golang.org/x/sys/unix"

// Offsets in struct seccomp_data, and the x86_64 ABI's audit architecture and x32 bit.
const (
	offNr           = 0
	offArch         = 4
	auditArchX86_64 = 0xc000003e
	x32SyscallBit   = 0x40000000
)

// enosysPrologue returns the instructions run before libseccomp's program: a native
// x86_64 system call numbered above last (the highest the profile names) returns
// ENOSYS; everything else (other ABIs included) goes on to libseccomp's program.
func enosysPrologue(last uint32) []unix.SockFilter {
	return []unix.SockFilter{
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: offArch},
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: auditArchX86_64, Jt: 0, Jf: 4},
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: offNr},
		{Code: unix.BPF_JMP | unix.BPF_JSET | unix.BPF_K, K: x32SyscallBit, Jt: 2, Jf: 0},
		{Code: unix.BPF_JMP | unix.BPF_JGT | unix.BPF_K, K: last, Jt: 0, Jf: 1},
		{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS)},
	}
}
