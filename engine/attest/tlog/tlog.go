// Package tlog is kiln's transparency log: an append-only Merkle tree of entries in the
// C2SP tlog-tiles layout, written with transparency-dev/tessera's POSIX driver into one
// directory, with checkpoints signed as notes (golang.org/x/mod/sumdb/note), and the
// inclusion and consistency proofs (transparency-dev/merkle) that make it auditable.
//
// Several processes may append to one directory (`kiln serve` and `kiln exec`), but
// never through two tessera appenders at once. tessera v1.0.4's POSIX driver takes fcntl
// locks, which belong to a process: with two appending processes, one's sequencer
// (holding treeState.lock) and the other's checkpoint publisher (holding publish.lock)
// look to the kernel like a deadlock, F_SETLKW fails with EDEADLK and tessera panics
// (seen when two processes each ran an appender; upstream moved to flock after
// v1.0.4, unreleased). So appending
// needs a lease: an flock(2) on .kiln/append.lock. The holder keeps its appender open
// while it is the only one who wants to append; a process that wants the lease holds
// a shared flock on .kiln/want.lock while it waits, and the holder, seeing that, hands
// over as soon as its own appends are done: it publishes a checkpoint covering them,
// shuts its appender down and releases the lease. Within a process, Open shares one
// appender per directory. kiln publishes every checkpoint itself (tessera's publisher
// is given an interval it never reaches): a tessera publication still in flight after
// its appender was shut down could otherwise land after a newer checkpoint.
package tlog

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	flog "github.com/transparency-dev/formats/log"
	"github.com/transparency-dev/tessera"
	"github.com/transparency-dev/tessera/api/layout"
	"github.com/transparency-dev/tessera/storage/posix"
	"golang.org/x/mod/sumdb/note"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// Options tunes an appender.
type Options struct {
	// BatchMaxAge is how long an entry may wait for others to share its sequencing
	// write; 0 means DefaultBatchMaxAge.
	BatchMaxAge time.Duration
	// BatchMaxSize is how many entries a batch holds at most; 0 means 256.
	BatchMaxSize uint
	// CheckpointInterval is how often a new checkpoint may be published while the
	// lease is held and the tree grows; 0 means DefaultCheckpointInterval.
	CheckpointInterval time.Duration
	// HandoverCheck is how often the lease holder looks for another process that wants
	// to append; 0 means DefaultHandoverCheck.
	HandoverCheck time.Duration
}

// Defaults for Options.
const (
	DefaultBatchMaxAge        = 2 * time.Millisecond
	DefaultCheckpointInterval = 200 * time.Millisecond
	DefaultHandoverCheck      = 20 * time.Millisecond
)

// Log appends entries to the log in one directory.
type Log struct {
	sh     *shared
	closed sync.Once
}

// shared is this process's appending state for one directory.
type shared struct {
	dir    string
	signer note.Signer
	opts   Options
	refs   int // guarded by openMu

	mu       sync.Mutex
	idle     *sync.Cond // signalled when inflight drops to 0
	inflight int
	lease    *os.File // append.lock, flocked while held
	appender *tessera.Appender
	shutdown func(context.Context) error
	reader   tessera.LogReader
	cancel   context.CancelFunc
	stop     chan struct{} // closes the handover watcher
	watcher  sync.WaitGroup

	pubMu   sync.Mutex  // serializes publishNow
	dirty   atomic.Bool // the tree grew since the last publication
	lastPub time.Time   // guarded by pubMu
}

// tesseraNeverPublishes is the checkpoint interval given to tessera: kiln publishes
// every checkpoint itself (publishNow), so that no publication by a tessera goroutine
// that is still running after its appender was shut down can land after a newer one
// and make the checkpoint go backwards (seen in tests under load).
const tesseraNeverPublishes = 100 * 365 * 24 * time.Hour

var (
	openMu   sync.Mutex
	openLogs = map[string]*shared{} // by absolute directory; see the package comment
)

const (
	kilnDir   = ".kiln"
	leaseFile = "append.lock"
	wantFile  = "want.lock"
)

