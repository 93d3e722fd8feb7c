// Package disk is kiln's embedded on-disk store: CAS blobs and action-cache entries as
// content-addressed files, written atomically, verified on read (unless hashed
// recently and unchanged since), evicted least recently used first when the store grows
// past its bound.
//
// Several processes may use one directory at once (a long-running `kiln serve` and CLI
// commands): the files are the truth and every write is a rename, so no lock is needed
// to read or write. One process at a time may be the primary (it holds primary.lock):
// it keeps an in-memory index of the store, answers FindMissing from it, and evicts.
// The others find blobs with stat, and touch foreign.stamp after writing, which tells
// the primary to stat what its index lacks.
package disk

import (
	"bytes"
	"container/list"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/internal/dirplace"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Options configures a Store.
type Options struct {
	// Primary makes this Store the directory's indexer (one per directory; kiln serve).
	Primary bool
	// ReadOnly opens an existing store (e.g. in an untrusted bundle) without creating,
	// sweeping, writing or removing anything: Put fails, and a blob that fails
	// verification is reported, not removed.
	ReadOnly bool
	// MaxSize bounds the bytes of blobs and action-cache entries kept; 0 means no bound.
	// Only a primary Store can bound the size.
	MaxSize int64
	// Fsync makes every write durable before it becomes visible (file and directory
	// fsync). Without it a power loss can tear a blob, which verification on read then
	// catches and removes.
	Fsync bool
	// Logger receives eviction and corruption events; nil discards them.
	Logger *slog.Logger
	// Registerer, if set, receives the store's size, count and eviction metrics.
	Registerer prometheus.Registerer
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Store is the on-disk CAS and action cache rooted at one directory.
type Store struct {
	dir     string
	opts    Options
	log     *slog.Logger
	now     func() time.Time
	stripes [256]sync.Mutex // serialize rename-in against unlink for one key

	owner     string   // prefix of this Store's temp files
	ownerLock *os.File // flock held while the Store is open

	mu       sync.Mutex
	index    map[string]*entry // key: "c"+hash or "a"+keyhash
	lru      *list.List        // front: most recently used
	total    int64
	reserved int64        // declared sizes of the blobs being written (Put)
	staging  int64        // declared sizes of the blobs being staged (Stage): free disk only
	temp     atomic.Int64 // bytes in the temp files of the blobs being written
	primary  *os.File     // flock on primary.lock, held by the indexing process
	// freeSpace reports the bytes still free on the store's filesystem.
	freeSpace func() (int64, error)
	lastFree  int64     // freeSpace's last reading (under mu)
	lastAt    time.Time // when it was taken; zero: never

	verified *memo // blobs hashed recently, as long as their files did not change

	noTmpfile atomic.Bool // the filesystem has no O_TMPFILE: temp files are named

	stampMu   sync.Mutex
	stampSeen time.Time // foreign.stamp's mtime when the primary last synced with it

	sizeGauge  prometheus.Gauge
	countGauge prometheus.Gauge
	tempGauge  prometheus.Gauge
	evictions  prometheus.Counter
	corrupt    prometheus.Counter
}

type entry struct {
	key     string
	size    int64
	touched time.Time // last time the file's atime was set, for LRU across restarts
	elem    *list.Element
}

// touchEvery is how stale a file's atime may get before an access refreshes it, so the
// LRU order survives a restart without a write on every read.
const touchEvery = time.Hour

// Temp files are named OWNER-RANDOM, where OWNER is a random id per open Store that
// holds a flock on tmp/OWNER.owner while it lives. An owner file that can be locked
// belongs to a dead process, whose temp files are swept.
const ownerSuffix = ".owner"

// claimSuffix names an owner file while it is being locked, before it is renamed to
// its owner name (claimOwner).
const claimSuffix = ".claim"

// Open opens (creating if needed) the store in dir. With MaxSize > 0 it scans the
// directory to rebuild the LRU index, least recently used (atime) first, and evicts at
// once if needed.
func Open(ctx context.Context, dir string, opts Options) (*Store, error) {
	s := &Store{dir: dir, opts: opts, log: opts.Logger, now: opts.Now, index: map[string]*entry{}, lru: list.New(), verified: newMemo()}
	s.freeSpace = func() (int64, error) {
		var st unix.Statfs_t
		if err := unix.Statfs(dir, &st); err != nil {
			return 0, err
		}
		return int64(st.Bavail) * st.Bsize, nil
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.now == nil {
		s.now = time.Now
	}
	if opts.ReadOnly {
		if opts.Primary || opts.MaxSize > 0 {
			return nil, status.Error(codes.InvalidArgument, "a read-only store cannot be primary or bounded")
		}
		return s, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, status.Errorf(codes.Internal, "create store: %v", err)
	}
	// cas/, ac/ and tmp/, and each of their 256 subdirectories, in block groups of
	// their own (a new store only). On ext4 without a journal every inode freed in a
	// group slows down each later allocation there for up to 305 s (package dirplace):
	// blobs evicted, or a whole store removed, would otherwise tax every blob the store
	// writes next in the one group they all shared. Spread over the disk, a group sees
	// a 256th of that.
	s.spread(dir)
	for _, sub := range []string{"cas", "ac", "tmp"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o755); err != nil {
			return nil, status.Errorf(codes.Internal, "create store: %v", err)
		}
		if sub != "tmp" {
			s.spread(filepath.Join(dir, sub))
		}
	}
	for i := 0; i < 256; i++ {
		for _, sub := range []string{"cas", "ac"} {
			if err := os.MkdirAll(filepath.Join(dir, sub, fmt.Sprintf("%02x", i)), 0o755); err != nil {
				return nil, status.Errorf(codes.Internal, "create store: %v", err)
			}
		}
	}
	if err := s.claimOwner(); err != nil {
		return nil, err
	}
	if opts.Registerer != nil {
		s.sizeGauge = prometheus.NewGauge(prometheus.GaugeOpts{Name: "kiln_store_size_bytes", Help: "Bytes held by the on-disk store (as indexed by this process)."})
		s.countGauge = prometheus.NewGauge(prometheus.GaugeOpts{Name: "kiln_store_entries", Help: "Blobs and action-cache entries in the on-disk store."})
		s.tempGauge = prometheus.NewGauge(prometheus.GaugeOpts{Name: "kiln_store_temp_bytes", Help: "Bytes written so far of the blobs being stored (temporary files; counted in --max-size)."})
		s.evictions = prometheus.NewCounter(prometheus.CounterOpts{Name: "kiln_store_evictions_total", Help: "Entries evicted to keep the store under --max-size."})
		s.corrupt = prometheus.NewCounter(prometheus.CounterOpts{Name: "kiln_store_corrupt_blobs_total", Help: "Blobs that failed verification on read and were removed."})
		opts.Registerer.MustRegister(s.sizeGauge, s.countGauge, s.tempGauge, s.evictions, s.corrupt)
	}
	if opts.MaxSize > 0 && !opts.Primary {
		return nil, status.Error(codes.InvalidArgument, "only the primary store can bound its size")
	}
	if opts.Primary {
		f, err := os.OpenFile(filepath.Join(dir, "primary.lock"), os.O_CREATE|os.O_RDWR, 0o644)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "open primary lock: %v", err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			return nil, status.Errorf(codes.FailedPrecondition, "store %s already has a primary process (another kiln serve holds primary.lock); run one server per data dir", dir)
		}
		s.primary = f
		s.stampSeen = s.stampTime()
		if err := s.scan(ctx); err != nil {
			f.Close()
			return nil, err
		}
		s.evict("")
	}
	return s, nil
}

// Close releases the store's locks; its temp files are gone by then.
func (s *Store) Close() error {
	if s.primary != nil {
		s.primary.Close()
	}
	if s.ownerLock == nil {
		return nil
	}
	os.Remove(s.ownerLock.Name())
	return s.ownerLock.Close()
}

// Dir returns the store's root directory.
func (s *Store) Dir() string { return s.dir }

// Size returns the bytes this process has indexed.
func (s *Store) Size() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.total
}

