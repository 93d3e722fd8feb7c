package sandbox

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kilnbuild/kiln/sandbox/internal/trampoline"
)

// daemonRunner runs sandboxes through kiln-sandboxd, a child process that serves a
// localRunner over a socket pair (daemon.go). kiln holds the state directory's lock
// for the Runner's life and passes it to the daemon, so a daemon that dies leaves a
// directory nobody else can take; the next Run starts a new daemon, whose New sweeps
// what the dead one left, as a new kiln would after a crash.
type daemonRunner struct {
	log   *slog.Logger
	dir   string
	cfg   Config
	exe   *os.File // the daemon binary, a sealed memfd
	lock  *os.File // the state directory's lock, taken by New
	spawn *spawner // one thread, alive as long as the Runner: the daemon's parent-death signal follows it

	seq     atomic.Uint64
	mu      sync.Mutex // guards d and closed; held while (re)starting the daemon
	d       *daemonProc
	closed  bool
	running sync.WaitGroup
}

func newDaemonRunner(ctx context.Context, dir string, cfg Config, exe []byte) (*daemonRunner, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	lock, err := lockStateDir(dir)
	if err != nil {
		return nil, err
	}
	mf, err := trampoline.SealedExecutable("kiln-sandboxd", exe)
	if err != nil {
		lock.Close()
		return nil, status.Errorf(codes.Internal, "sandbox: sandbox daemon: %v", err)
	}
	r := &daemonRunner{log: log, dir: dir, cfg: cfg, exe: mf, lock: lock, spawn: newSpawner(1)}
	if r.d, err = r.start(ctx); err != nil {
		r.spawn.close()
		mf.Close()
		lock.Close()
		return nil, err
	}
	return r, nil
}

// daemonProc is one running daemon.
type daemonProc struct {
	cmd    *exec.Cmd
	pid    int
	c      *conn
	log    *slog.Logger
	ready  chan response // New's outcome
	closed chan response // Close's outcome

	mu      sync.Mutex
	pending map[uint64]chan response // nil once the daemon is gone
	err     error                    // why it is gone, once it is (UNAVAILABLE)
	closing bool                     // an orderly Close is under way
	done    chan struct{}            // closed once it has exited and pending runs have failed
}

// start starts a daemon and opens its Runner (which sweeps the state directory).
func (r *daemonRunner) start(ctx context.Context) (*daemonProc, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "sandbox: sandbox daemon socket: %v", err)
	}
	ours, theirs := os.NewFile(uintptr(fds[0]), "kiln-sandboxd"), os.NewFile(uintptr(fds[1]), "kiln")
	nc, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		theirs.Close()
		return nil, status.Errorf(codes.Internal, "sandbox: sandbox daemon socket: %v", err)
	}
	cmd := &exec.Cmd{
		// The memfd is passed as a descriptor of the child and executed from there
		// (its number here could be one the child's descriptors are moved onto).
		Path:       "/proc/self/fd/" + strconv.Itoa(daemonExeFD),
		Args:       []string{"kiln-sandboxd"},
		Env:        append(os.Environ(), daemonEnvMark+"=1"),
		Stdout:     os.Stderr,
		Stderr:     os.Stderr,
		ExtraFiles: []*os.File{daemonConnFD - 3: theirs, daemonLockFD - 3: r.lock, daemonExeFD - 3: r.exe},
		SysProcAttr: &syscall.SysProcAttr{
			Pdeathsig: syscall.SIGKILL, // dies with kiln (with the spawner's thread, that is)
			Setpgid:   true,            // the terminal's ^C goes to kiln, which cancels runs
		},
	}
	r.spawn.do(func() { err = cmd.Start() })
	theirs.Close()
	if err != nil {
		nc.Close()
		return nil, status.Errorf(codes.Internal, "sandbox: starting the sandbox daemon: %v (%s=0 runs sandboxes from this process)", err, daemonEnv)
	}
	d := &daemonProc{
		cmd: cmd, pid: cmd.Process.Pid, c: newConn(nc.(*net.UnixConn)), log: r.log,
		ready: make(chan response, 1), closed: make(chan response, 1),
		pending: map[uint64]chan response{}, done: make(chan struct{}),
	}
	go d.read()
	if err := d.c.send(&request{Op: opNew, StateDir: r.dir, Prestart: r.cfg.Prestart}); err != nil {
		d.kill()
	}
	select {
	case <-d.done:
	case <-ctx.Done():
		d.expectExit()
		d.kill()
		return nil, status.FromContextError(ctx.Err()).Err()
	case resp := <-d.ready:
		if resp.Code == uint32(codes.OK) {
			return d, nil
		}
		d.kill()
		return nil, status.Error(codes.Code(resp.Code), resp.Msg)
	}
	select {
	case resp := <-d.ready: // it said why before it exited
		if resp.Code != uint32(codes.OK) {
			return nil, status.Error(codes.Code(resp.Code), resp.Msg)
		}
	default:
	}
	return nil, status.Errorf(codes.Internal, "sandbox: the sandbox daemon exited while starting: %s (%s=0 runs sandboxes from this process)",
		status.Convert(d.err).Message(), daemonEnv)
}