// Open prepares to append to the log in dir (created if needed), signing checkpoints
// with signer, whose name is the log's origin. The lease is taken on the first append.
func Open(ctx context.Context, dir string, signer note.Signer, opts Options) (*Log, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "log dir %s: %v", dir, err)
	}
	openMu.Lock()
	defer openMu.Unlock()
	if sh, ok := openLogs[abs]; ok {
		if sh.signer.Name() != signer.Name() {
			return nil, status.Errorf(codes.FailedPrecondition, "log %s is already open in this process for origin %q, not %q", abs, sh.signer.Name(), signer.Name())
		}
		sh.refs++
		return &Log{sh: sh}, nil
	}
	if err := os.MkdirAll(filepath.Join(abs, kilnDir), 0o755); err != nil {
		return nil, status.Errorf(codes.Internal, "create log dir: %v", err)
	}
	if err := checkOrigin(abs, signer.Name()); err != nil {
		return nil, err
	}
	if opts.BatchMaxAge == 0 {
		opts.BatchMaxAge = DefaultBatchMaxAge
	}
	if opts.BatchMaxSize == 0 {
		opts.BatchMaxSize = tessera.DefaultBatchMaxSize
	}
	if opts.CheckpointInterval == 0 {
		opts.CheckpointInterval = DefaultCheckpointInterval
	}
	if opts.HandoverCheck == 0 {
		opts.HandoverCheck = DefaultHandoverCheck
	}
	sh := &shared{dir: abs, signer: signer, opts: opts, refs: 1}
	sh.idle = sync.NewCond(&sh.mu)
	openLogs[abs] = sh
	return &Log{sh: sh}, nil
}

// originFile records which origin (log key) a directory's log belongs to, so a data dir
// whose keyring was replaced is not silently extended under another key.
const originFile = "kiln-origin"

func checkOrigin(dir, origin string) error {
	p := filepath.Join(dir, kilnDir, originFile)
	b, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		tmp, err := os.CreateTemp(filepath.Dir(p), ".origin-*")
		if err != nil {
			return status.Errorf(codes.Internal, "log origin: %v", err)
		}
		defer os.Remove(tmp.Name())
		if _, err := io.WriteString(tmp, origin+"\n"); err != nil {
			tmp.Close()
			return status.Errorf(codes.Internal, "log origin: %v", err)
		}
		tmp.Close()
		if err := os.Link(tmp.Name(), p); err != nil && !errors.Is(err, os.ErrExist) {
			return status.Errorf(codes.Internal, "log origin: %v", err)
		}
		if b, err = os.ReadFile(p); err != nil {
			return status.Errorf(codes.Internal, "log origin: %v", err)
		}
	} else if err != nil {
		return status.Errorf(codes.Internal, "log origin: %v", err)
	}
	if got := string(trimNL(b)); got != origin {
		return status.Errorf(codes.FailedPrecondition, "log %s belongs to origin %q, but the keyring's log key is %q", dir, got, origin)
	}
	return nil
}

// DirOrigin returns the origin of the log in dir ("" if it has none yet).
func DirOrigin(dir string) string {
	b, err := os.ReadFile(filepath.Join(dir, kilnDir, originFile))
	if err != nil {
		return ""
	}
	return string(trimNL(b))
}

func trimNL(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r') {
		b = b[:len(b)-1]
	}
	return b
}

// Dir returns the log directory.
func (l *Log) Dir() string { return l.sh.dir }

// Append adds data as one entry and returns its index once the entry is durably
// sequenced and integrated into the tree. A checkpoint covering it follows within about
// CheckpointInterval, or at once when the lease is handed over or the log closed.
func (l *Log) Append(ctx context.Context, data []byte) (uint64, error) {
	a, err := l.sh.begin(ctx)
	if err != nil {
		return 0, err
	}
	defer l.sh.end()
	idx, err := a.Add(ctx, tessera.NewEntry(data))()
	if err != nil {
		return 0, status.Errorf(codes.Unavailable, "log append: %v", err)
	}
	l.sh.dirty.Store(true)
	return idx.Index, nil
}

// AppendBatch adds entries in one go, so they share tessera's sequencing writes, and
// returns their indexes once all are durably integrated.
func (l *Log) AppendBatch(ctx context.Context, entries [][]byte) ([]uint64, error) {
	a, err := l.sh.begin(ctx)
	if err != nil {
		return nil, err
	}
	defer l.sh.end()
	futs := make([]tessera.IndexFuture, len(entries))
	for i, e := range entries {
		futs[i] = a.Add(ctx, tessera.NewEntry(e))
	}
	idx := make([]uint64, len(entries))
	for i, f := range futs {
		x, err := f()
		if err != nil {
			return nil, status.Errorf(codes.Unavailable, "log append: %v", err)
		}
		idx[i] = x.Index
	}
	l.sh.dirty.Store(true)
	return idx, nil
}