func (s *Store) casPath(hash string) string {
	return filepath.Join(s.dir, "cas", hash[:2], hash)
}

func (s *Store) acPath(keyHash string) string {
	return filepath.Join(s.dir, "ac", keyHash[:2], keyHash)
}

// BlobPath returns where blob d lives (whether or not it is present), for callers that
// hardlink blobs. Files there are read-only and must never be written.
func (s *Store) BlobPath(d cache.Digest) string { return s.casPath(d.Hash) }

func (s *Store) stripe(key string) *sync.Mutex {
	h := fnv.New32a()
	h.Write([]byte(key))
	return &s.stripes[h.Sum32()%uint32(len(s.stripes))]
}

// claimOwner creates this Store's owner file and locks it, then sweeps temp files of
// owners that are gone (crashed processes).
func (s *Store) claimOwner() error {
	var b [8]byte
	rand.Read(b[:])
	s.owner = hex.EncodeToString(b[:])
	// The file is locked under a name sweepers ignore, then renamed into view: a sweeper
	// that saw it unlocked would take it for a dead owner's and remove it.
	claim := filepath.Join(s.dir, "tmp", s.owner+claimSuffix)
	f, err := os.OpenFile(claim, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return status.Errorf(codes.Internal, "create store owner file: %v", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		os.Remove(claim)
		return status.Errorf(codes.Internal, "lock store owner file: %v", err)
	}
	if err := os.Rename(claim, filepath.Join(s.dir, "tmp", s.owner+ownerSuffix)); err != nil {
		f.Close()
		os.Remove(claim)
		return status.Errorf(codes.Internal, "publish store owner file: %v", err)
	}
	s.ownerLock = f
	s.sweepTmp()
	return nil
}

// sweepTmp removes temp files whose owner no longer holds its lock.
func (s *Store) sweepTmp() {
	tmp := filepath.Join(s.dir, "tmp")
	ents, err := os.ReadDir(tmp)
	if err != nil {
		return
	}
	dead := map[string]bool{}
	for _, e := range ents {
		name := e.Name()
		if strings.HasSuffix(name, claimSuffix) {
			// A claim left by a process that died before publishing its owner file; a
			// young one may belong to a process between its create and its lock.
			if info, err := e.Info(); err != nil || time.Since(info.ModTime()) < time.Minute {
				continue
			}
			if f, err := os.OpenFile(filepath.Join(tmp, name), os.O_RDWR, 0); err == nil {
				if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil {
					os.Remove(filepath.Join(tmp, name))
				}
				f.Close()
			}
			continue
		}
		if !strings.HasSuffix(name, ownerSuffix) {
			continue
		}
		id := strings.TrimSuffix(name, ownerSuffix)
		if id == s.owner {
			continue
		}
		f, err := os.OpenFile(filepath.Join(tmp, name), os.O_RDWR, 0)
		if err != nil {
			continue
		}
		if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil {
			dead[id] = true
			os.Remove(filepath.Join(tmp, name))
		}
		f.Close()
	}
	swept := 0
	for _, e := range ents {
		name := e.Name()
		if i := strings.IndexByte(name, '-'); i > 0 && dead[name[:i]] {
			os.Remove(filepath.Join(tmp, name))
			swept++
		}
	}
	if swept > 0 {
		s.log.Info("removed temp files of crashed writers", "files", swept)
	}
}

// scan indexes every file in the store, least recently modified first.
func (s *Store) scan(ctx context.Context) error {
	type found struct {
		key   string
		size  int64
		mtime time.Time
	}
	var all []found
	for _, sub := range []struct{ dir, prefix string }{{"cas", "c"}, {"ac", "a"}} {
		root := filepath.Join(s.dir, sub.dir)
		err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if d.IsDir() || !validKeyHash(d.Name()) {
				return nil
			}
			info, err := d.Info()
			if err != nil {
				return nil // removed meanwhile
			}
			all = append(all, found{sub.prefix + d.Name(), info.Size(), accessTime(info)})
			return nil
		})
		if err != nil {
			return status.Errorf(codes.Internal, "scan store: %v", err)
		}
	}
	sort.Slice(all, func(i, j int) bool { return all[i].mtime.Before(all[j].mtime) })
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, f := range all {
		e := &entry{key: f.key, size: f.size, touched: f.mtime}
		e.elem = s.lru.PushFront(e)
		s.index[f.key] = e
		s.total += f.size
	}
	s.updateGauges()
	s.log.Info("store indexed", "dir", s.dir, "entries", len(all), "bytes", s.total)
	return nil
}

