// Package history is the searchable record of what kiln executed and served, for the
// web UI: one Run per execution (from its signed link in the transparency log, and,
// when this server ran it, from the scheduler: clients, outcome, time per phase) and
// per action-cache hit. It lives in an embedded bbolt file in the data dir; the part
// that comes from links is derived from the log and rebuilt from it when the file is
// gone (Follow), so it also sees links another process or a cluster's sequencer
// appended.
package history

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kilnbuild/kiln/cache"
	bolt "go.etcd.io/bbolt"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Outcomes of a Run.
const (
	Cached    = "cached"    // answered from the action cache
	OK        = "ok"        // ran, exit code 0
	Failed    = "failed"    // ran, non-zero exit code (or a failed check)
	Error     = "error"     // could not run or finish (an error status, no result)
	Cancelled = "cancelled" // every client went away
)

// Outcomes lists every outcome, for the search form.
var Outcomes = []string{OK, Failed, Cached, Error, Cancelled}

// Sources of a Run.
const (
	FromScheduler = "scheduler" // this server ran or answered it
	FromLog       = "log"       // known only from its link in the log
)

// Output is one output of a run: its path as the client sees it and its content
// SHA-256 (empty for a directory the result lists as a tree, or a symlink).
type Output struct {
	Path   string `json:"path"`
	SHA256 string `json:"sha256,omitempty"`
	Size   int64  `json:"size,omitempty"`
}

// Phase is the time one phase of an execution took.
type Phase struct {
	Name    string  `json:"name"`
	Seconds float64 `json:"seconds"`
}

// Run is one execution or cache hit.
type Run struct {
	Seq      uint64       `json:"-"`
	Time     time.Time    `json:"time"`
	Source   string       `json:"source"`
	Instance string       `json:"instance,omitempty"`
	Action   cache.Digest `json:"action"`
	Clients  []string     `json:"clients,omitempty"`
	Outcome  string       `json:"outcome"`
	ExitCode int          `json:"exit_code"`
	// Envelope is the link envelope's digest (zero when no link was signed).
	Envelope  cache.Digest `json:"envelope,omitzero"`
	LogIndex  uint64       `json:"log_index"`
	Logged    bool         `json:"logged,omitempty"`
	Toolchain string       `json:"toolchain,omitempty"` // sha256:HEX of the image manifest
	Argv      []string     `json:"argv,omitempty"`
	Outputs   []Output     `json:"outputs,omitempty"`
	// Materials are the input files that some indexed run produced (what makes a run
	// a consumer on an artifact page); sources are not kept here.
	Materials       []Output     `json:"materials,omitempty"`
	Stdout          cache.Digest `json:"stdout,omitzero"`
	Stderr          cache.Digest `json:"stderr,omitzero"`
	ServerLog       cache.Digest `json:"server_log,omitzero"` // the kiln-sandbox report
	Message         string       `json:"message,omitempty"`
	Phases          []Phase      `json:"phases,omitempty"`
	Reproducibility string       `json:"reproducibility,omitempty"`
}

// maxArgvBytes bounds the command line kept in a run (the link keeps all of it).
const maxArgvBytes = 16 << 10

var (
	bRuns      = []byte("runs")      // seq -> Run (JSON)
	bEnv       = []byte("envelope")  // envelope hash -> seq of the execution that signed it
	bAction    = []byte("action")    // action hash + seq
	bPath      = []byte("path")      // each path suffix starting at a component + 0 + seq
	bClient    = []byte("client")    // client + 0 + seq
	bToolchain = []byte("toolchain") // toolchain hex + seq
	bOutcome   = []byte("outcome")   // outcome + 0 + seq
	bProduct   = []byte("product")   // output sha256 hex + seq
	bConsumer  = []byte("consumer")  // material sha256 hex + seq
	bMeta      = []byte("meta")
	kLogSize   = []byte("log-size") // how many log entries are indexed
	allBuckets = [][]byte{bRuns, bEnv, bAction, bPath, bClient, bToolchain, bOutcome, bProduct, bConsumer, bMeta}
)