// Size returns the number of entries integrated so far (which may exceed the latest
// checkpoint's size). It takes the lease, so no other process is mid-append.
func (l *Log) Size(ctx context.Context) (uint64, error) {
	if _, err := l.sh.begin(ctx); err != nil {
		return 0, err
	}
	defer l.sh.end()
	n, err := l.sh.reader.IntegratedSize(ctx)
	if err != nil {
		return 0, status.Errorf(codes.Internal, "log size: %v", err)
	}
	return n, nil
}

// Checkpoint publishes (in the directory) a checkpoint covering every entry integrated
// so far, unless the current one does: for a caller that copies the log elsewhere
// right after appending (Publisher), rather than waiting for the periodic one.
func (l *Log) Checkpoint(ctx context.Context) error {
	if _, err := l.sh.begin(ctx); err != nil {
		return err
	}
	defer l.sh.end()
	return l.sh.publishNow(ctx)
}

// Close releases this handle; the last one in the process publishes a checkpoint that
// covers every entry appended, and gives up the lease.
func (l *Log) Close(ctx context.Context) error {
	var err error
	l.closed.Do(func() {
		openMu.Lock()
		defer openMu.Unlock()
		sh := l.sh
		sh.refs--
		if sh.refs > 0 {
			return
		}
		delete(openLogs, sh.dir)
		sh.mu.Lock()
		defer sh.mu.Unlock()
		for sh.inflight > 0 {
			sh.idle.Wait()
		}
		err = sh.releaseLocked(ctx)
	})
	return err
}

// begin makes sure this process holds the lease with an open appender and counts one
// more operation in flight.
func (s *shared) begin(ctx context.Context) (*tessera.Appender, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.appender == nil {
		if err := s.acquireLocked(ctx); err != nil {
			return nil, err
		}
	}
	s.inflight++
	return s.appender, nil
}

func (s *shared) end() {
	s.mu.Lock()
	s.inflight--
	if s.inflight == 0 {
		s.idle.Broadcast()
	}
	s.mu.Unlock()
}

func (s *shared) lockPath(name string) string { return filepath.Join(s.dir, kilnDir, name) }

// acquireLocked waits for the lease (announcing itself on want.lock meanwhile) and
// opens a tessera appender. Caller holds s.mu.
func (s *shared) acquireLocked(ctx context.Context) error {
	want, err := os.OpenFile(s.lockPath(wantFile), os.O_CREATE|os.O_RDWR|syscall.O_CLOEXEC, 0o644)
	if err != nil {
		return status.Errorf(codes.Internal, "log lease: %v", err)
	}
	defer want.Close() // also drops the shared lock
	if err := flock(want, syscall.LOCK_SH); err != nil {
		return status.Errorf(codes.Internal, "log lease: %v", err)
	}
	lease, err := os.OpenFile(s.lockPath(leaseFile), os.O_CREATE|os.O_RDWR|syscall.O_CLOEXEC, 0o644)
	if err != nil {
		return status.Errorf(codes.Internal, "log lease: %v", err)
	}
	// Poll rather than block, so ctx can end the wait.
	for delay := 100 * time.Microsecond; ; delay = min(2*delay, 5*time.Millisecond) {
		err := flock(lease, syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			lease.Close()
			return status.Errorf(codes.Internal, "log lease: %v", err)
		}
		select {
		case <-ctx.Done():
			lease.Close()
			return status.Errorf(codes.DeadlineExceeded, "waiting for the log lease held by another process: %v", ctx.Err())
		case <-time.After(delay):
		}
	}
	drv, err := posix.New(ctx, posix.Config{Path: s.dir})
	if err != nil {
		lease.Close()
		return status.Errorf(codes.Internal, "open log %s: %v", s.dir, err)
	}
	// The appender's background work lives until the lease is released, not until
	// the caller's ctx ends.
	bg, cancel := context.WithCancel(context.WithoutCancel(ctx))
	ao := tessera.NewAppendOptions().
		WithCheckpointSigner(s.signer).
		WithBatching(s.opts.BatchMaxSize, s.opts.BatchMaxAge).
		WithCheckpointInterval(tesseraNeverPublishes).
		WithCheckpointRepublishInterval(0).
		WithShutdownTimeout(30 * time.Second)
	a, shutdown, r, err := tessera.NewAppender(bg, drv, ao)
	if err != nil {
		cancel()
		lease.Close()
		return status.Errorf(codes.Internal, "open log %s: %v", s.dir, err)
	}
	s.lease, s.appender, s.shutdown, s.reader, s.cancel = lease, a, shutdown, r, cancel
	s.stop = make(chan struct{})
	s.watcher.Add(1)
	go s.watchHandover(s.stop)
	return nil
}

