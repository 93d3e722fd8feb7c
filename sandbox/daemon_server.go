package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// daemonMain is the sandbox daemon (Init runs it when kiln started this process as
// one): it serves one Runner to the kiln process that started it, over the socket
// kiln passed, and returns the exit status once kiln closes the Runner or goes away.
func daemonMain() int {
	// Nothing kiln passed (or leaked to us) may reach the container inits we start.
	if err := unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC); err != nil {
		fmt.Fprintln(os.Stderr, "kiln-sandboxd:", err)
		return 1
	}
	_ = unix.Close(daemonExeFD) // /proc/self/exe keeps our image
	f := os.NewFile(daemonConnFD, "kiln")
	nc, err := net.FileConn(f)
	f.Close()
	uc, ok := nc.(*net.UnixConn)
	if err != nil || !ok {
		fmt.Fprintln(os.Stderr, "kiln-sandboxd: no socket from kiln on descriptor 3")
		return 2
	}
	s := &server{c: newConn(uc), runs: map[uint64]context.CancelFunc{}}
	return s.serve(os.NewFile(daemonLockFD, "lock"))
}

// server is the daemon's side of the protocol: one Runner, many concurrent runs.
type server struct {
	c    *conn
	mu   sync.Mutex
	runs map[uint64]context.CancelFunc // by request ID
	wg   sync.WaitGroup
}

func (s *server) serve(lock *os.File) int {
	var req request
	files, err := s.c.recv(&req)
	closeFiles(files)
	if err != nil || req.Op != opNew {
		fmt.Fprintln(os.Stderr, "kiln-sandboxd: expected kiln's first message:", err)
		return 2
	}
	log := slog.New(&forwardHandler{c: s.c})
	r, err := newLocal(context.Background(), req.StateDir, Config{Logger: log, Prestart: req.Prestart}, lock)
	if err != nil {
		st := status.Convert(err)
		_ = s.c.send(&response{Op: opReady, Code: uint32(st.Code()), Msg: st.Message()})
		return 1
	}
	if err := s.c.send(&response{Op: opReady}); err != nil {
		return s.shutdown(r, err)
	}
	for {
		var req request
		files, err := s.c.recv(&req)
		if err != nil {
			return s.shutdown(r, err)
		}
		switch req.Op {
		case opRun:
			s.start(r, &req, files)
		case opCancel:
			closeFiles(files)
			s.mu.Lock()
			if cancel := s.runs[req.ID]; cancel != nil {
				cancel()
			}
			s.mu.Unlock()
		case opClose:
			closeFiles(files)
			s.wg.Wait()
			resp := response{Op: opClosed}
			if err := r.Close(); err != nil {
				st := status.Convert(err)
				resp.Code, resp.Msg = uint32(st.Code()), st.Message()
			}
			_ = s.c.send(&resp)
			return 0
		default:
			closeFiles(files)
			return s.shutdown(r, fmt.Errorf("unknown operation %d", req.Op))
		}
	}
}

// shutdown ends every run and closes the Runner when kiln went away without closing
// it (its end of the socket closed) or the protocol broke.
func (s *server) shutdown(r *localRunner, cause error) int {
	s.mu.Lock()
	for _, cancel := range s.runs {
		cancel()
	}
	s.mu.Unlock()
	s.wg.Wait()
	err := r.Close()
	if errors.Is(cause, io.EOF) && err == nil {
		return 0
	}
	fmt.Fprintln(os.Stderr, "kiln-sandboxd: stopping:", errors.Join(cause, err))
	return 1
}

// start runs req in the background and sends its result when done.
func (s *server) start(r *localRunner, req *request, files []*os.File) {
	ctx, cancel := context.WithCancel(context.Background())
	if req.HasDeadline {
		ctx, cancel = context.WithTimeout(context.Background(), req.Left)
	}
	if req.Canceled {
		cancel()
	}
	s.mu.Lock()
	s.runs[req.ID] = cancel
	s.mu.Unlock()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		res, err := s.run(ctx, r, req, files)
		closeFiles(files)
		s.mu.Lock()
		delete(s.runs, req.ID)
		s.mu.Unlock()
		cancel()
		resp := response{Op: opResult, ID: req.ID, Result: res}
		if err != nil {
			st := status.Convert(err)
			resp.Code, resp.Msg = uint32(st.Code()), st.Message()
		}
		_ = s.c.send(&resp) // fails only when kiln is gone; the reader loop sees that
	}()
}

func (s *server) run(ctx context.Context, r *localRunner, req *request, files []*os.File) (Result, error) {
	spec := req.Spec
	want := 0
	for _, o := range []struct {
		passed bool
		out    *Output
	}{{req.StdoutFD, &spec.Stdout}, {req.StderrFD, &spec.Stderr}} {
		if !o.passed {
			continue
		}
		if want >= len(files) {
			break
		}
		o.out.Path, o.out.Writer = "", files[want]
		want++
	}
	if want != len(files) || (req.StdoutFD && spec.Stdout.Writer == nil) || (req.StderrFD && spec.Stderr.Writer == nil) {
		return Result{}, status.Errorf(codes.Internal, "sandbox: daemon protocol: %d output descriptors passed, not as announced", len(files))
	}
	return r.Run(ctx, spec)
}

func closeFiles(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// forwardHandler sends the daemon's log records to kiln, which hands them to the
// Runner's logger.
type forwardHandler struct {
	c      *conn
	attrs  []string
	prefix string // of the open groups, "a.b."
}

func (h *forwardHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h *forwardHandler) Handle(_ context.Context, rec slog.Record) error {
	attrs := append([]string(nil), h.attrs...)
	rec.Attrs(func(a slog.Attr) bool {
		attrs = appendAttr(attrs, h.prefix, a)
		return true
	})
	return h.c.send(&response{Op: opLog, Level: int(rec.Level), Msg: rec.Message, Attrs: attrs})
}

func (h *forwardHandler) WithAttrs(as []slog.Attr) slog.Handler {
	h2 := *h
	h2.attrs = append([]string(nil), h.attrs...)
	for _, a := range as {
		h2.attrs = appendAttr(h2.attrs, h.prefix, a)
	}
	return &h2
}

func (h *forwardHandler) WithGroup(name string) slog.Handler {
	h2 := *h
	h2.prefix += name + "."
	return &h2
}

// appendAttr flattens a into key, value strings.
func appendAttr(kv []string, prefix string, a slog.Attr) []string {
	v := a.Value.Resolve()
	if v.Kind() == slog.KindGroup {
		for _, g := range v.Group() {
			kv = appendAttr(kv, prefix+a.Key+".", g)
		}
		return kv
	}
	return append(kv, prefix+a.Key, v.String())
}
