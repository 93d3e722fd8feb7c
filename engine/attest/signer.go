package attest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/engine/attest/tlog"
	"github.com/kilnbuild/kiln/internal/dirplace"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Options configures Open.
type Options struct {
	// DataDir is the data directory; PathsFor(DataDir) names everything inside it.
	DataDir string
	// CAS is the blob store envelopes are written to, so REAPI clients can fetch them
	// by the digest in the ActionResult (required).
	CAS cache.BlobStore
	// ExecutorKeyFile optionally names the operator's ed25519 private key (PKCS #8 PEM).
	ExecutorKeyFile string
	// SyncLog makes Link wait until the link is in the transparency log (about 10ms
	// on a disk with 0.5ms fsyncs) instead of leaving that to a background writer.
	SyncLog bool
	// LogLinger is how long the background writer gathers links before it appends a
	// batch nobody waits for (Flush, Close and SyncLog links never wait for it); 0
	// means DefaultLogLinger, negative appends what is queued at once.
	LogLinger time.Duration
	// Log tunes the transparency-log appender.
	Log tlog.Options
	// Now is the clock for key validity; nil means time.Now.
	Now func() time.Time
	// Logger receives attestation events; nil discards them.
	Logger *slog.Logger
	// Sink, if set, takes every signed link instead of this data dir's transparency
	// log, which is then not opened (a cluster worker: its links wait in shared storage
	// for the cluster's one sequencer).
	Sink LinkSink
}

// LinkSink receives signed links for a log kept elsewhere. Submit returns once the
// link is durably queued there: an envelope Link returned is never lost. It runs while
// the envelope is being stored in the CAS, so its reader must wait for an envelope it
// cannot read yet (Link fails if either fails).
type LinkSink interface {
	Submit(ctx context.Context, env cache.Digest, envelope []byte) error
}

// Signer writes the attestation of executed actions. It is safe for concurrent use, and
// other processes may attest into the same data directory at the same time.
//
// Link returns once the link is signed, in the CAS, and written to a pending file
// (DATA/attest/pending/<instance>/<envelope hash>_<size>). A background writer then
// appends all pending links to the log in one batch (group commit), indexes them by
// action and product, and moves each file into the durable envelope store. The pending
// files of a process that died are processed by the next Open. Close (or Flush) waits
// for all of it.
type Signer struct {
	store *Store
	keys  *keys.Keyring
	log   *tlog.Log
	lg    *slog.Logger
	opts  Options

	pendingDir string   // this instance's marker directory
	pendingLk  *os.File // flock held while this instance lives

	queue   chan *pending
	writer  sync.WaitGroup
	mu      sync.Mutex
	idle    *sync.Cond
	waiting int   // links queued or being appended
	lastErr error // the latest log failure, reported by Flush
	// hurrying counts the callers waiting for everything queued to be logged (Flush);
	// while there are any, the write loop does not linger. hurry wakes it if it does.
	hurrying atomic.Int32
	hurry    chan struct{}
	batches  atomic.Int64 // log batches appended, for tests

	closeOnce sync.Once
	closeErr  error
}

// pending is a signed link on its way into the log and the indexes. Its file
// (DATA/attest/pending/<instance>/<hash>_<size>) holds the envelope; once logged and
// indexed it is renamed into the durable envelope store.
type pending struct {
	env      cache.Digest
	file     string
	envelope []byte            // nil for an adopted file (read back, checked against env)
	done     chan appendResult // nil unless someone waits
}

type appendResult struct {
	index uint64
	err   error
}

// Linked is what Link produced for one action.
type Linked struct {
	// Envelope is the DSSE envelope (JSON) of the action's in-toto link.
	Envelope []byte
	// Digest is the envelope's digest: in the CAS, in the log, in the ActionResult.
	Digest cache.Digest
	// KeyID is the executor key that signed it.
	KeyID string
	// LogIndex is the envelope's entry in the transparency log, if Logged.
	LogIndex uint64
	// Logged says whether LogIndex is known: with SyncLog, or for a link logged before.
	Logged bool
}

