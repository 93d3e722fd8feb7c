// Package tlog is kiln's transparency log: an append-only Merkle tree of entries in the
// C2SP tlog-tiles layout, written with transparency-dev/tessera's POSIX driver into one
// directory, with checkpoints signed as notes (golang.org/x/mod/sumdb/note), and the
// inclusion and consistency proofs (transparency-dev/merkle) that make it auditable.
//
// Several processes may append to one directory at once (`kiln serve` and `kiln exec`):
// tessera's POSIX driver sequences each batch under an fcntl lock on
// .state/treeState.lock and re-reads the tree state inside it, and publishes checkpoints
// under .state/publish.lock. fcntl locks belong to a process, not to a file descriptor,
// so two appenders in one process would not exclude each other; Open therefore shares
// one appender per directory within a process.
package tlog

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/transparency-dev/tessera"
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
	// CheckpointInterval is how often a new checkpoint may be published (at least
	// 100ms); 0 means DefaultCheckpointInterval.
	CheckpointInterval time.Duration
}

// Defaults for Options.
const (
	DefaultBatchMaxAge        = 2 * time.Millisecond
	DefaultCheckpointInterval = 200 * time.Millisecond
)

// Log appends entries to the log in one directory.
type Log struct {
	sh     *shared
	closed sync.Once
}

// shared is the one tessera appender of a directory in this process.
type shared struct {
	dir      string
	origin   string
	appender *tessera.Appender
	shutdown func(context.Context) error
	reader   tessera.LogReader
	cancel   context.CancelFunc
	refs     int
}

var (
	openMu   sync.Mutex
	openLogs = map[string]*shared{} // by absolute directory; see the package comment
)

// Open starts appending to the log in dir (created if needed), signing checkpoints with
// signer, whose name is the log's origin.
func Open(ctx context.Context, dir string, signer note.Signer, opts Options) (*Log, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "log dir %s: %v", dir, err)
	}
	openMu.Lock()
	defer openMu.Unlock()
	if sh, ok := openLogs[abs]; ok {
		if sh.origin != signer.Name() {
			return nil, status.Errorf(codes.FailedPrecondition, "log %s is already open in this process for origin %q, not %q", abs, sh.origin, signer.Name())
		}
		sh.refs++
		return &Log{sh: sh}, nil
	}
	if err := os.MkdirAll(abs, 0o755); err != nil {
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
	drv, err := posix.New(ctx, posix.Config{Path: abs})
	if err != nil {
		return nil, status.Errorf(codes.Internal, "open log %s: %v", abs, err)
	}
	// The appender's background work (batching, checkpoint publishing, GC) lives until
	// the last Close, not until the caller's ctx ends.
	bg, cancel := context.WithCancel(context.WithoutCancel(ctx))
	ao := tessera.NewAppendOptions().
		WithCheckpointSigner(signer).
		WithBatching(opts.BatchMaxSize, opts.BatchMaxAge).
		WithCheckpointInterval(opts.CheckpointInterval).
		WithShutdownTimeout(30 * time.Second)
	a, shutdown, r, err := tessera.NewAppender(bg, drv, ao)
	if err != nil {
		cancel()
		return nil, status.Errorf(codes.Internal, "open log %s: %v", abs, err)
	}
	sh := &shared{dir: abs, origin: signer.Name(), appender: a, shutdown: shutdown, reader: r, cancel: cancel, refs: 1}
	openLogs[abs] = sh
	return &Log{sh: sh}, nil
}

// originFile records which origin (log key) a directory's log belongs to, so a data dir
// whose keyring was replaced is not silently extended under another key.
const originFile = "kiln-origin"

func checkOrigin(dir, origin string) error {
	p := filepath.Join(dir, originFile)
	b, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		tmp, err := os.CreateTemp(dir, ".origin-*")
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

func trimNL(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r') {
		b = b[:len(b)-1]
	}
	return b
}

// Dir returns the log directory.
func (l *Log) Dir() string { return l.sh.dir }

// Append adds data as one entry and returns its index once the entry is durably
// sequenced and integrated into the tree (a checkpoint covering it follows within
// about CheckpointInterval).
func (l *Log) Append(ctx context.Context, data []byte) (uint64, error) {
	idx, err := l.sh.appender.Add(ctx, tessera.NewEntry(data))()
	if err != nil {
		return 0, status.Errorf(codes.Unavailable, "log append: %v", err)
	}
	return idx.Index, nil
}

// Size returns the number of entries integrated so far (which may exceed the latest
// checkpoint's size).
func (l *Log) Size(ctx context.Context) (uint64, error) {
	n, err := l.sh.reader.IntegratedSize(ctx)
	if err != nil {
		return 0, status.Errorf(codes.Internal, "log size: %v", err)
	}
	return n, nil
}

// Close releases this handle; the last one in the process waits until a checkpoint
// covers every entry appended through it, then stops the appender.
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
		if e := sh.shutdown(ctx); e != nil {
			err = status.Errorf(codes.DeadlineExceeded, "log %s: waiting for a checkpoint: %v", sh.dir, e)
		}
		sh.cancel()
	})
	return err
}

// QuietLibraryLogs sends tessera's klog output to w instead of stderr (CLI commands
// print only their own results). Process-wide, like klog itself.
func QuietLibraryLogs(w io.Writer) {
	klog.LogToStderr(false)
	klog.SetOutput(w)
}

func errf(c codes.Code, format string, args ...any) error {
	return status.Error(c, fmt.Sprintf(format, args...))
}
