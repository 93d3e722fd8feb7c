package attest

import (
	"container/list"
	"sync"

	"github.com/in-toto/in-toto-golang/in_toto"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest/keys"
)

// VerifyCache remembers what signed documents establish on their own: for a link
// envelope, the trusted key whose signature verified and the decoded link; for a
// provenance or a summary, its verified, decoded form. An entry is keyed by the
// content digest of the document's bytes and the fingerprint of the whole trust set it
// was verified with (keys.Trust.Fingerprint), so other bytes or another trust set
// (a key added, removed, retired) never find it. What depends on anything else is not
// kept and is established at every use: inclusion in the log under its latest
// checkpoint, a key's retirement bound against that index, quarantine. Only successes
// are kept. Bounded by an estimate of the memory its entries hold, least recently used
// first out. Safe for concurrent use; nil is a cache that keeps nothing.
type VerifyCache struct {
	max int64

	mu    sync.Mutex
	size  int64
	ll    *list.List // front: most recently used
	items map[cacheKey]*list.Element
	stats CacheStats
}

// CacheStats counts a VerifyCache's lookups.
type CacheStats struct {
	Hits, Misses, Evictions int64
	Entries                 int
	Bytes                   int64
}

type cacheKey struct {
	trust  [32]byte
	kind   string
	digest cache.Digest
}

type cacheEntry struct {
	key   cacheKey
	value any
	cost  int64
}

// NewVerifyCache returns a cache holding about maxBytes of verified documents; nil if
// maxBytes <= 0 (caching off).
func NewVerifyCache(maxBytes int64) *VerifyCache {
	if maxBytes <= 0 {
		return nil
	}
	return &VerifyCache{max: maxBytes, ll: list.New(), items: map[cacheKey]*list.Element{}}
}

// Stats returns the cache's counters.
func (c *VerifyCache) Stats() CacheStats {
	if c == nil {
		return CacheStats{}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.stats
	s.Entries, s.Bytes = c.ll.Len(), c.size
	return s
}

// Get returns what verifying the document of this kind and digest under trust
// established, if it is kept.
func (c *VerifyCache) Get(trust [32]byte, kind string, d cache.Digest) (any, bool) {
	if c == nil {
		return nil, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.items[cacheKey{trust, kind, d}]
	if !ok {
		c.stats.Misses++
		return nil, false
	}
	c.stats.Hits++
	c.ll.MoveToFront(e)
	return e.Value.(*cacheEntry).value, true
}

// Put keeps v, what verifying the document of this kind whose bytes have digest d
// under trust established, at an estimated cost in bytes. v must not be changed after.
func (c *VerifyCache) Put(trust [32]byte, kind string, d cache.Digest, v any, cost int64) {
	if c == nil || cost > c.max {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	k := cacheKey{trust, kind, d}
	if e, ok := c.items[k]; ok {
		c.ll.MoveToFront(e)
		return
	}
	c.items[k] = c.ll.PushFront(&cacheEntry{key: k, value: v, cost: cost})
	c.size += cost
	for c.size > c.max {
		old := c.ll.Back()
		e := old.Value.(*cacheEntry)
		c.ll.Remove(old)
		delete(c.items, e.key)
		c.size -= e.cost
		c.stats.Evictions++
	}
}

// signedLink is what a link envelope's bytes establish with a trust set alone: its
// digest, the action it claims, the trusted key whose signature verified, and the
// decoded link. Nothing in it depends on the log, so a VerifyCache may keep it.
type signedLink struct {
	env    cache.Digest
	claims string
	key    keys.PublicKey
	link   in_toto.Link
	raw    []byte
}

// linkCost estimates the memory a cached link holds: its envelope and the decoded link
// (measured: a 1.6 KiB envelope and its entry take about 4.6 KiB of heap in all).
func linkCost(raw []byte) int64 { return int64(5*len(raw)/2) + 512 }