// accessTime is a file's atime, the store's record of when it was last used.
func accessTime(info fs.FileInfo) time.Time {
	if st, ok := info.Sys().(*syscall.Stat_t); ok {
		return time.Unix(st.Atim.Unix())
	}
	return info.ModTime()
}

func validKeyHash(name string) bool {
	if len(name) != 64 {
		return false
	}
	_, err := hex.DecodeString(name)
	return err == nil
}

func (s *Store) updateGauges() {
	if s.sizeGauge != nil {
		s.sizeGauge.Set(float64(s.total))
		s.countGauge.Set(float64(len(s.index)))
	}
}

// touch marks key as just used (indexing it if another process wrote it) and, every
// touchEvery, refreshes its file's atime so the order survives restarts. (The mtime is
// fixed: it is what an action sees on a hardlinked input; see cache.InputMtime.)
func (s *Store) touch(key, path string, size int64) {
	if s.primary == nil {
		return
	}
	now := s.now()
	s.mu.Lock()
	e, ok := s.index[key]
	if ok {
		s.lru.MoveToFront(e.elem)
		stale := now.Sub(e.touched) > touchEvery
		if stale {
			e.touched = now
		}
		s.mu.Unlock()
		if stale {
			os.Chtimes(path, now, cache.InputMtime)
		}
		return
	}
	e = &entry{key: key, size: size, touched: now}
	e.elem = s.lru.PushFront(e)
	s.index[key] = e
	s.total += size
	s.updateGauges()
	over := s.opts.MaxSize > 0 && s.total+s.temp.Load() > s.opts.MaxSize
	s.mu.Unlock()
	if over {
		s.evict(key)
	}
}

// indexed reports whether the index holds key at size.
func (s *Store) indexed(key string, size int64) bool {
	s.mu.Lock()
	e, ok := s.index[key]
	s.mu.Unlock()
	return ok && e.size == size
}

// forget drops key from the index (its file is gone).
func (s *Store) forget(key string) {
	s.mu.Lock()
	if e, ok := s.index[key]; ok {
		s.lru.Remove(e.elem)
		delete(s.index, key)
		s.total -= e.size
		s.updateGauges()
	}
	s.mu.Unlock()
}

// evict removes least recently used entries until the store, with the blobs being
// written, is at 95% of MaxSize. It never removes keep, the entry just stored: a
// blob the store accepted stays until something newer needs its room.
func (s *Store) evict(keep string) {
	if s.primary == nil || s.opts.MaxSize <= 0 {
		return
	}
	low := s.opts.MaxSize - s.opts.MaxSize/20
	s.mu.Lock()
	var victims []*entry
	for s.total+s.temp.Load() > low {
		back := s.lru.Back()
		if back == nil {
			break
		}
		e := back.Value.(*entry)
		if e.key == keep {
			if back = back.Prev(); back == nil {
				break
			}
			e = back.Value.(*entry)
		}
		s.lru.Remove(back)
		delete(s.index, e.key)
		s.total -= e.size
		victims = append(victims, e)
	}
	s.updateGauges()
	s.mu.Unlock()
	for _, e := range victims {
		lk := s.stripe(e.key)
		lk.Lock()
		s.mu.Lock()
		_, back := s.index[e.key] // written again meanwhile: keep the new file
		s.mu.Unlock()
		if !back {
			os.Remove(s.keyPath(e.key))
			if s.evictions != nil {
				s.evictions.Inc()
			}
		}
		lk.Unlock()
	}
	if len(victims) > 0 {
		s.log.Debug("evicted", "entries", len(victims))
	}
}