// watchHandover gives the lease away when another process wants it and this one has no
// append in flight.
func (s *shared) watchHandover(stop chan struct{}) {
	defer s.watcher.Done()
	want, err := os.OpenFile(s.lockPath(wantFile), os.O_CREATE|os.O_RDWR|syscall.O_CLOEXEC, 0o644)
	if err != nil {
		return
	}
	defer want.Close()
	t := time.NewTicker(s.opts.HandoverCheck)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		if err := flock(want, syscall.LOCK_EX|syscall.LOCK_NB); err == nil {
			flock(want, syscall.LOCK_UN)
			// Nobody waiting: publish a checkpoint if the tree grew and the last one
			// is old enough. (Close waits for this goroutine before releasing, so
			// the appender stays open meanwhile.)
			s.pubMu.Lock()
			due := s.dirty.Load() && time.Since(s.lastPub) >= s.opts.CheckpointInterval
			s.pubMu.Unlock()
			if due {
				s.publishNow(context.Background())
			}
			continue
		}
		s.mu.Lock()
		if s.stop != stop { // Close took over
			s.mu.Unlock()
			return
		}
		if s.inflight == 0 {
			close(stop)
			s.stop = nil
			s.releaseNoWaitLocked(context.Background())
			s.mu.Unlock()
			return
		}
		s.mu.Unlock()
	}
}

// releaseLocked publishes a checkpoint, shuts the appender down and drops the lease.
// Caller holds s.mu and has no append in flight.
func (s *shared) releaseLocked(ctx context.Context) error {
	if s.appender == nil {
		return nil
	}
	if s.stop != nil {
		close(s.stop)
		s.stop = nil
	}
	s.mu.Unlock()
	s.watcher.Wait()
	s.mu.Lock()
	return s.releaseNoWaitLocked(ctx)
}

func (s *shared) releaseNoWaitLocked(ctx context.Context) error {
	if s.appender == nil {
		return nil
	}
	err := s.publishNow(ctx)
	if e := s.shutdown(ctx); e != nil && err == nil {
		err = status.Errorf(codes.DeadlineExceeded, "log %s: waiting for a checkpoint: %v", s.dir, e)
	}
	s.cancel()
	if e := s.prunePartials(ctx); e != nil && err == nil {
		err = e
	}
	s.lease.Close() // drops the flock
	s.appender, s.shutdown, s.reader, s.cancel, s.lease = nil, nil, nil, nil, nil
	return err
}