// Index is an open history file. It is safe for concurrent use; one process opens it
// (kiln serve, the store's primary).
type Index struct {
	db  *bolt.DB
	log *slog.Logger

	in      chan Run
	closed  atomic.Bool
	follow  sync.Mutex // one CatchUp at a time
	stop    chan struct{}
	wg      sync.WaitGroup
	dropped uint64
	mu      sync.Mutex
	flushed *sync.Cond
	pending int
	// hurrying counts Flush callers; while there are any the write loop does not
	// linger, and hurry wakes it if it does.
	hurrying atomic.Int32
	hurry    chan struct{}
	linger   time.Duration
	writes   atomic.Int64 // transactions written, for tests
}

// Open opens (creating) the index file at path.
func Open(path string, log *slog.Logger) (*Index, error) {
	return open(path, log, writeLinger)
}

// open is Open with the write loop's linger.
func open(path string, log *slog.Logger, linger time.Duration) (*Index, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, status.Errorf(codes.Internal, "history: %v", err)
	}
	db, err := bolt.Open(path, 0o644, &bolt.Options{Timeout: 5 * time.Second})
	if err != nil {
		return nil, status.Errorf(codes.Internal, "history %s: %v", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range allBuckets {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, status.Errorf(codes.Internal, "history %s: %v", path, err)
	}
	x := &Index{db: db, log: log, in: make(chan Run, 4096), stop: make(chan struct{}), hurry: make(chan struct{}, 1), linger: linger}
	x.flushed = sync.NewCond(&x.mu)
	x.wg.Add(1)
	go x.writeLoop()
	return x, nil
}

// Close writes what is queued and closes the file.
func (x *Index) Close() error {
	x.closed.Store(true)
	close(x.stop)
	x.wg.Wait()
	return x.db.Close()
}

// Record queues r to be added (merged into the run of the same link if there is one).
// It never blocks the caller: when the queue is full the run is dropped and logged.
func (x *Index) Record(r Run) {
	if x.closed.Load() {
		return // an execution that ended while the server shut down
	}
	x.mu.Lock()
	x.pending++
	x.mu.Unlock()
	select {
	case x.in <- r:
	default:
		x.mu.Lock()
		x.pending--
		x.dropped++
		x.flushed.Broadcast()
		x.mu.Unlock()
		x.log.Warn("history: queue full, a run is not recorded", "action", r.Action.String())
	}
}

// Flush waits until every run recorded so far is written.
func (x *Index) Flush() {
	x.hurrying.Add(1)
	defer x.hurrying.Add(-1)
	select {
	case x.hurry <- struct{}{}:
	default:
	}
	x.mu.Lock()
	for x.pending > 0 {
		x.flushed.Wait()
	}
	x.mu.Unlock()
}

// writeLoop writes queued runs, all that wait at once in one transaction.
func (x *Index) writeLoop() {
	defer x.wg.Done()
	for {
		var batch []Run
		select {
		case r := <-x.in:
			batch = append(batch, r)
		case <-x.stop:
			for {
				select {
				case r := <-x.in:
					batch = append(batch, r)
					continue
				default:
				}
				break
			}
			if len(batch) > 0 {
				x.write(batch)
			}
			return
		}
		batch = x.gather(batch)
		x.write(batch)
	}
}

// writeLinger is how long the write loop gathers runs before it writes a batch: each
// write is a bbolt transaction with its fdatasync, and a build records a run every
// 10-30 ms. The UI shows a run that much later; Flush and Close do not wait for it.
const writeLinger = 100 * time.Millisecond

// gather adds to batch the runs that arrive within writeLinger, or only those already
// queued while someone waits in Flush.
func (x *Index) gather(batch []Run) []Run {
	var t *time.Timer
	var tc <-chan time.Time
	for len(batch) < 1024 {
		if tc == nil && x.hurrying.Load() == 0 {
			t = time.NewTimer(x.linger)
			defer t.Stop()
			tc = t.C
		}
		if x.hurrying.Load() > 0 {
			select {
			case r := <-x.in:
				batch = append(batch, r)
				continue
			default:
				return batch
			}
		}
		select {
		case r := <-x.in:
			batch = append(batch, r)
		case <-x.hurry:
		case <-x.stop:
			return batch
		case <-tc:
			return batch
		}
	}
	return batch
}

func (x *Index) write(batch []Run) {
	x.writes.Add(1)
	err := x.db.Update(func(tx *bolt.Tx) error {
		for _, r := range batch {
			if err := put(tx, r); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		x.log.Error("history: runs not recorded", "runs", len(batch), "err", err)
	}
	x.mu.Lock()
	x.pending -= len(batch)
	x.flushed.Broadcast()
	x.mu.Unlock()
}

func seqKey(seq uint64) []byte { return binary.BigEndian.AppendUint64(nil, seq) }

func indexKey(prefix string, sep bool, seq uint64) []byte {
	k := []byte(prefix)
	if sep {
		k = append(k, 0)
	}
	return binary.BigEndian.AppendUint64(k, seq)
}

// put adds r, or merges it into the run that holds the same envelope: a scheduler
// record and the link of the same execution become one run, whichever comes first. A
// cache hit is always a run of its own, but takes what the link says (toolchain,
// command) from the execution's run.
func put(tx *bolt.Tx, r Run) error {
	runs := tx.Bucket(bRuns)
	var old *Run
	if r.Envelope != (cache.Digest{}) {
		if s := tx.Bucket(bEnv).Get([]byte(r.Envelope.Hash)); s != nil {
			o, err := get(tx, binary.BigEndian.Uint64(s))
			if err != nil {
				return err
			}
			old = o
		}
	}
	if old != nil && r.Outcome == Cached {
		fillFromLink(&r, old)
		old = nil
	}
	if old != nil {
		r = merge(*old, r)
		r.Seq = old.Seq
	} else {
		seq, err := runs.NextSequence()
		if err != nil {
			return err
		}
		r.Seq = seq
		if r.Envelope != (cache.Digest{}) && r.Outcome != Cached {
			if err := tx.Bucket(bEnv).Put([]byte(r.Envelope.Hash), seqKey(seq)); err != nil {
				return err
			}
		}
	}
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	if err := runs.Put(seqKey(r.Seq), b); err != nil {
		return err
	}
	return addKeys(tx, r)
}

// fillFromLink copies what the link of a hit's execution says onto the hit.
func fillFromLink(hit *Run, ex *Run) {
	if hit.Toolchain == "" {
		hit.Toolchain = ex.Toolchain
	}
	if len(hit.Argv) == 0 {
		hit.Argv = ex.Argv
	}
	if len(hit.Outputs) == 0 {
		hit.Outputs = ex.Outputs
	}
	hit.LogIndex, hit.Logged = ex.LogIndex, ex.Logged
	hit.Reproducibility = ex.Reproducibility
}

// merge combines two records of one execution: the scheduler's (time, clients,
// outcome, phases, server log) and the link's (toolchain, command, outputs, materials,
// log index), whichever came first.
func merge(old, nu Run) Run {
	out, link := old, nu
	if nu.Source != FromLog {
		out, link = nu, old
		for _, c := range old.Clients {
			if !slices.Contains(out.Clients, c) {
				out.Clients = append(out.Clients, c)
			}
		}
	}
	if link.Source != FromLog {
		return out
	}
	out.Toolchain, out.Argv, out.Materials = link.Toolchain, link.Argv, link.Materials
	out.LogIndex, out.Logged, out.Reproducibility = link.LogIndex, link.Logged, link.Reproducibility
	if len(link.Outputs) > 0 {
		sizes := map[string]int64{}
		for _, o := range out.Outputs {
			sizes[o.Path] = o.Size
		}
		out.Outputs = slices.Clone(link.Outputs)
		for i := range out.Outputs {
			if out.Outputs[i].Size == 0 {
				out.Outputs[i].Size = sizes[out.Outputs[i].Path]
			}
		}
	}
	if out.Stdout == (cache.Digest{}) {
		out.Stdout, out.Stderr = link.Stdout, link.Stderr
	}
	if out.Outcome == "" {
		out.Outcome = link.Outcome
	}
	return out
}

// addKeys adds r's search keys (duplicates are harmless: a key is a set member).
func addKeys(tx *bolt.Tx, r Run) error {
	type kv struct {
		b []byte
		k []byte
	}
	var ks []kv
	ks = append(ks, kv{bAction, indexKey(r.Action.Hash, false, r.Seq)})
	ks = append(ks, kv{bOutcome, indexKey(r.Outcome, true, r.Seq)})
	for _, c := range r.Clients {
		ks = append(ks, kv{bClient, indexKey(c, true, r.Seq)})
	}
	if h, ok := strings.CutPrefix(r.Toolchain, "sha256:"); ok {
		ks = append(ks, kv{bToolchain, indexKey(h, false, r.Seq)})
	}
	for _, o := range r.Outputs {
		for _, s := range suffixes(o.Path) {
			ks = append(ks, kv{bPath, indexKey(s, true, r.Seq)})
		}
		if o.SHA256 != "" && r.Outcome != Cached {
			ks = append(ks, kv{bProduct, indexKey(o.SHA256, false, r.Seq)})
		}
	}
	for _, m := range r.Materials {
		ks = append(ks, kv{bConsumer, indexKey(m.SHA256, false, r.Seq)})
	}
	for _, e := range ks {
		if len(e.k) > bolt.MaxKeySize {
			continue
		}
		if err := tx.Bucket(e.b).Put(e.k, nil); err != nil {
			return err
		}
	}
	return nil
}

// suffixes are the tails of p that start at a path component: a/b/c.o gives a/b/c.o,
// b/c.o and c.o. A search term matches a path when one of them starts with it.
func suffixes(p string) []string {
	out := []string{p}
	for i := 0; i < len(p); i++ {
		if p[i] == '/' && i+1 < len(p) {
			out = append(out, p[i+1:])
		}
	}
	return out
}

// pathMatches is the search rule the path index implements, for filtering.
func pathMatches(p, q string) bool {
	for _, s := range suffixes(p) {
		if strings.HasPrefix(s, q) {
			return true
		}
	}
	return false
}

func get(tx *bolt.Tx, seq uint64) (*Run, error) {
	b := tx.Bucket(bRuns).Get(seqKey(seq))
	if b == nil {
		return nil, status.Errorf(codes.NotFound, "run %d not found", seq)
	}
	var r Run
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, status.Errorf(codes.DataLoss, "history run %d: %v", seq, err)
	}
	r.Seq = seq
	return &r, nil
}

// Get returns the run numbered seq.
func (x *Index) Get(seq uint64) (*Run, error) {
	var r *Run
	err := x.db.View(func(tx *bolt.Tx) error {
		var err error
		r, err = get(tx, seq)
		return err
	})
	return r, err
}

// Query selects runs: every non-empty field must match. Results are newest first.
type Query struct {
	// Action matches action digests by hex prefix.
	Action string
	// Path matches output paths at a component boundary: "hello.o", "app/hello",
	// "bazel-out/k8-fastbuild/bin/app/hello.o".
	Path string
	// Client matches a client identity exactly.
	Client string
	// Toolchain matches toolchain manifest digests by hex prefix ("sha256:" optional).
	Toolchain string
	// Outcome is one of Outcomes; Failures matches failed and error.
	Outcome string
	// Before, if non-zero, returns only runs older than this Seq (the next page).
	Before uint64
	// Limit bounds the results (default 50).
	Limit int
}

// Failures is the Query.Outcome that selects failed and error runs.
const Failures = "failures"

// Page is one page of a query's results.
type Page struct {
	Runs []*Run
	// Next is the Before of the next page, 0 if none.
	Next uint64
}

// Search runs q. The most selective field it has is answered from its index; the
// others filter the runs found.
func (x *Index) Search(q Query) (Page, error) {
	q.Action = strings.ToLower(strings.TrimSpace(strings.TrimPrefix(q.Action, "sha256:")))
	if i := strings.IndexByte(q.Action, '/'); i >= 0 {
		q.Action = q.Action[:i]
	}
	q.Toolchain = strings.ToLower(strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(q.Toolchain), "sha256:")))
	q.Path = strings.TrimPrefix(strings.TrimSpace(q.Path), "/")
	q.Client = strings.TrimSpace(q.Client)
	if q.Limit <= 0 {
		q.Limit = 50
	}
	var page Page
	err := x.db.View(func(tx *bolt.Tx) error {
		var cands []uint64
		driven := true
		switch {
		case q.Action != "":
			cands = scanPrefix(tx.Bucket(bAction), []byte(q.Action), false)
		case q.Path != "":
			cands = scanPrefix(tx.Bucket(bPath), []byte(q.Path), true)
		case q.Client != "":
			cands = scanPrefix(tx.Bucket(bClient), append([]byte(q.Client), 0), false)
		case q.Toolchain != "":
			cands = scanPrefix(tx.Bucket(bToolchain), []byte(q.Toolchain), false)
		case q.Outcome == Failures:
			cands = append(scanPrefix(tx.Bucket(bOutcome), []byte(Failed+"\x00"), false), scanPrefix(tx.Bucket(bOutcome), []byte(Error+"\x00"), false)...)
		case q.Outcome != "":
			cands = scanPrefix(tx.Bucket(bOutcome), []byte(q.Outcome+"\x00"), false)
		default:
			driven = false
		}
		take := func(r *Run) bool {
			if !q.matches(r) {
				return true
			}
			if len(page.Runs) == q.Limit {
				page.Next = page.Runs[len(page.Runs)-1].Seq
				return false
			}
			page.Runs = append(page.Runs, r)
			return true
		}
		if driven {
			sort.Slice(cands, func(i, j int) bool { return cands[i] > cands[j] })
			cands = slices.Compact(cands)
			for _, s := range cands {
				if q.Before != 0 && s >= q.Before {
					continue
				}
				r, err := get(tx, s)
				if err != nil {
					continue
				}
				if !take(r) {
					break
				}
			}
			return nil
		}
		c := tx.Bucket(bRuns).Cursor()
		var k, v []byte
		if q.Before != 0 {
			c.Seek(seqKey(q.Before))
			k, v = c.Prev()
		} else {
			k, v = c.Last()
		}
		for ; k != nil; k, v = c.Prev() {
			var r Run
			if json.Unmarshal(v, &r) != nil {
				continue
			}
			r.Seq = binary.BigEndian.Uint64(k)
			if !take(&r) {
				break
			}
		}
		return nil
	})
	return page, err
}

