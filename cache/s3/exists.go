package s3

import (
	"hash/maphash"
	"sync"
	"time"
)

// existsCache remembers objects kiln has seen in the bucket (written, read or found by
// a HEAD): their size, when the bucket last wrote them (their age for a lifecycle
// rule) and when kiln last looked. Only presence is cached: a blob another process
// uploads must never be reported missing for long, and a missing answer is always safe
// (the client uploads again).
type existsCache struct {
	seed   maphash.Seed
	shards [64]existsShard
	max    int // entries per shard
}

type existsShard struct {
	mu sync.Mutex
	m  map[string]existsEntry
}

type existsEntry struct {
	size     int64
	modified int64 // unix nanoseconds: the object's last write (or refresh)
	checked  int64 // unix nanoseconds: when kiln last confirmed it
}

func newExistsCache(max int) *existsCache {
	if max <= 0 {
		max = 4 << 20
	}
	c := &existsCache{seed: maphash.MakeSeed(), max: max/64 + 1}
	for i := range c.shards {
		c.shards[i].m = map[string]existsEntry{}
	}
	return c
}

func (c *existsCache) shard(key string) *existsShard {
	return &c.shards[maphash.String(c.seed, key)%uint64(len(c.shards))]
}

func (c *existsCache) get(key string) (existsEntry, bool) {
	s := c.shard(key)
	s.mu.Lock()
	e, ok := s.m[key]
	s.mu.Unlock()
	return e, ok
}

func (c *existsCache) put(key string, size int64, modified, checked time.Time) {
	s := c.shard(key)
	s.mu.Lock()
	if len(s.m) >= c.max {
		// Full: forget an arbitrary half (map order is random); forgotten blobs cost a
		// HEAD next time, never a wrong answer.
		n := 0
		for k := range s.m {
			delete(s.m, k)
			if n++; n >= c.max/2 {
				break
			}
		}
	}
	s.m[key] = existsEntry{size: size, modified: modified.UnixNano(), checked: checked.UnixNano()}
	s.mu.Unlock()
}

func (c *existsCache) drop(key string) {
	s := c.shard(key)
	s.mu.Lock()
	delete(s.m, key)
	s.mu.Unlock()
}