func (s *Store) keyPath(key string) string {
	if key[0] == 'c' {
		return s.casPath(key[1:])
	}
	return s.acPath(key[1:])
}

// commit atomically moves a complete temp file to its final path and indexes it.
func (s *Store) commit(tmp *os.File, key, final string, size int64) error {
	if tmp.Name() == "" {
		return s.commitUnnamed(tmp, key, final, size)
	}
	if s.opts.Fsync {
		if err := tmp.Sync(); err != nil {
			return status.Errorf(codes.Internal, "sync %s: %v", tmp.Name(), err)
		}
	}
	if err := tmp.Close(); err != nil {
		return status.Errorf(codes.Internal, "close %s: %v", tmp.Name(), err)
	}
	if err := os.Chtimes(tmp.Name(), s.now(), cache.InputMtime); err != nil {
		return status.Errorf(codes.Internal, "set times of %s: %v", tmp.Name(), err)
	}
	lk := s.stripe(key)
	lk.Lock()
	err := os.Rename(tmp.Name(), final)
	lk.Unlock()
	if err != nil {
		return status.Errorf(codes.Internal, "commit %s: %v", final, err)
	}
	s.committed(key, final, size, nil)
	return nil
}

// commitUnnamed is commit for a temp file without a name (O_TMPFILE): its inode is
// linked at the final path, so a blob costs no directory entry in tmp/ and no rename.
// A blob already there was put there by a concurrent writer of the same bytes (a
// damaged one is removed by Verify before Put writes again): it is kept. An action-cache
// entry replaces the old one, through a named link and a rename.
func (s *Store) commitUnnamed(tmp *os.File, key, final string, size int64) error {
	defer tmp.Close()
	if s.opts.Fsync {
		if err := tmp.Sync(); err != nil {
			return status.Errorf(codes.Internal, "sync a temp file: %v", err)
		}
	}
	tv := []unix.Timeval{unix.NsecToTimeval(s.now().UnixNano()), unix.NsecToTimeval(cache.InputMtime.UnixNano())}
	if err := unix.Futimes(int(tmp.Fd()), tv); err != nil {
		return status.Errorf(codes.Internal, "set times of a temp file: %v", err)
	}
	lk := s.stripe(key)
	lk.Lock()
	var err error
	if key[0] == 'c' {
		if err = linkFile(tmp, final); errors.Is(err, fs.ErrExist) {
			lk.Unlock()
			return s.keepExisting(tmp, key, final, size)
		}
	} else {
		name := s.tempName()
		if err = linkFile(tmp, name); err == nil {
			if err = os.Rename(name, final); err != nil {
				os.Remove(name)
			}
		}
	}
	lk.Unlock()
	if err != nil {
		return status.Errorf(codes.Internal, "commit %s: %v", final, err)
	}
	s.committed(key, final, size, tmp)
	return nil
}

// keepExisting settles a blob whose name was taken when its temp file was to be linked
// there: by a concurrent writer of the same blob, or by another process writing to the
// store (Put does not stat a blob its index lacks; the link finds it). What is there is
// kept if it hashes to the blob (it is indexed then), or removed and replaced by tmp.
func (s *Store) keepExisting(tmp *os.File, key, final string, size int64) error {
	d := cache.Digest{Hash: key[1:], Size: size}
	if s.Verify(d) == nil {
		s.touch(key, final, size)
		return nil
	}
	// Verify removed a damaged file (or it was gone already): link ours. Verify leaves
	// a file of the wrong size (a blob's name is its size's too); it goes here.
	lk := s.stripe(key)
	lk.Lock()
	err := linkFile(tmp, final)
	var st unix.Stat_t
	if errors.Is(err, fs.ErrExist) && unix.Stat(final, &st) == nil && st.Size != size {
		os.Remove(final)
		err = linkFile(tmp, final)
	}
	lk.Unlock()
	if errors.Is(err, fs.ErrExist) && s.Verify(d) == nil {
		s.touch(key, final, size) // a concurrent writer's, verified
		return nil
	}
	if err != nil {
		return status.Errorf(codes.Internal, "commit %s: %v", final, err)
	}
	s.committed(key, final, size, tmp)
	return nil
}

// linkFile gives the open file f (an unnamed temp file, or any file of the store's
// filesystem) the name path.
func linkFile(f *os.File, path string) error {
	// AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; the /proc link works without.
	err := unix.Linkat(int(f.Fd()), "", unix.AT_FDCWD, path, unix.AT_EMPTY_PATH)
	if err == unix.ENOENT || err == unix.EPERM {
		err = unix.Linkat(unix.AT_FDCWD, fmt.Sprintf("/proc/self/fd/%d", f.Fd()), unix.AT_FDCWD, path, unix.AT_SYMLINK_FOLLOW)
	}
	if err != nil {
		return &os.LinkError{Op: "link", Old: f.Name(), New: path, Err: err}
	}
	return nil
}