func (q Query) matches(r *Run) bool {
	if q.Action != "" && !strings.HasPrefix(r.Action.Hash, q.Action) {
		return false
	}
	if q.Client != "" && !slices.Contains(r.Clients, q.Client) {
		return false
	}
	if q.Toolchain != "" && !strings.HasPrefix(strings.TrimPrefix(r.Toolchain, "sha256:"), q.Toolchain) {
		return false
	}
	switch q.Outcome {
	case "":
	case Failures:
		if r.Outcome != Failed && r.Outcome != Error {
			return false
		}
	default:
		if r.Outcome != q.Outcome {
			return false
		}
	}
	if q.Path != "" {
		found := false
		for _, o := range r.Outputs {
			if pathMatches(o.Path, q.Path) {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// scanPrefix returns the seqs of keys that start with prefix (each key ends in an
// 8-byte seq). With dedupe, a seq found under several keys is returned once.
func scanPrefix(b *bolt.Bucket, prefix []byte, dedupe bool) []uint64 {
	var out []uint64
	c := b.Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
		if len(k) < 8 {
			continue
		}
		out = append(out, binary.BigEndian.Uint64(k[len(k)-8:]))
	}
	if dedupe {
		slices.Sort(out)
		out = slices.Compact(out)
	}
	return out
}

// ByAction returns the runs of the action with this hex digest, newest first.
func (x *Index) ByAction(hash string) ([]*Run, error) {
	return x.lookup(bAction, []byte(hash))
}

// Producers returns the runs that produced a file with this SHA-256, newest first.
func (x *Index) Producers(sha string) ([]*Run, error) { return x.lookup(bProduct, []byte(sha)) }

// Consumers returns the runs that took a file with this SHA-256 (produced by some
// indexed run) as an input, newest first.
func (x *Index) Consumers(sha string) ([]*Run, error) { return x.lookup(bConsumer, []byte(sha)) }

func (x *Index) lookup(bucket, key []byte) ([]*Run, error) {
	var out []*Run
	err := x.db.View(func(tx *bolt.Tx) error {
		seqs := scanPrefix(tx.Bucket(bucket), key, true)
		for i := len(seqs) - 1; i >= 0; i-- {
			k := seqs[i]
			// exact key only: the index key is key + 8 bytes
			r, err := get(tx, k)
			if err != nil {
				continue
			}
			out = append(out, r)
		}
		return nil
	})
	return out, err
}

// ByEnvelope returns the execution run that signed this link envelope.
func (x *Index) ByEnvelope(env cache.Digest) (*Run, error) {
	var r *Run
	err := x.db.View(func(tx *bolt.Tx) error {
		s := tx.Bucket(bEnv).Get([]byte(env.Hash))
		if s == nil {
			return status.Errorf(codes.NotFound, "no run signed envelope %s", env)
		}
		var err error
		r, err = get(tx, binary.BigEndian.Uint64(s))
		return err
	})
	return r, err
}

// Counts are totals over the whole index.
type Counts struct {
	Runs      int
	ByOutcome map[string]int
	// Toolchains counts runs by toolchain manifest hex.
	Toolchains map[string]int
}

// Count totals the index: runs by outcome and by toolchain (key counts only; no run
// is decoded).
func (x *Index) Count() (Counts, error) {
	c := Counts{ByOutcome: map[string]int{}, Toolchains: map[string]int{}}
	err := x.db.View(func(tx *bolt.Tx) error {
		c.Runs = tx.Bucket(bRuns).Stats().KeyN
		tx.Bucket(bOutcome).ForEach(func(k, _ []byte) error {
			if i := bytes.IndexByte(k, 0); i > 0 {
				c.ByOutcome[string(k[:i])]++
			}
			return nil
		})
		tx.Bucket(bToolchain).ForEach(func(k, _ []byte) error {
			if len(k) > 8 {
				c.Toolchains[string(k[:len(k)-8])]++
			}
			return nil
		})
		return nil
	})
	return c, err
}

// LogSize is how many log entries Follow has indexed.
func (x *Index) LogSize() uint64 {
	var n uint64
	x.db.View(func(tx *bolt.Tx) error {
		if b := tx.Bucket(bMeta).Get(kLogSize); len(b) == 8 {
			n = binary.BigEndian.Uint64(b)
		}
		return nil
	})
	return n
}

// addFromLog writes the runs of a span of log entries and the new indexed size, in
// one transaction, so a crash never indexes an entry twice or skips one.
func (x *Index) addFromLog(runs []Run, size uint64) error {
	// Queued scheduler records go first, so a link finds the run it belongs to.
	x.Flush()
	return x.db.Update(func(tx *bolt.Tx) error {
		for _, r := range runs {
			if err := put(tx, r); err != nil {
				return err
			}
		}
		return tx.Bucket(bMeta).Put(kLogSize, seqKey(size))
	})
}

// knownProducts reports which of these SHA-256s some indexed run produced.
func (x *Index) knownProducts(shas []string) map[string]bool {
	out := map[string]bool{}
	x.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bProduct).Cursor()
		for _, s := range shas {
			if k, _ := c.Seek([]byte(s)); k != nil && bytes.HasPrefix(k, []byte(s)) {
				out[s] = true
			}
		}
		return nil
	})
	return out
}

// String describes a run for logs.
func (r *Run) String() string {
	return fmt.Sprintf("run %d %s %s", r.Seq, r.Action, r.Outcome)
}

// ErrClosed is returned by Follow once the index is closed.
var ErrClosed = errors.New("history: closed")
