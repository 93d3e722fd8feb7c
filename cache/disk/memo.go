package disk

import (
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// verifyTTL is how long a blob's file, once hashed, is trusted without hashing it again
// as long as it has not changed (same inode, ctime and size): reads (Get) and hardlinks
// (Verify) within it skip the hash. Damage that does not change the file's metadata (a
// failing disk) is caught on the first read after it.
const verifyTTL = 10 * time.Minute

// memoSize bounds the memo: it remembers at least this many of the most recent
// verifications, and at most twice as many.
const memoSize = 1 << 16

// fileID names one version of a file: a rewrite, rename or chmod changes it.
type fileID struct {
	ino   uint64
	ctime int64
	size  int64
}

func fileIDOf(st *unix.Stat_t) fileID {
	return fileID{st.Ino, st.Ctim.Nano(), st.Size}
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