// read receives the daemon's frames until it goes away, then reaps it and fails the
// runs still waiting.
func (d *daemonProc) read() {
	for {
		var resp response
		files, err := d.c.recv(&resp)
		closeFiles(files) // the daemon sends none
		if err != nil {
			break
		}
		switch resp.Op {
		case opReady, opClosed:
			if resp.Op == opClosed || resp.Code != uint32(codes.OK) {
				d.expectExit() // it exits after Close, or after a New that failed
			}
			if resp.Op == opReady {
				d.ready <- resp
			} else {
				d.closed <- resp
			}
		case opLog:
			args := make([]any, 0, len(resp.Attrs))
			for _, a := range resp.Attrs {
				args = append(args, a)
			}
			d.log.Log(context.Background(), slog.Level(resp.Level), resp.Msg, args...)
		case opResult:
			d.mu.Lock()
			ch := d.pending[resp.ID]
			delete(d.pending, resp.ID)
			d.mu.Unlock()
			if ch != nil {
				ch <- resp
			}
		}
	}
	d.c.c.Close()
	_ = d.cmd.Process.Kill() // it closed its end or broke the protocol: make sure it is gone
	how := "exit status 0"
	if err := d.cmd.Wait(); err != nil {
		how = err.Error()
	}
	d.mu.Lock()
	pending, closing := d.pending, d.closing
	d.pending = nil
	d.err = status.Errorf(codes.Unavailable, "sandbox: the sandbox daemon (pid %d) exited (%s)", d.pid, how)
	d.mu.Unlock()
	for _, ch := range pending {
		ch <- response{Code: uint32(codes.Unavailable),
			Msg: "sandbox: the sandbox daemon (pid " + strconv.Itoa(d.pid) + ") died during the run (" + how + "); the next Run restarts it"}
	}
	if !closing {
		d.log.Warn("sandbox: the sandbox daemon exited unexpectedly; the next Run restarts it", "pid", d.pid, "status", how)
	}
	close(d.done)
}

// expectExit notes that the daemon is to exit: that is no crash to warn about.
func (d *daemonProc) expectExit() {
	d.mu.Lock()
	d.closing = true
	d.mu.Unlock()
}

// kill ends the daemon and waits until read has reaped it.
func (d *daemonProc) kill() {
	_ = d.cmd.Process.Kill() // safe until reaped: os.Process signals through a pidfd
	<-d.done
}

func (d *daemonProc) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// submit registers req and sends it; the returned channel receives its response.
// sent says whether the daemon may have received req (false: it certainly did not).
func (d *daemonProc) submit(req *request, files []*os.File) (_ chan response, sent bool, _ error) {
	ch := make(chan response, 1)
	d.mu.Lock()
	if d.pending == nil {
		err := d.err
		d.mu.Unlock()
		return nil, false, err
	}
	d.pending[req.ID] = ch
	d.mu.Unlock()
	err := d.c.send(req, files...)
	if err == nil {
		return ch, true, nil
	}
	d.mu.Lock()
	if d.pending != nil {
		delete(d.pending, req.ID)
	}
	d.mu.Unlock()
	if errors.Is(err, errFrameTooLarge) {
		return nil, false, status.Errorf(codes.InvalidArgument, "sandbox: the spec is larger than %d MiB", maxFrame>>20)
	}
	// A frame may have been cut short (so not received): the stream is unusable.
	d.kill()
	return nil, false, d.err
}

// daemon returns the running daemon, starting a new one if the last one died.
func (r *daemonRunner) daemon() (*daemonProc, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.d != nil && !r.d.exited() {
		return r.d, nil
	}
	d, err := r.start(context.Background())
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "sandbox: restarting the sandbox daemon: %s", status.Convert(err).Message())
	}
	r.log.Info("sandbox: restarted the sandbox daemon", "pid", d.pid)
	r.d = d
	return d, nil
}

// Run implements Runner.Run through the daemon.
func (r *daemonRunner) Run(ctx context.Context, spec Spec) (Result, error) {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return Result{}, status.Error(codes.FailedPrecondition, "sandbox: runner is closed")
	}
	r.running.Add(1)
	r.mu.Unlock()
	defer r.running.Done()

	for attempt := 0; ; attempt++ {
		d, err := r.daemon()
		if err != nil {
			return Result{}, err
		}
		req := request{Op: opRun, ID: r.seq.Add(1), Spec: spec}
		if dl, ok := ctx.Deadline(); ok {
			req.HasDeadline, req.Left = true, time.Until(dl)
		}
		req.Canceled = errors.Is(ctx.Err(), context.Canceled)
		files, copies, err := passOutputs(&req)
		if err != nil {
			return Result{}, err
		}
		ch, sent, err := d.submit(&req, files)
		closeFiles(files) // the daemon has its own copies (or none, and the copies end)
		if err != nil {
			waitCopies(copies)
			if !sent && attempt == 0 && d.exited() {
				continue // it died before this Run reached it: once more, with a new one
			}
			return Result{}, err
		}
		var resp response
		for done := ctx.Done(); ; {
			select {
			case resp = <-ch:
			case <-done:
				done = nil
				if errors.Is(ctx.Err(), context.Canceled) {
					// (A deadline needs no message: the daemon's context has the same one.)
					_ = d.c.send(&request{Op: opCancel, ID: req.ID})
				}
				continue
			}
			break
		}
		return finish(resp, waitCopies(copies))
	}
}

