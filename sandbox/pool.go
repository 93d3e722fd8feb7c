package sandbox

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"log/slog"
	"sync"
)

// A pool keeps sandboxes prepared ahead of their command. Preparing (namespaces,
// cgroups, mounts, seccomp, the exec of kiln-init) is most of a sandbox's cost;
// done in the background between commands, it leaves only the bind mounts and the
// tear-down on a command's path. Each
// prepared sandbox still runs exactly one command and is destroyed after it.
//
// Sandboxes are keyed by everything fixed at preparation (root, mount points, host
// name, ids, CPU set, limits): a Run takes one with its key or prepares its own. The
// pool holds at most size idle sandboxes per key and keys for the maxKeys most
// recently used layouts.
type pool struct {
	size int

	mu       sync.Mutex
	idle     map[string][]*sandbox
	inflight map[string]int
	waiters  map[string][]chan *sandbox // Runs waiting for an in-flight preparation
	recent   []string                   // keys, most recent last
	closed   bool
	wg       sync.WaitGroup
}

const maxKeys = 8

func newPool(size int) *pool {
	return &pool{size: size, idle: map[string][]*sandbox{}, inflight: map[string]int{}, waiters: map[string][]chan *sandbox{}}
}

// poolKey names what prepare fixes for s.
func poolKey(s *Spec) string {
	b, _ := json.Marshal(struct {
		RootFS   string
		Mps      []mountPoint
		Hostname string
		UID, GID int
		CPUs     string
		Limits   Limits
	}{s.RootFS, sortedMountPoints(s), s.Hostname, s.UID, s.GID, s.CPUs, s.Limits})
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:16])
}

// take returns a prepared sandbox for key: an idle one, or one being prepared
// that no other Run waits for (it is further along than a new one would be); nil
// when there is neither, or ctx ends first.
func (p *pool) take(ctx context.Context, key string) *sandbox {
	if p.size <= 0 {
		return nil
	}
	p.mu.Lock()
	p.touch(key)
	if l := p.idle[key]; len(l) > 0 {
		sb := l[len(l)-1]
		p.idle[key] = l[:len(l)-1]
		p.mu.Unlock()
		return sb
	}
	if p.inflight[key] <= len(p.waiters[key]) {
		p.mu.Unlock()
		return nil
	}
	ch := make(chan *sandbox, 1)
	p.waiters[key] = append(p.waiters[key], ch)
	p.mu.Unlock()
	select {
	case sb := <-ch:
		return sb
	case <-ctx.Done():
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for i, w := range p.waiters[key] {
		if w == ch {
			p.waiters[key] = append(p.waiters[key][:i], p.waiters[key][i+1:]...)
			return nil
		}
	}
	// Handed over meanwhile: keep it for the next Run.
	if sb := <-ch; sb != nil {
		p.idle[key] = append(p.idle[key], sb)
	}
	return nil
}

// touch marks key recently used; drops (and destroys the idle sandboxes of) the
// least recently used keys beyond maxKeys. Called with mu held.
func (p *pool) touch(key string) {
	for i, k := range p.recent {
		if k == key {
			p.recent = append(p.recent[:i], p.recent[i+1:]...)
			break
		}
	}
	p.recent = append(p.recent, key)
	for len(p.recent) > maxKeys {
		old := p.recent[0]
		p.recent = p.recent[1:]
		for _, sb := range p.idle[old] {
			p.wg.Add(1)
			go func() {
				defer p.wg.Done()
				sb.destroy(nopLogger)
			}()
		}
		delete(p.idle, old)
	}
}

// refill prepares sandboxes for key in the background until size are idle or
// being prepared.
func (p *pool) refill(r *localRunner, s *Spec, key string) {
	if p.size <= 0 {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	spec := *s
	for len(p.idle[key])+p.inflight[key] < p.size {
		p.inflight[key]++
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			sb, err := r.prepare(&spec, key, false)
			p.mu.Lock()
			p.inflight[key]--
			keep := err == nil && !p.closed && p.isRecent(key)
			if w := p.waiters[key]; len(w) > 0 {
				// A Run waits: hand it over (nil on failure: it prepares its own).
				p.waiters[key] = w[1:]
				if !keep {
					w[0] <- nil
				} else {
					w[0] <- sb
				}
			} else if keep {
				p.idle[key] = append(p.idle[key], sb)
			}
			p.mu.Unlock()
			if err != nil {
				r.log.Warn("sandbox: preparing a sandbox in the background", "err", err)
			} else if !keep {
				sb.destroy(r.log)
			}
		}()
	}
}

func (p *pool) isRecent(key string) bool {
	for _, k := range p.recent {
		if k == key {
			return true
		}
	}
	return false
}

// close stops refills, waits for those in flight and destroys the idle sandboxes.
func (p *pool) close(r *localRunner) {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.wg.Wait()
	p.mu.Lock()
	idle := p.idle
	p.idle = map[string][]*sandbox{}
	p.mu.Unlock()
	for _, l := range idle {
		for _, sb := range l {
			sb.destroy(r.log)
		}
	}
}

// nopLogger discards; for destroys whose failures nobody can act on.
var nopLogger = slog.New(slog.DiscardHandler)