// Open opens (creating on first use) the keyring, the log and the attestation store of
// opts.DataDir, and appends any links a dead process left unlogged.
func Open(ctx context.Context, opts Options) (*Signer, error) {
	if opts.CAS == nil {
		return nil, status.Error(codes.InvalidArgument, "attest: a CAS is required")
	}
	p := PathsFor(opts.DataDir)
	lg := opts.Logger
	if lg == nil {
		lg = slog.New(slog.DiscardHandler)
	}
	s := &Signer{store: NewStore(p, opts.CAS), lg: lg, opts: opts, queue: make(chan *pending, 4096), hurry: make(chan struct{}, 1)}
	s.idle = sync.NewCond(&s.mu)
	kr, err := keys.Open(ctx, p.Keys, keys.Options{
		ExecutorKeyFile: opts.ExecutorKeyFile,
		Now:             opts.Now,
		// Retiring a key (adopting an operator key) records the log's size; the log
		// key exists by then (a key is only retired in a used keyring), so the log
		// and the writer can be started from inside keys.Open.
		LogSize: func(ctx context.Context) (uint64, error) {
			if opts.Sink != nil {
				return 0, status.Error(codes.FailedPrecondition, "this keyring's links are logged by the cluster's sequencer: retire its key there (kiln cluster retire-key)")
			}
			if err := s.start(ctx); err != nil {
				return 0, err
			}
			return s.drainedLogSize(ctx)
		},
	})
	if err == nil && opts.Sink == nil {
		err = s.start(ctx)
	}
	if err != nil {
		if s.log != nil {
			s.Close(ctx)
		}
		return nil, err
	}
	s.keys = kr
	return s, nil
}

// start opens the log, this instance's pending directory and the writer, and adopts
// orphaned markers; once.
func (s *Signer) start(ctx context.Context) error {
	if s.log != nil {
		return nil
	}
	p := s.store.p
	ls, err := keys.LoadLogSigner(p.Keys)
	if err != nil {
		return err
	}
	l, err := tlog.Open(ctx, p.Log, ls, s.opts.Log)
	if err != nil {
		return err
	}
	if err := s.startPending(); err != nil {
		l.Close(ctx)
		return err
	}
	s.log = l
	if err := s.reconcile(ctx); err != nil {
		return err
	}
	s.writer.Add(1)
	go s.writeLoop()
	return s.adoptOrphans()
}

// reconcile records the log index of every entry appended since the last start whose
// index is not recorded (its process died between the append and recording it), so
// that the link is never appended again when its pending file is adopted.
func (s *Signer) reconcile(ctx context.Context) error {
	size, err := s.log.Size(ctx)
	if err != nil {
		return err
	}
	mark := filepath.Join(s.store.p.Attest, "logidx", "reconciled")
	var from uint64
	if b, err := os.ReadFile(mark); err == nil {
		from, _ = strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	}
	if from >= size {
		return nil
	}
	var ierr error
	err = tlog.NewReader(s.store.p.Log, nil).ScanFrom(ctx, from, size, func(i uint64, e []byte) bool {
		d, ok := ParseLinkLogEntry(e)
		if !ok {
			return true
		}
		if _, ok := s.store.LogIndex(d); !ok {
			s.lg.Info("recording the log index of a link a process appended before it died", "envelope", d.String(), "index", i)
			ierr = s.store.SetLogIndex(d, i)
		}
		return ierr == nil
	})
	if err = errors.Join(err, ierr); err != nil {
		return grpcerr.Wrap(err, "reconcile the log index")
	}
	return writeAtomic(mark, []byte(strconv.FormatUint(size, 10)+"\n"))
}

func (s *Signer) pendingRoot() string { return filepath.Join(s.store.p.Attest, "pending") }

