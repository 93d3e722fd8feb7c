package sandbox

import (
	"bytes"
	"encoding/binary"
	"encoding/gob"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// The sandbox daemon (kiln-sandboxd) and kiln talk over a unix stream socket pair in
// frames: an 8-byte header (payload length, uint32 little-endian; the number of file
// descriptors passed with the frame; three zero bytes) and a payload, one gob-encoded
// request or response. Descriptors (output streams that are not files by path) travel
// as SCM_RIGHTS with the frame's first byte; the reader reads each frame's header on
// its own, so they always arrive with the frame they belong to. Each direction is
// one gob stream: the first frame carries the type definitions, the later frames
// only values. gob, unlike JSON, keeps strings that are not UTF-8 byte for byte.

// The daemon's descriptors, as kiln starts it.
const (
	daemonConnFD = 3 // the socket to kiln
	daemonLockFD = 4 // the state directory's lock file, already locked by kiln
	daemonExeFD  = 5 // the daemon's own executable (a sealed memfd); closed at start
)

// Operations.
const (
	opNew    byte = iota + 1 // kiln -> daemon, first: open the Runner (reply opReady)
	opRun                    // kiln -> daemon: run a Spec (reply opResult with the same ID)
	opCancel                 // kiln -> daemon: the caller of run ID cancelled
	opClose                  // kiln -> daemon: close the Runner and exit (reply opClosed)
	opReady                  // daemon -> kiln: New's outcome
	opResult                 // daemon -> kiln: a Run's outcome
	opLog                    // daemon -> kiln: a log record for the Runner's logger
	opClosed                 // daemon -> kiln: Close's outcome
)

// request is a frame from kiln to the daemon.
type request struct {
	Op byte
	ID uint64

	// opNew
	StateDir string
	Prestart int

	// opRun: Spec without its Writers (the streams that have one come as descriptors,
	// stdout's first).
	Spec               Spec
	StdoutFD, StderrFD bool
	// Left is the time left before the caller's deadline when kiln sent the run;
	// HasDeadline says there is one. Canceled: the caller's context had already ended.
	Left        time.Duration
	HasDeadline bool
	Canceled    bool
}

// response is a frame from the daemon to kiln.
type response struct {
	Op byte
	ID uint64

	Result Result
	// Code and Msg are the error (a gRPC status), Code 0 for none.
	Code uint32
	Msg  string

	// opLog
	Level int
	Attrs []string // key, value, key, value...
}

// maxFrame bounds a frame's payload (a Spec's command and environment are bounded
// at 64 MiB by kiln-init's protocol).
const maxFrame = 512 << 20

// maxFrameFDs is the most descriptors a frame may carry.
const maxFrameFDs = 2

// errFrameTooLarge is returned by send for a message above maxFrame.
var errFrameTooLarge = errors.New("message too large for the sandbox daemon")

// conn is one end of the socket pair. send is safe for concurrent use; recv is
// called from one goroutine.
type conn struct {
	c *net.UnixConn

	wmu  sync.Mutex
	wbuf bytes.Buffer
	enc  *gob.Encoder

	rbuf bytes.Buffer
	dec  *gob.Decoder
	hdr  [8]byte
	oob  []byte
}

func newConn(c *net.UnixConn) *conn {
	k := &conn{c: c, oob: make([]byte, unix.CmsgSpace(4*maxFrameFDs))}
	k.enc = gob.NewEncoder(&k.wbuf)
	k.dec = gob.NewDecoder(&k.rbuf) // a bytes.Buffer is an io.ByteReader: no read-ahead
	return k
}

// send writes m as one frame, with files passed along as descriptors.
func (k *conn) send(m any, files ...*os.File) error {
	k.wmu.Lock()
	defer k.wmu.Unlock()
	k.wbuf.Reset()
	k.wbuf.Write(make([]byte, 8))
	if err := k.enc.Encode(m); err != nil {
		return err // only for types gob cannot encode: a bug
	}
	b := k.wbuf.Bytes()
	if len(b)-8 > maxFrame {
		// Safe to drop: type definitions went out with the first, small, frame.
		return errFrameTooLarge
	}
	binary.LittleEndian.PutUint32(b[0:4], uint32(len(b)-8))
	b[4] = byte(len(files))
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		oob = unix.UnixRights(fds...)
	}
	n, _, err := k.c.WriteMsgUnix(b, oob, nil)
	runtime.KeepAlive(files) // their descriptors must stay open until sent
	if err != nil {
		return err
	}
	if n < len(b) {
		_, err = k.c.Write(b[n:])
	}
	return err
}

// recv reads the next frame into m and returns the descriptors that came with it.
func (k *conn) recv(m any) ([]*os.File, error) {
	var files []*os.File
	fail := func(err error) ([]*os.File, error) {
		for _, f := range files {
			f.Close()
		}
		return nil, err
	}
	for got := 0; got < len(k.hdr); {
		n, oobn, _, _, err := k.c.ReadMsgUnix(k.hdr[got:], k.oob)
		if oobn > 0 {
			fs, perr := parseRights(k.oob[:oobn])
			files = append(files, fs...)
			if perr != nil {
				return fail(perr)
			}
		}
		if n == 0 && err == nil {
			err = io.EOF
		}
		if err != nil {
			if got > 0 && err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return fail(err)
		}
		got += n
	}
	size := binary.LittleEndian.Uint32(k.hdr[0:4])
	if size > maxFrame || int(k.hdr[4]) != len(files) || k.hdr[5]|k.hdr[6]|k.hdr[7] != 0 {
		return fail(fmt.Errorf("bad frame header % x with %d descriptors", k.hdr, len(files)))
	}
	k.rbuf.Reset()
	if _, err := io.CopyN(&k.rbuf, k.c, int64(size)); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return fail(err)
	}
	if err := k.dec.Decode(m); err != nil {
		return fail(fmt.Errorf("decoding a frame: %w", err))
	}
	if k.rbuf.Len() != 0 {
		return fail(fmt.Errorf("%d bytes left over in a frame", k.rbuf.Len()))
	}
	return files, nil
}

// parseRights returns the descriptors of SCM_RIGHTS messages in oob as files.
func parseRights(oob []byte) ([]*os.File, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var files []*os.File
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			files = append(files, os.NewFile(uintptr(fd), "passed"))
		}
	}
	if len(files) > maxFrameFDs {
		for _, f := range files {
			f.Close()
		}
		return nil, fmt.Errorf("%d descriptors in one frame", len(files))
	}
	return files, nil
}