// passOutputs prepares the streams of req that go to a Writer, not a path, to be
// passed as descriptors: a file's own (a duplicate), for any other writer a pipe
// whose other end is copied to it here. It clears the Writers of req.Spec and
// returns the descriptors to pass (to be closed once sent) and the copies.
func passOutputs(req *request) ([]*os.File, []*outputCopy, error) {
	var files []*os.File
	var copies []*outputCopy
	for i, o := range []struct {
		out    *Output
		passed *bool
	}{{&req.Spec.Stdout, &req.StdoutFD}, {&req.Spec.Stderr, &req.StderrFD}} {
		w := o.out.Writer
		o.out.Writer = nil
		if o.out.Path != "" || w == nil {
			continue
		}
		*o.passed = true
		if f, ok := w.(*os.File); ok {
			if dup := dupFile(f); dup != nil {
				files = append(files, dup)
				continue
			}
			// Closed, or otherwise unusable: through a pipe, whose copy will see the
			// write fail, as an in-process run would.
		}
		pr, pw, err := os.Pipe()
		if err != nil {
			closeFiles(files)
			waitCopies(copies)
			return nil, nil, status.Errorf(codes.Internal, "sandbox: output pipe: %v", err)
		}
		files = append(files, pw)
		copies = append(copies, startCopy(pr, w, i))
	}
	return files, copies, nil
}

// dupFile returns a duplicate of f's descriptor (close-on-exec), nil if f has none.
// (f.Fd would put f in blocking mode.)
func dupFile(f *os.File) *os.File {
	sc, err := f.SyscallConn()
	if err != nil {
		return nil
	}
	nfd := -1
	if err := sc.Control(func(fd uintptr) {
		nfd, _ = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil || nfd < 0 {
		return nil
	}
	return os.NewFile(uintptr(nfd), f.Name())
}

// finish turns a run's response into Run's result; failed says which streams'
// writers failed (stdout, stderr).
func finish(resp response, failed [2]bool) (Result, error) {
	if resp.Code != uint32(codes.OK) {
		return Result{}, status.Error(codes.Code(resp.Code), resp.Msg)
	}
	res := resp.Result
	for i, o := range []*OutputResult{&res.Stdout, &res.Stderr} {
		if failed[i] {
			o.Truncated = true // the writer failed: as in-process, the result says so
		}
	}
	return res, nil
}

// outputCopy copies a pipe from the daemon to an Output's Writer.
type outputCopy struct {
	stream int // 0 stdout, 1 stderr
	done   chan struct{}
	err    error
}

func startCopy(pr *os.File, w io.Writer, stream int) *outputCopy {
	c := &outputCopy{stream: stream, done: make(chan struct{})}
	go func() {
		defer close(c.done)
		defer pr.Close()
		buf := make([]byte, 32<<10)
		for {
			n, err := pr.Read(buf)
			if n > 0 && c.err == nil {
				if _, werr := w.Write(buf[:n]); werr != nil {
					c.err = werr // keep draining, as in-process
				}
			}
			if err != nil {
				return
			}
		}
	}()
	return c
}

// waitCopies waits until the copies have drained their pipes; it reports which
// stream's writer failed (stdout, stderr).
func waitCopies(copies []*outputCopy) (failed [2]bool) {
	for _, c := range copies {
		<-c.done
		if c.err != nil {
			failed[c.stream] = true
		}
	}
	return failed
}

// Close implements Runner.Close: it waits for the running Runs and closes the
// daemon's Runner. A daemon that died is started once more first, so that its
// sweep removes what the dead one left.
func (r *daemonRunner) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	r.mu.Unlock()
	r.running.Wait()
	var err error
	for attempt := 0; attempt < 2; attempt++ {
		var d *daemonProc
		if d, err = r.daemon(); err != nil {
			break
		}
		var died bool
		if died, err = d.close(); !died {
			break
		}
		// It was dying already (and read had not seen it yet): once more.
	}
	r.spawn.close()
	r.exe.Close()
	r.lock.Close()
	return err
}

// close closes the daemon's Runner and waits until it has exited; died says it
// exited before it could.
func (d *daemonProc) close() (died bool, err error) {
	d.expectExit()
	if err := d.c.send(&request{Op: opClose}); err != nil {
		d.kill()
	}
	<-d.done
	select {
	case resp := <-d.closed:
		if resp.Code != uint32(codes.OK) {
			return false, status.Error(codes.Code(resp.Code), resp.Msg)
		}
		return false, nil
	default:
		return true, status.Errorf(codes.Internal, "sandbox: close: %s before closing its Runner", status.Convert(d.err).Message())
	}
}