// committed indexes an entry just moved or linked to its final path (and syncs its
// directory with Fsync); a blob is remembered as verified. f is the entry's file if it
// is still open (nil: not), so that remembering it takes an fstat, not a path lookup.
func (s *Store) committed(key, final string, size int64, f *os.File) {
	if s.opts.Fsync {
		syncDir(filepath.Dir(final))
	}
	s.touch(key, final, size)
	s.stampForeign()
	if key[0] == 'c' {
		s.remember(key[1:], final, f)
	}
}

// remember records that the file at path (open as f, or nil), just written from bytes
// that matched blob hash, is verified.
func (s *Store) remember(hash, path string, f *os.File) {
	var st unix.Stat_t
	var err error
	if f != nil {
		err = unix.Fstat(int(f.Fd()), &st)
	} else {
		err = unix.Stat(path, &st)
	}
	if err == nil {
		s.verified.add(hash, fileIDOf(&st), s.now())
	}
}

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}

// createTemp makes a temp file in the store's tmp dir (same filesystem as the blobs):
// an unnamed one (O_TMPFILE, empty Name; it vanishes if the process dies) where the
// filesystem has them, else a named one that a later Store sweeps if this one dies.
func (s *Store) createTemp(mode os.FileMode) (*os.File, error) {
	return s.createTempIn(filepath.Join(s.dir, "tmp"), mode)
}

// createTempIn is createTemp with the unnamed file made in dir, the directory it will
// be linked into: the filesystem allocates a new inode near its directory's, so blobs
// spread over the cas/ subdirectories spread their inode allocations too, instead of
// all searching tmp/'s block group, past every inode freed there lately (ext4 without
// a journal skips those, one inode table lookup each). A named temp file (the
// fallback) is still made in tmp/, where a crash's leftovers are swept.
func (s *Store) createTempIn(dir string, mode os.FileMode) (*os.File, error) {
	if s.opts.ReadOnly {
		return nil, status.Error(codes.FailedPrecondition, "the store is open read-only")
	}
	if !s.noTmpfile.Load() {
		fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_WRONLY|unix.O_CLOEXEC, uint32(mode.Perm()))
		if err == nil {
			return os.NewFile(uintptr(fd), ""), nil
		}
		if err != unix.EOPNOTSUPP && err != unix.EISDIR && err != unix.EINVAL {
			return nil, status.Errorf(codes.Internal, "create temp file: %v", err)
		}
		s.noTmpfile.Store(true)
	}
	return s.createNamedTemp(mode)
}

// tempName is a fresh name in the store's tmp dir, owned by this Store.
func (s *Store) tempName() string {
	var b [12]byte
	rand.Read(b[:])
	return filepath.Join(s.dir, "tmp", s.owner+"-"+hex.EncodeToString(b[:]))
}

// createNamedTemp makes a named temp file in the store's tmp dir.
func (s *Store) createNamedTemp(mode os.FileMode) (*os.File, error) {
	if s.opts.ReadOnly {
		return nil, status.Error(codes.FailedPrecondition, "the store is open read-only")
	}
	name := s.tempName()
	f, err := os.OpenFile(name, os.O_CREATE|os.O_EXCL|os.O_WRONLY, mode)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "create temp file: %v", err)
	}
	return f, nil
}

func discard(f *os.File) {
	f.Close()
	if f.Name() != "" {
		os.Remove(f.Name())
	}
}

// Get implements cache.BlobStore; the whole blob is verified against its digest as it
// is read, and a blob that fails is removed. A blob whose file was hashed within
// verifyTTL (written, adopted, verified or read whole by this Store) and has not changed
// since is read without hashing it again.
func (s *Store) Get(ctx context.Context, d cache.Digest, offset int64) (io.ReadCloser, error) {
	if offset < 0 || offset > d.Size {
		return nil, status.Errorf(codes.OutOfRange, "read offset %d outside blob %s", offset, d)
	}
	path := s.casPath(d.Hash)
	key := "c" + d.Hash
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			s.forget(key)
			return nil, status.Errorf(codes.NotFound, "blob %s not found", d)
		}
		return nil, status.Errorf(codes.Internal, "open blob %s: %v", d, err)
	}
	info, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, status.Errorf(codes.Internal, "stat blob %s: %v", d, err)
	}
	if info.Size() != d.Size {
		// A blob is stored under its hash alone: a size mismatch means either the client
		// named the wrong size, or the file is damaged. Only the second is our problem.
		f.Close()
		if s.verifyFile(path, d.Hash, info) {
			return nil, status.Errorf(codes.NotFound, "blob %s not found (a blob with that hash has size %d)", d, info.Size())
		}
		return nil, status.Errorf(codes.NotFound, "blob %s not found", d)
	}
	s.touch(key, path, d.Size)
	if st, ok := info.Sys().(*syscall.Stat_t); ok && s.verified.ok(d.Hash, fileIDOfSys(st), s.now()) {
		// Hashed recently, unchanged since: read it as it is.
		if offset > 0 {
			if _, err := f.Seek(offset, io.SeekStart); err != nil {
				f.Close()
				return nil, status.Errorf(codes.Internal, "read blob %s: %v", d, err)
			}
		}
		return f, nil
	}
	h := sha256.New()
	if offset > 0 {
		if _, err := io.CopyN(h, f, offset); err != nil {
			f.Close()
			return nil, status.Errorf(codes.Internal, "read blob %s: %v", d, err)
		}
	}
	vr := cache.NewVerifyingReader(f, d, h, offset, func() { s.removeCorrupt(path, key, info) })
	var id fileID
	if st, ok := info.Sys().(*syscall.Stat_t); ok {
		id = fileIDOfSys(st)
	}
	return &memoizingReader{VerifyingReader: vr, done: func() { s.verified.add(d.Hash, id, s.now()) }}, nil
}

