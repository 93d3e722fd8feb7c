// Package trampoline holds kiln-init, the tiny first process of every sandbox, and
// the host side of its protocol: the command it reads and the status it reports.
package trampoline

import (
	_ "embed"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

//go:generate ./gen.sh

// Binary is kiln-init for linux/amd64, built from src/kiln-init.c by gen.sh.
//
//go:embed kiln-init.amd64
var Binary []byte

// File descriptors kiln-init expects (package spawn sets them up).
const (
	SelfFD   = 3 // kiln-init's own executable; closed at once
	CtrlFD   = 4 // the command, written by the host
	StatusFD = 5 // reports, read by the host
)

// MaxCommand bounds the encoded command (argv + environment).
const MaxCommand = 64 << 20

// Memfd returns a sealed executable memory file holding kiln-init; it cannot be
// written, grown or shrunk, so one copy serves every sandbox of a process.
func Memfd() (*os.File, error) {
	return SealedExecutable("kiln-init", Binary)
}

// SealedExecutable returns an executable memory file named name holding b, sealed
// against writing, growing, shrinking and further seals: nothing can write through
// it, so one copy serves every process that executes it.
func SealedExecutable(name string, b []byte) (*os.File, error) {
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	f := os.NewFile(uintptr(fd), name)
	if _, err := f.Write(b); err != nil {
		f.Close()
		return nil, err
	}
	if err := f.Chmod(0o555); err != nil {
		f.Close()
		return nil, err
	}
	const seals = unix.F_SEAL_SEAL | unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_WRITE
	if _, err := unix.FcntlInt(f.Fd(), unix.F_ADD_SEALS, seals); err != nil {
		f.Close()
		return nil, fmt.Errorf("seal %s: %w", name, err)
	}
	return f, nil
}

// Command is what kiln-init runs.
type Command struct {
	Cwd         string
	Args        []string
	Env         []string
	DisableASLR bool
}

// Encode serializes c in kiln-init's wire format.
func (c Command) Encode() ([]byte, error) {
	if len(c.Args) == 0 {
		return nil, errors.New("empty argv")
	}
	var flags int
	if c.DisableASLR {
		flags |= 1
	}
	b := make([]byte, 8, 64)
	add := func(s string) { b = append(append(b, s...), 0) }
	add("kiln-init/1")
	add(strconv.Itoa(flags))
	add(c.Cwd)
	add(strconv.Itoa(len(c.Args)))
	for _, a := range c.Args {
		add(a)
	}
	add(strconv.Itoa(len(c.Env)))
	for _, e := range c.Env {
		add(e)
	}
	if len(b)-8 > MaxCommand {
		return nil, fmt.Errorf("command and environment are %d bytes, more than %d", len(b)-8, MaxCommand)
	}
	binary.LittleEndian.PutUint64(b[:8], uint64(len(b)-8))
	return b, nil
}

// Report is what kiln-init said about the command.
type Report struct {
	// Status is the command's wait status, valid when Exited is set.
	Status syscall.WaitStatus
	Exited bool
	// Usage is the resource use of the command and of every process kiln-init
	// reaped, valid when HasUsage is set.
	User, System time.Duration
	MaxRSSKiB    int64
	HasUsage     bool
	// Stage names a failure before the command ran: "chdir", "exec" or "setup".
	Stage string
	Errno syscall.Errno
}

// ParseReport decodes the bytes kiln-init wrote on its status descriptor.
func ParseReport(b []byte) (Report, error) {
	var r Report
	for len(b) >= 5 {
		if b[0] == 'u' {
			if len(b) < 25 {
				return r, errors.New("kiln-init: truncated usage report")
			}
			r.User = time.Duration(binary.LittleEndian.Uint64(b[1:9])) * time.Microsecond
			r.System = time.Duration(binary.LittleEndian.Uint64(b[9:17])) * time.Microsecond
			r.MaxRSSKiB = int64(binary.LittleEndian.Uint64(b[17:25]))
			r.HasUsage = true
			b = b[25:]
			continue
		}
		v := binary.LittleEndian.Uint32(b[1:5])
		switch b[0] {
		case 's':
			r.Status, r.Exited = syscall.WaitStatus(v), true
		case 'c':
			r.Stage, r.Errno = "chdir", syscall.Errno(v)
		case 'x':
			r.Stage, r.Errno = "exec", syscall.Errno(v)
		case 'p':
			r.Stage, r.Errno = "setup", syscall.Errno(v)
		default:
			return r, fmt.Errorf("kiln-init: unknown report %q", b[0])
		}
		b = b[5:]
	}
	if len(b) != 0 {
		return r, errors.New("kiln-init: truncated report")
	}
	return r, nil
}