// startPending creates this instance's marker directory, held by an flock on
// <dir>.lock for as long as the process lives (so others know it is not orphaned).
func (s *Signer) startPending() error {
	if s.pendingDir != "" {
		return nil
	}
	var rnd [8]byte
	rand.Read(rnd[:])
	dir := filepath.Join(s.pendingRoot(), hex.EncodeToString(rnd[:]))
	if err := os.MkdirAll(s.pendingRoot(), 0o755); err != nil {
		return status.Errorf(codes.Internal, "attest pending: %v", err)
	}
	// Each instance's markers in a block group of its own (package dirplace): a marker
	// is written for every link, and must not share a group with the inodes a removed
	// or crashed instance freed.
	_ = dirplace.Spread(s.pendingRoot())
	// The lock is taken under a name no other process looks at, then renamed into
	// place: another process's adoptOrphans must never find <dir>.lock unlocked (it
	// would take this live instance for a dead one and remove its marker directory).
	tmp := dir + ".locking"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_EXCL|os.O_RDWR|syscall.O_CLOEXEC, 0o644)
	if err != nil {
		return status.Errorf(codes.Internal, "attest pending: %v", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		os.Remove(tmp)
		return status.Errorf(codes.Internal, "attest pending: %v", err)
	}
	if err := os.Rename(tmp, dir+".lock"); err != nil {
		f.Close()
		os.Remove(tmp)
		return status.Errorf(codes.Internal, "attest pending: %v", err)
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		f.Close()
		os.Remove(dir + ".lock")
		return status.Errorf(codes.Internal, "attest pending: %v", err)
	}
	s.pendingDir, s.pendingLk = dir, f
	return nil
}

// adoptOrphans queues the markers of instances whose process is gone (their lock is
// free) for appending by this one.
func (s *Signer) adoptOrphans() error {
	locks, _ := filepath.Glob(filepath.Join(s.pendingRoot(), "*.lock"))
	for _, lk := range locks {
		dir := strings.TrimSuffix(lk, ".lock")
		if dir == s.pendingDir {
			continue
		}
		f, err := os.OpenFile(lk, os.O_RDWR|syscall.O_CLOEXEC, 0)
		if err != nil {
			continue
		}
		if syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) != nil {
			f.Close() // alive
			continue
		}
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			d, err := parseMarker(e.Name())
			if err != nil {
				continue
			}
			mine := filepath.Join(s.pendingDir, e.Name())
			if err := os.Rename(filepath.Join(dir, e.Name()), mine); err != nil {
				continue
			}
			s.lg.Info("logging a link an earlier process left unlogged", "envelope", d.String())
			s.enqueue(&pending{env: d, file: mine})
		}
		os.Remove(dir)
		os.Remove(lk)
		f.Close()
	}
	return nil
}

// Pending markers are empty files named "<hash>_<size>" for the envelope digest.
func markerName(d cache.Digest) string { return d.Hash + "_" + strconv.FormatInt(d.Size, 10) }

func parseMarker(name string) (cache.Digest, error) {
	return cache.ParseDigest(strings.Replace(name, "_", "/", 1))
}

// drainedLogSize is the log size for a key retirement: it runs while the keyring is
// locked exclusively (no new link can be signed), waits until every process has logged
// the links it signed (no markers left, orphans adopted), then reads the size, so the
// retired key's bound covers all of its links.
func (s *Signer) drainedLogSize(ctx context.Context) (uint64, error) {
	if s.pendingDir != "" {
		deadline := time.Now().Add(time.Minute)
		for {
			s.adoptOrphans()
			n := 0
			dirs, _ := filepath.Glob(filepath.Join(s.pendingRoot(), "*"))
			for _, d := range dirs {
				if ents, err := os.ReadDir(d); err == nil {
					n += len(ents)
				}
			}
			if n == 0 {
				break
			}
			if time.Now().After(deadline) {
				return 0, status.Errorf(codes.DeadlineExceeded, "%d signed links are still waiting to be logged", n)
			}
			select {
			case <-ctx.Done():
				return 0, status.FromContextError(ctx.Err()).Err()
			case <-time.After(5 * time.Millisecond):
			}
		}
	}
	return s.log.Size(ctx)
}

// Keyring returns the signer's keyring.
func (s *Signer) Keyring() *keys.Keyring { return s.keys }

// Store returns the attestation store the signer writes to.
func (s *Signer) Store() *Store { return s.store }