// publishNow signs and writes a checkpoint for the integrated tree, unless the current
// checkpoint already covers it: periodically while the lease is held, and at handover
// and close. It computes the root from the tiles (the public tlog-tiles data, immutable
// for a given size, so appends in flight do not disturb it). Only the lease holder
// publishes, serialized by pubMu, and never a smaller tree than the one on disk.
func (s *shared) publishNow(ctx context.Context) error {
	s.pubMu.Lock()
	defer s.pubMu.Unlock()
	s.dirty.Store(false) // an append after this point sets it again
	s.lastPub = time.Now()
	size, err := s.reader.IntegratedSize(ctx)
	if err != nil {
		return status.Errorf(codes.Internal, "log size: %v", err)
	}
	cpPath := filepath.Join(s.dir, "checkpoint")
	if raw, err := os.ReadFile(cpPath); err == nil {
		var cp flog.Checkpoint
		if _, err := cp.Unmarshal(firstParagraph(raw)); err == nil && cp.Origin == s.signer.Name() && cp.Size >= size {
			return nil
		}
	}
	r := NewReader(s.dir, nil)
	root, err := r.RootAt(ctx, size)
	if err != nil {
		return err
	}
	text := flog.Checkpoint{Origin: s.signer.Name(), Size: size, Hash: root}.Marshal()
	signed, err := note.Sign(&note.Note{Text: string(text)}, s.signer)
	if err != nil {
		return status.Errorf(codes.Internal, "sign checkpoint: %v", err)
	}
	tmp, err := os.CreateTemp(s.dir, ".checkpoint-*")
	if err != nil {
		return status.Errorf(codes.Internal, "write checkpoint: %v", err)
	}
	defer os.Remove(tmp.Name())
	_, werr := tmp.Write(signed)
	serr := tmp.Sync()
	cerr := tmp.Close()
	if err := errors.Join(werr, serr, cerr, os.Chmod(tmp.Name(), 0o644)); err != nil {
		return status.Errorf(codes.Internal, "write checkpoint: %v", err)
	}
	if err := os.Rename(tmp.Name(), cpPath); err != nil {
		return status.Errorf(codes.Internal, "write checkpoint: %v", err)
	}
	return nil
}

// gcFile records up to which tree size obsolete partial tiles have been removed.
const gcFile = "pruned-size"

// prunePartials removes the partial entry bundles and tiles of every tile that became
// full since the last prune (and that the just-published checkpoint covers). tessera
// does the same from a job that runs once a minute inside an appender, which a short
// CLI lease never lives to see; without it every batch would leave a partial copy of
// its bundle behind (about 10 KB per link). Caller holds the lease.
func (s *shared) prunePartials(ctx context.Context) error {
	size, err := s.publishedSize()
	if err != nil {
		return err
	}
	from := uint64(0)
	if b, err := os.ReadFile(s.lockPath(gcFile)); err == nil {
		from, _ = strconv.ParseUint(string(trimNL(b)), 10, 64)
	}
	if size <= from {
		return nil
	}
	// A tile at level L with index i is full once size >= (i+1) * 256^(L+1).
	for level, width := uint64(0), uint64(layout.TileWidth); ; level, width = level+1, width*layout.TileWidth {
		for i := from / width; (i+1)*width <= size; i++ {
			if level == 0 {
				os.RemoveAll(filepath.Join(s.dir, layout.EntriesPath(i, 0)+".p"))
			}
			os.RemoveAll(filepath.Join(s.dir, layout.TilePath(level, i, 0)+".p"))
		}
		if width > size {
			break
		}
	}
	return os.WriteFile(s.lockPath(gcFile), []byte(strconv.FormatUint(size, 10)+"\n"), 0o644)
}

// publishedSize is the size of the checkpoint on disk (not verified: only its owner's
// own publications can be there when the lease is held).
func (s *shared) publishedSize() (uint64, error) {
	raw, err := os.ReadFile(filepath.Join(s.dir, "checkpoint"))
	if err != nil {
		return 0, status.Errorf(codes.Internal, "read checkpoint: %v", err)
	}
	var cp flog.Checkpoint
	if _, err := cp.Unmarshal(firstParagraph(raw)); err != nil {
		return 0, status.Errorf(codes.DataLoss, "checkpoint: %v", err)
	}
	return cp.Size, nil
}

// firstParagraph returns a note's text (up to the blank line before its signatures).
func firstParagraph(raw []byte) []byte {
	for i := 0; i+1 < len(raw); i++ {
		if raw[i] == '\n' && raw[i+1] == '\n' {
			return raw[:i+1]
		}
	}
	return raw
}

func flock(f *os.File, how int) error {
	for {
		err := syscall.Flock(int(f.Fd()), how)
		if err != syscall.EINTR {
			return err
		}
	}
}

// RouteLibraryLogs sends tessera's klog output (all severities) to l instead of stderr,
// so CLI commands print only their own results and a server logs through slog. It is
// process-wide, like klog itself, and must be called before any log is opened (klog's
// logger is not safe to change while tessera's goroutines run); nil discards.
func RouteLibraryLogs(l *slog.Logger) {
	if l == nil {
		l = slog.New(slog.DiscardHandler)
	}
	klog.SetSlogLogger(l)
}