// memoizingReader records in the memo that the blob it reads matched its digest, once
// the verifying reader under it has reached the end without an error.
type memoizingReader struct {
	*cache.VerifyingReader
	done func()
}

func (m *memoizingReader) Read(p []byte) (int, error) {
	n, err := m.VerifyingReader.Read(p)
	if err == io.EOF && m.done != nil {
		m.done()
		m.done = nil
	}
	return n, err
}

// verifyFile hashes the file at path and removes it if it does not match hash; it
// reports whether the file is sound.
func (s *Store) verifyFile(path, hash string, info fs.FileInfo) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	h := sha256.New()
	_, err = io.Copy(h, f)
	f.Close()
	if err == nil && hex.EncodeToString(h.Sum(nil)) == hash {
		return true
	}
	s.removeCorrupt(path, "c"+hash, info)
	return false
}

// removeCorrupt deletes a blob that failed verification, unless a sound copy replaced it
// meanwhile (the path no longer names the file that was read).
func (s *Store) removeCorrupt(path, key string, read fs.FileInfo) {
	if s.opts.ReadOnly {
		s.log.Warn("corrupt blob in a read-only store", "path", path)
		return
	}
	lk := s.stripe(key)
	lk.Lock()
	defer lk.Unlock()
	s.verified.drop(key[1:])
	if cur, err := os.Stat(path); err == nil && os.SameFile(cur, read) {
		os.Remove(path)
		s.forget(key)
		if s.corrupt != nil {
			s.corrupt.Inc()
		}
		s.log.Warn("removed corrupt blob", "path", path)
	}
}

// Put implements cache.BlobStore. The data is verified even when the blob is already
// present; then it is not written again, unless the stored copy turns out damaged.
func (s *Store) Put(ctx context.Context, d cache.Digest, r io.Reader) error {
	key := "c" + d.Hash
	path := s.casPath(d.Hash)
	// A primary store looks for the blob on disk only if its index has it: a stat of a
	// name that is not there is a directory search, and the link at the end finds a
	// blob someone else wrote meanwhile (keepExisting).
	if (s.primary == nil || s.indexed(key, d.Size)) && s.Has(d) && s.Verify(d) == nil {
		return cache.CopyVerified(io.Discard, r, d)
	}
	if err := s.reserve(d, true); err != nil {
		return err
	}
	defer s.unreserve(d.Size, true)
	var verified []byte
	if d.Size <= smallBlob {
		// Verified before a file is made for it: a client that sends bad or unfinished
		// small blobs costs no file creation.
		bp := smallPool.Get().(*[]byte)
		defer smallPool.Put(bp)
		buf := bytes.NewBuffer((*bp)[:0])
		if err := cache.CopyVerified(buf, r, d); err != nil {
			return err
		}
		verified = buf.Bytes()
	}
	tmp, err := s.createTempIn(filepath.Dir(path), 0o444)
	if err != nil {
		return err
	}
	tw := &tempWriter{s: s, f: tmp}
	defer tw.forget()
	if verified != nil {
		// Hashed already: written without a second hash.
		if _, err = tw.Write(verified); err != nil {
			err = status.Errorf(codes.Internal, "copy blob %s: %v", d, err)
		}
	} else {
		err = cache.CopyVerified(tw, r, d)
	}
	if err != nil {
		discard(tmp)
		return err
	}
	if ctx.Err() != nil {
		discard(tmp)
		return status.FromContextError(ctx.Err()).Err()
	}
	tw.forget() // from here on the bytes count as the entry's
	if err := s.commit(tmp, key, path, d.Size); err != nil {
		discard(tmp)
		return err
	}
	return nil
}

// smallBlob is the size up to which Put verifies a blob in memory before it creates
// its temp file.
const smallBlob = 64 << 10

var smallPool = sync.Pool{New: func() any { b := make([]byte, 0, smallBlob+1); return &b }}

