package disk

import (
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// verifyTTL is how long a blob's file, once hashed, is trusted without hashing it again
// as long as it has not changed (same inode, mtime and size): reads (Get) and hardlinks
// (Verify) within it skip the hash. Damage that does not change the file's metadata (a
// failing disk) is caught on the first read after it.
//
// Not the ctime: linking a blob into an exec root, and removing that link afterwards,
// changes the inode's ctime, so every input an action had linked was hashed again by
// the next action that used it (a 10,000-file input tree: 40 us per file, mostly that).
// Every blob's mtime is the fixed cache.InputMtime; any write to it moves the mtime to
// the time of the write. What the mtime misses and the ctime would not: a process with
// the store's owner's rights (root) that rewrites a blob and sets its mtime back, within
// verifyTTL; it is caught at the first verification after that.
const verifyTTL = 10 * time.Minute

// memoSize bounds the memo: it remembers at least this many of the most recent
// verifications, and at most twice as many.
const memoSize = 1 << 16

// fileID names one version of a file: a rewrite, truncation or rename changes it; a
// link, an unlink or a chmod does not (see verifyTTL).
type fileID struct {
	ino   uint64
	mtime int64
	size  int64
}

func fileIDOf(st *unix.Stat_t) fileID {
	return fileID{st.Ino, st.Mtim.Nano(), st.Size}
}

// fileIDOfSys is fileIDOf for os.FileInfo's Sys().
func fileIDOfSys(st *syscall.Stat_t) fileID {
	return fileID{st.Ino, st.Mtim.Nano(), st.Size}
}

type verification struct {
	id fileID
	at time.Time
}

// memo remembers which blob files were hashed recently and matched, in two
// generations: when the current one is full it becomes the old one, so memory stays
// bounded without an eviction list.
type memo struct {
	mu       sync.Mutex
	cur, old map[string]verification
}

func newMemo() *memo {
	return &memo{cur: map[string]verification{}, old: map[string]verification{}}
}

// ok reports whether the file id of blob hash was verified within verifyTTL of now.
func (m *memo) ok(hash string, id fileID, now time.Time) bool {
	m.mu.Lock()
	v, found := m.cur[hash]
	if !found {
		v, found = m.old[hash]
	}
	m.mu.Unlock()
	return found && v.id == id && now.Sub(v.at) < verifyTTL && !now.Before(v.at)
}

// add records that the file id of blob hash matched its digest at now.
func (m *memo) add(hash string, id fileID, now time.Time) {
	m.mu.Lock()
	if len(m.cur) >= memoSize {
		m.old, m.cur = m.cur, make(map[string]verification, memoSize)
	}
	m.cur[hash] = verification{id, now}
	m.mu.Unlock()
}

// drop forgets blob hash (its file was removed or found damaged).
func (m *memo) drop(hash string) {
	m.mu.Lock()
	delete(m.cur, hash)
	delete(m.old, hash)
	m.mu.Unlock()
}