// Flush waits until every link linked so far is in the log, and reports the latest
// log failure, if any.
func (s *Signer) Flush(ctx context.Context) error {
	s.hurrying.Add(1)
	defer s.hurrying.Add(-1)
	select {
	case s.hurry <- struct{}{}:
	default:
	}
	done := make(chan struct{})
	go func() {
		s.mu.Lock()
		for s.waiting > 0 {
			s.idle.Wait()
		}
		s.mu.Unlock()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		return status.FromContextError(ctx.Err()).Err()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastErr
}

// Close logs what is pending, waits until a checkpoint covers it, and releases the log.
// Links that could not be logged keep their markers for the next Open.
func (s *Signer) Close(ctx context.Context) error {
	s.closeOnce.Do(func() { s.closeErr = s.close(ctx) })
	return s.closeErr
}

func (s *Signer) close(ctx context.Context) error {
	if s.log == nil { // a sink's signer: nothing of its own to log
		return nil
	}
	ferr := s.Flush(ctx)
	close(s.queue)
	s.writer.Wait()
	lerr := s.log.Close(ctx)
	if s.pendingLk != nil {
		if ents, err := os.ReadDir(s.pendingDir); err == nil && len(ents) == 0 {
			os.Remove(s.pendingDir)
			os.Remove(s.pendingDir + ".lock")
		}
		s.pendingLk.Close()
	}
	return errors.Join(ferr, lerr)
}

// Link attests one executed action: it builds the in-toto link for a, signs it with the
// active executor key as a DSSE envelope and stores the envelope in the CAS; the
// background writer then appends it to the transparency log and indexes it by action
// and by every product (Link waits for that only with Options.SyncLog). Linking the same
// action again with the same key gives the same envelope and logs it only once.
func (s *Signer) Link(ctx context.Context, a Action) (Linked, error) {
	payload, err := a.Payload()
	if err != nil {
		return Linked{}, err
	}
	var out Linked
	var p *pending
	// Under the shared keyring lock until the pending file exists: a rotation (which
	// takes the lock exclusively, then waits for pending files to drain) records a log
	// size that bounds every link the old key signed.
	err = s.keys.SignLock(func() error {
		k, err := s.keys.Active()
		if err != nil {
			return err
		}
		env, err := SignEnvelope(ctx, k, payload)
		if err != nil {
			return err
		}
		d := cache.DigestOf(env)
		out = Linked{Envelope: env, Digest: d, KeyID: k.ID()}
		if s.opts.Sink != nil {
			// At once: the sink's reader waits for an envelope it cannot read yet.
			sunk := make(chan error, 1)
			go func() { sunk <- s.opts.Sink.Submit(ctx, d, env) }()
			err := s.opts.CAS.Put(ctx, d, bytes.NewReader(env))
			if serr := <-sunk; err == nil {
				err = serr
			}
			return grpcerr.Wrap(err, "store and queue the envelope")
		}
		if err := s.opts.CAS.Put(ctx, d, bytes.NewReader(env)); err != nil {
			return grpcerr.Wrap(err, "store envelope in CAS")
		}
		if idx, ok := s.store.LogIndex(d); ok && s.store.HasEnvelope(d) {
			out.LogIndex, out.Logged = idx, true
			return nil
		}
		// The pending file is written in place (no rename): a torn one is detected by
		// its digest on recovery, and the CAS holds the envelope too.
		file := filepath.Join(s.pendingDir, markerName(d))
		if err := os.WriteFile(file, env, 0o644); err != nil {
			return status.Errorf(codes.Internal, "attest pending: %v", err)
		}
		p = &pending{env: d, file: file, envelope: env}
		return nil
	})
	if err != nil {
		return Linked{}, grpcerr.Wrap(err, "attest action %s", a.ActionDigest)
	}
	if p != nil {
		if s.opts.SyncLog {
			p.done = make(chan appendResult, 1)
		}
		s.enqueue(p)
		if p.done != nil {
			select {
			case r := <-p.done:
				if r.err != nil {
					return Linked{}, status.Errorf(status.Code(r.err), "attest action %s: %v", a.ActionDigest, status.Convert(r.err).Message())
				}
				out.LogIndex, out.Logged = r.index, true
			case <-ctx.Done():
				return Linked{}, status.FromContextError(ctx.Err()).Err()
			}
		}
	}
	s.lg.DebugContext(ctx, "attested action", "action", a.ActionDigest.String(), "envelope", out.Digest.String(), "key", out.KeyID)
	return out, nil
}

// Append logs a link another process signed (the cluster's sequencer appending a
// worker's link), exactly once however often it is given: it waits until the link is
// in the log, indexed and in the envelope store, and returns its log index. The
// caller checks the signature first; Append only checks that env is an envelope.
func (s *Signer) Append(ctx context.Context, env []byte) (uint64, error) {
	if s.log == nil {
		return 0, status.Error(codes.FailedPrecondition, "attest: this signer has no log of its own")
	}
	if _, err := EnvelopePayload(env); err != nil {
		return 0, err
	}
	d := cache.DigestOf(env)
	if idx, ok := s.store.LogIndex(d); ok && s.store.HasEnvelope(d) {
		return idx, nil
	}
	if err := s.opts.CAS.Put(ctx, d, bytes.NewReader(env)); err != nil {
		return 0, grpcerr.Wrap(err, "store envelope in CAS")
	}
	file := filepath.Join(s.pendingDir, markerName(d))
	if err := os.WriteFile(file, env, 0o644); err != nil {
		return 0, status.Errorf(codes.Internal, "attest pending: %v", err)
	}
	p := &pending{env: d, file: file, envelope: env, done: make(chan appendResult, 1)}
	s.enqueue(p)
	select {
	case r := <-p.done:
		if r.err != nil {
			return 0, r.err
		}
		// Indexing and the move into the envelope store follow the append: wait for them
		// too, so that a caller who drops its own copy next loses nothing.
		if err := s.Flush(ctx); err != nil && !s.store.HasEnvelope(d) {
			return 0, err
		}
		return r.index, nil
	case <-ctx.Done():
		return 0, status.FromContextError(ctx.Err()).Err()
	}
}

// LogSize is the number of entries in the log (links appended so far, by every
// process of this data dir).
func (s *Signer) LogSize(ctx context.Context) (uint64, error) {
	if s.log == nil {
		return 0, status.Error(codes.FailedPrecondition, "attest: this signer has no log of its own")
	}
	return s.log.Size(ctx)
}

// Checkpoint has the log publish a checkpoint covering every link appended so far
// (the sequencer, before it copies the log to shared storage).
func (s *Signer) Checkpoint(ctx context.Context) error {
	if s.log == nil {
		return status.Error(codes.FailedPrecondition, "attest: this signer has no log of its own")
	}
	return s.log.Checkpoint(ctx)
}

func (s *Signer) enqueue(p *pending) {
	s.mu.Lock()
	s.waiting++
	s.mu.Unlock()
	s.queue <- p
}

// writeLoop appends pending links, all that are waiting at once in one log batch
// (group commit: while one batch is being made durable, the next one gathers), and
// hands them to finishLoop.
func (s *Signer) writeLoop() {
	defer s.writer.Done()
	finishQ := make(chan finishing, 16)
	defer close(finishQ)
	s.writer.Add(1)
	go s.finishLoop(finishQ)
	ctx := context.Background()
	for first := range s.queue {
		batch := s.linger(s.drain([]*pending{first}))
		results := make([]appendResult, len(batch))
		var entries [][]byte
		var logged []int
		// The same link twice in one batch (an orphan adopted at start while its
		// submitter submits it again) is appended once: later ones copy the first's result.
		first := map[cache.Digest]int{}
		var dups []int
		for i, p := range batch {
			if err := s.load(ctx, p); err != nil {
				results[i].err = err
				continue
			}
			if idx, ok := s.store.LogIndex(p.env); ok {
				results[i].index = idx // logged before (a relink, or a crash after the append)
				continue
			}
			if _, ok := first[p.env]; ok {
				dups = append(dups, i)
				continue
			}
			first[p.env] = i
			entries = append(entries, LinkLogEntry(p.env))
			logged = append(logged, i)
		}
		if len(entries) > 0 {
			s.batches.Add(1)
			idx, err := s.log.AppendBatch(ctx, entries)
			for j, i := range logged {
				if err != nil {
					results[i].err = err
					continue
				}
				results[i].index = idx[j]
				if e := s.store.SetLogIndex(batch[i].env, idx[j]); e != nil {
					results[i].err = e
				}
			}
		}
		for _, i := range dups {
			results[i] = results[first[batch[i].env]]
		}
		// SyncLog waiters are told as soon as their link is in the log; indexing and
		// the move into the envelope store follow (Flush waits for those too).
		for i, p := range batch {
			if p.done != nil {
				p.done <- results[i]
			}
		}
		finishQ <- finishing{batch, results}
	}
}

// DefaultLogLinger is Options.LogLinger's default. Each log batch costs about 1 ms of
// CPU whatever its size (tessera rewrites the tree state, the partial tiles and entry
// bundle, and syncs their directories): at a build's pace of one link every 10-30 ms,
// batches of one paid it for every action.
const DefaultLogLinger = 50 * time.Millisecond

// maxLogBatch bounds the links appended to the log in one batch.
const maxLogBatch = 1024

// linger adds to batch the links that arrive within Options.LogLinger, unless someone
// waits for one of them to be logged (SyncLog, Append, Flush, Close).
func (s *Signer) linger(batch []*pending) []*pending {
	d := s.opts.LogLinger
	if d == 0 {
		d = DefaultLogLinger
	}
	waited := func() bool {
		if s.hurrying.Load() > 0 {
			return true
		}
		for _, p := range batch {
			if p.done != nil {
				return true
			}
		}
		return false
	}
	if d < 0 || len(batch) >= maxLogBatch || waited() {
		return batch
	}
	t := time.NewTimer(d)
	defer t.Stop()
	for len(batch) < maxLogBatch {
		select {
		case p, ok := <-s.queue:
			if !ok {
				return batch
			}
			batch = append(batch, p)
			if p.done != nil {
				return batch
			}
		case <-s.hurry:
			return s.drain(batch)
		case <-t.C:
			return s.drain(batch)
		}
	}
	return batch
}

// drain adds to batch the links already queued, without waiting for more: select
// picks among ready cases at random, so a Flush's wake-up may come before links
// queued ahead of it.
func (s *Signer) drain(batch []*pending) []*pending {
	for len(batch) < maxLogBatch {
		select {
		case p, ok := <-s.queue:
			if !ok {
				return batch
			}
			batch = append(batch, p)
		default:
			return batch
		}
	}
	return batch
}

type finishing struct {
	batch   []*pending
	results []appendResult
}

// finishLoop indexes logged links and moves them into the envelope store, while the
// write loop already gathers and appends the next batch.
func (s *Signer) finishLoop(in <-chan finishing) {
	defer s.writer.Done()
	for f := range in {
		for i, p := range f.batch {
			r := f.results[i]
			if r.err == nil {
				r.err = s.finish(p)
			}
			if r.err != nil {
				s.lg.Error("link not logged or indexed; it stays pending for the next start", "envelope", p.env.String(), "err", r.err)
			}
			s.mu.Lock()
			if r.err != nil {
				s.lastErr = r.err
			}
			s.waiting--
			if s.waiting == 0 {
				s.idle.Broadcast()
			}
			s.mu.Unlock()
		}
	}
}

// load makes sure p holds its envelope: an adopted file is read back and checked
// against its digest, falling back to the CAS if it was torn.
func (s *Signer) load(ctx context.Context, p *pending) error {
	if p.envelope != nil {
		return nil
	}
	b, err := os.ReadFile(p.file)
	if err == nil && cache.DigestOf(b) == p.env {
		p.envelope = b
		return nil
	}
	b, err = cache.ReadAll(ctx, s.opts.CAS, p.env, 64<<20)
	if err != nil {
		return status.Errorf(codes.DataLoss, "pending link %s: its file is damaged and the CAS does not have it: %v", p.env, err)
	}
	p.envelope = b
	return os.WriteFile(p.file, b, 0o644)
}

// finish indexes a logged link (action and products, from its signed payload) and
// moves its pending file into the durable envelope store.
func (s *Signer) finish(p *pending) error {
	payload, err := EnvelopePayload(p.envelope)
	if err != nil {
		return err
	}
	l, err := DecodeLink(payload)
	if err != nil {
		return err
	}
	if err := s.store.AddAction(l.Name, p.env); err != nil {
		return err
	}
	for _, h := range l.Products {
		alg, hash := artifactOf(h)
		if alg == "" {
			continue
		}
		if err := s.store.AddProduct(alg, hash, p.env); err != nil {
			return err
		}
	}
	return s.store.MoveEnvelope(p.file, p.env)
}

// artifactHash returns the algorithm and hash a file is recorded under in a link.
func artifactHash(f File) (string, string) {
	if f.SymlinkTarget != "" {
		return AlgSymlink, symlinkHash(f.SymlinkTarget)
	}
	return AlgSHA256, f.Digest.Hash
}