// reserve claims room for a blob of d.Size bytes about to be written, or refuses it
// (RESOURCE_EXHAUSTED) before a byte is written: a blob larger than the store's bound
// would be evicted as soon as it was stored, and the blobs being written at once
// cannot together claim more than the bound, nor more than the free disk space. A
// blob staged for a tier above (bounded false) claims free disk space only: the bound
// is the local tier's, which keeps it only if it fits.
func (s *Store) reserve(d cache.Digest, bounded bool) error {
	free, ferr := s.free(d.Size)
	s.mu.Lock()
	defer s.mu.Unlock()
	if max := s.opts.MaxSize; bounded && max > 0 && s.primary != nil {
		if d.Size > max {
			return status.Errorf(codes.ResourceExhausted, "blob %s is larger than the store's bound of %d bytes (--max-size): it could not be kept", d, max)
		}
		if s.reserved+d.Size > max {
			return status.Errorf(codes.ResourceExhausted, "blob %s: blobs being written already claim %d of the store's %d bytes (--max-size); retry later", d, s.reserved, max)
		}
	}
	if claimed := s.claimedLocked(); ferr == nil && claimed+d.Size > free {
		return status.Errorf(codes.ResourceExhausted, "blob %s: not enough free disk space for the store (%d bytes free, %d more claimed by blobs being written)", d, free, claimed)
	}
	if bounded {
		s.reserved += d.Size
	} else {
		s.staging += d.Size
	}
	return nil
}

// claimedLocked is the disk space claimed by blobs being written or staged and not yet
// written (their temp files hold the rest). Callers hold s.mu.
func (s *Store) claimedLocked() int64 { return max(s.reserved+s.staging-s.temp.Load(), 0) }

// freeTTL and freeMargin bound how a reading of the free disk space is reused: for at
// most freeTTL, and only while it leaves more than freeMargin beyond what is claimed
// and asked (the store cannot write freeMargin in freeTTL). A statfs per blob was 2% of
// the server's CPU storing 4 KiB blobs; near a full disk every reservation reads afresh.
const (
	freeTTL    = 200 * time.Millisecond
	freeMargin = 1 << 30
)

// free returns the free disk space to check a reservation of need bytes against.
func (s *Store) free(need int64) (int64, error) {
	now := time.Now()
	s.mu.Lock()
	last, at, claimed := s.lastFree, s.lastAt, s.claimedLocked()
	s.mu.Unlock()
	if !at.IsZero() && now.Sub(at) < freeTTL && last-claimed-need > freeMargin {
		return last, nil
	}
	free, err := s.freeSpace()
	if err == nil {
		s.mu.Lock()
		s.lastFree, s.lastAt = free, now
		s.mu.Unlock()
	}
	return free, err
}

func (s *Store) unreserve(n int64, bounded bool) {
	s.mu.Lock()
	if bounded {
		s.reserved -= n
	} else {
		s.staging -= n
	}
	s.mu.Unlock()
}

// tempWriter writes a blob's temp file and counts its bytes as the store's, evicting
// older entries as it grows past the bound, so data in flight is never outside it.
type tempWriter struct {
	s *Store
	f *os.File
	n int64
}

// writePiece is the most one write(2) is given. A larger write makes the kernel back
// the file with larger page-cache folios, and on this kind of VM those cost several
// times more to fill: writing 1 MiB blobs measured 3.5-3.9 ms of CPU per MiB in 1 MiB
// writes, 0.5-0.7 ms in 128 KiB ones (a ByteStream upload hands over 1 MiB messages).
const writePiece = 128 << 10

// evictEvery is how many bytes a temp file grows between checks of the bound.
const evictEvery = 4 << 20

func (w *tempWriter) Write(p []byte) (int, error) {
	var n int
	var err error
	for n < len(p) && err == nil {
		var k int
		k, err = w.f.Write(p[n:min(len(p), n+writePiece)])
		n += k
	}
	before := w.n
	w.n += int64(n)
	t := w.s.temp.Add(int64(n))
	if w.s.tempGauge != nil {
		w.s.tempGauge.Set(float64(t))
	}
	if max := w.s.opts.MaxSize; max > 0 && w.s.primary != nil && (before/evictEvery != w.n/evictEvery || before == 0) {
		w.s.mu.Lock()
		over := w.s.total+t > max
		w.s.mu.Unlock()
		if over {
			w.s.evict("")
		}
	}
	return n, err
}

// forget stops counting the temp file's bytes (it was committed or removed); it may
// be called more than once.
func (w *tempWriter) forget() {
	t := w.s.temp.Add(-w.n)
	w.n = 0
	if w.s.tempGauge != nil {
		w.s.tempGauge.Set(float64(t))
	}
}

// Has reports whether blob d is stored (without verifying its content). The file is
// the truth: the index only orders eviction, so a blob removed by another process is
// never reported present.
func (s *Store) Has(d cache.Digest) bool {
	path := s.casPath(d.Hash)
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil || st.Size != d.Size {
		if err != nil {
			s.forget("c" + d.Hash)
		}
		return false
	}
	s.touch("c"+d.Hash, path, d.Size)
	return true
}

// FindMissing implements cache.BlobStore; found blobs count as used, so they are the
// last to be evicted (clients call FindMissing before relying on blobs). The primary
// answers from its index, and stats what the index lacks only when another process
// has written to the store since it last looked (foreign.stamp); a stat costs far
// more than a map lookup.
func (s *Store) FindMissing(ctx context.Context, ds []cache.Digest) ([]cache.Digest, error) {
	var missing []cache.Digest
	if s.primary == nil {
		for _, d := range ds {
			if !s.Has(d) {
				missing = append(missing, d)
			}
		}
		return missing, ctx.Err()
	}
	var unknown []cache.Digest
	key := make([]byte, 0, 1+64)
	s.mu.Lock()
	for _, d := range ds {
		key = append(append(key[:0], 'c'), d.Hash...)
		if e, ok := s.index[string(key)]; ok && e.size == d.Size { // no allocation for the key
			s.lru.MoveToFront(e.elem)
			continue
		}
		unknown = append(unknown, d)
	}
	s.mu.Unlock()
	if len(unknown) == 0 {
		return nil, ctx.Err()
	}
	if !s.foreignWrites() {
		return unknown, ctx.Err()
	}
	for _, d := range unknown {
		if !s.Has(d) {
			missing = append(missing, d)
		}
	}
	return missing, ctx.Err()
}

func (s *Store) stampPath() string { return filepath.Join(s.dir, "foreign.stamp") }

func (s *Store) stampTime() time.Time {
	var st unix.Stat_t
	if err := unix.Stat(s.stampPath(), &st); err != nil {
		return time.Time{}
	}
	return time.Unix(st.Mtim.Unix())
}

// stampForeign tells the primary that a non-primary process wrote to the store.
func (s *Store) stampForeign() {
	if s.primary != nil {
		return
	}
	now := time.Now() // not s.now: the stamp is compared across processes, by its change
	if err := os.Chtimes(s.stampPath(), now, now); err != nil {
		if f, err := os.OpenFile(s.stampPath(), os.O_CREATE|os.O_WRONLY, 0o644); err == nil {
			f.Close()
		}
	}
}

// foreignWrites reports whether another process wrote since the last call said no.
// The mark moves before the caller stats, so writes during the stats are seen next time.
func (s *Store) foreignWrites() bool {
	t := s.stampTime()
	s.stampMu.Lock()
	defer s.stampMu.Unlock()
	if t.Equal(s.stampSeen) {
		return false
	}
	s.stampSeen = t
	return true
}

// AdoptFile makes the open file f blob d by linking its inode into the CAS, without
// copying its bytes. The caller has hashed f, made it root-owned and read-only, and
// guarantees nothing can write it any more (the action that made it is dead); f must
// be on the store's filesystem. A blob already present is kept.
func (s *Store) AdoptFile(_ context.Context, d cache.Digest, f *os.File) error {
	if s.opts.ReadOnly {
		return status.Error(codes.FailedPrecondition, "the store is open read-only")
	}
	if s.Has(d) {
		return nil
	}
	if s.opts.Fsync {
		if err := f.Sync(); err != nil {
			return status.Errorf(codes.Internal, "sync %s: %v", f.Name(), err)
		}
	}
	tv := []unix.Timeval{unix.NsecToTimeval(s.now().UnixNano()), unix.NsecToTimeval(cache.InputMtime.UnixNano())}
	if err := unix.Futimes(int(f.Fd()), tv); err != nil {
		return status.Errorf(codes.Internal, "adopt %s: %v", f.Name(), err)
	}
	// Link the inode itself at its final name: a blob that appeared meanwhile is the
	// same bytes, and stays.
	key := "c" + d.Hash
	final := s.casPath(d.Hash)
	lk := s.stripe(key)
	lk.Lock()
	err := linkFile(f, final)
	lk.Unlock()
	if errors.Is(err, fs.ErrExist) {
		return nil
	}
	if err != nil {
		return status.Errorf(codes.Internal, "adopt %s: %v", f.Name(), err)
	}
	s.committed(key, final, d.Size, f)
	return nil
}

// Verify hashes blob d's file unless it was verified recently and has not changed
// since (see verifyTTL), and removes it if it does not match (NOT_FOUND then). Callers that use the file without
// reading it through Get (hardlinked inputs) call it first, so a damaged blob never
// reaches an action.
func (s *Store) Verify(d cache.Digest) error {
	path := s.casPath(d.Hash)
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil || st.Size != d.Size {
		if err != nil {
			s.forget("c" + d.Hash)
		}
		return status.Errorf(codes.NotFound, "blob %s not found", d)
	}
	id := fileIDOf(&st)
	if s.verified.ok(d.Hash, id, s.now()) {
		return nil
	}
	info, err := os.Stat(path)
	if err != nil || !s.verifyFile(path, d.Hash, info) {
		return status.Errorf(codes.NotFound, "blob %s not found (the stored copy was damaged and has been removed)", d)
	}
	s.verified.add(d.Hash, id, s.now())
	return nil
}

// BlobFile implements cache.LocalFiles: the verified file of blob d (see Verify).
func (s *Store) BlobFile(_ context.Context, d cache.Digest) (string, error) {
	if err := s.Verify(d); err != nil {
		return "", err
	}
	return s.casPath(d.Hash), nil
}

var (
	_ cache.LocalFiles = (*Store)(nil)
	_ cache.Store      = (*Store)(nil)
)

// spread asks the filesystem to place dir's subdirectories apart (package dirplace);
// where it cannot, nothing else changes.
func (s *Store) spread(dir string) {
	if err := dirplace.Spread(dir); err != nil {
		s.log.Debug("store: no placement hint", "dir", dir, "err", err)
	}
}

// Stats summarises the store for logs and CLI output.
func (s *Store) Stats() (entries int, bytes int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.index), s.total
}

// String describes the store and what it holds.
func (s *Store) String() string {
	entries, bytes := s.Stats()
	return fmt.Sprintf("disk store %s (%d entries, %d bytes)", strings.TrimSuffix(s.dir, "/"), entries, bytes)
}
