// Package limits bounds what the clients of kiln serve can make it hold: a memory
// budget for the whole server with a share per client, and per-client counts of things
// in progress (uploads, GetTree walks, queued executions). A request beyond a limit is
// refused with RESOURCE_EXHAUSTED at once, never queued, so one client at its limit
// never blocks another; idle state that can be dropped (abandoned uploads) is freed
// first through a Reclaimer.
package limits

import (
	"context"
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kilnbuild/kiln/internal/clock"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Reclaimer frees idle state that holds memory or slots: client's, or anyone's when
// client is "". It reports whether it freed anything.
type Reclaimer func(client string) bool

// Budget is a server-wide memory budget in bytes with a cap per client. Callers charge
// what they are about to hold (buffers, decompression windows, tree walks) and release
// it when done; a charge beyond either bound is refused. A nil *Budget allows anything.
type Budget struct {
	total, perClient int64
	kind             kind

	mu      sync.Mutex
	used    int64
	clients map[string]int64
	reclaim []Reclaimer

	usedGauge prometheus.Gauge
	refused   *prometheus.CounterVec
}

// kind says what a Budget bounds, for its refusals and metrics.
type kind struct {
	name             string // refusal metric label: name and "client_"+name
	of               string // "the server's memory budget"
	flag, clientFlag string
}

var (
	memoryKind = kind{"memory", "the server's memory budget", "--max-memory", "--client-max-memory"}
	spaceKind  = kind{"store_space", "the store's room for uploads", "--max-size", "half of --max-size"}
)

// NewBudget returns a memory budget of total bytes of which one client may hold
// perClient (0: total).
func NewBudget(total, perClient int64) *Budget {
	if perClient <= 0 || perClient > total {
		perClient = total
	}
	return &Budget{total: total, perClient: perClient, kind: memoryKind, clients: map[string]int64{},
		usedGauge: prometheus.NewGauge(prometheus.GaugeOpts{Name: "kiln_memory_charged_bytes", Help: "Memory charged against --max-memory by requests in progress."}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kiln_limit_refusals_total",
			Help: "Requests refused with RESOURCE_EXHAUSTED by a server limit (memory, client_memory, uploads, client_uploads, ...)."}, []string{"limit"}),
	}
}

// StoreSpace returns a budget for the declared sizes of uploads in progress: a store
// bounded to total bytes (--max-size) can take uploads that together declare no more
// than that, and those of one client no more than half of it, so that a client cannot
// claim the whole store with uploads it never finishes. It counts its refusals in b's
// metric. With total 0 (an unbounded store) it is nil and bounds nothing.
func (b *Budget) StoreSpace(total int64) *Budget {
	if total <= 0 {
		return nil
	}
	s := &Budget{total: total, perClient: total / 2, kind: spaceKind, clients: map[string]int64{},
		usedGauge: prometheus.NewGauge(prometheus.GaugeOpts{Name: "kiln_store_space_charged_bytes"})}
	if b != nil {
		s.refused = b.refused
	}
	return s
}

// Register exports the budget's metrics (and those of slots sharing its refusal counter).
func (b *Budget) Register(reg prometheus.Registerer) {
	if b == nil || reg == nil {
		return
	}
	limit := prometheus.NewGauge(prometheus.GaugeOpts{Name: "kiln_memory_budget_bytes", Help: "The server's memory budget (--max-memory)."})
	limit.Set(float64(b.total))
	reg.MustRegister(b.usedGauge, b.refused, limit)
}

// OnShortage adds a reclaimer that a charge which does not fit calls before it gives up.
func (b *Budget) OnShortage(r Reclaimer) {
	if b == nil {
		return
	}
	b.mu.Lock()
	b.reclaim = append(b.reclaim, r)
	b.mu.Unlock()
}

// Total is the budget in bytes.
func (b *Budget) Total() int64 {
	if b == nil {
		return 0
	}
	return b.total
}

// PerClient is the most one client may hold.
func (b *Budget) PerClient() int64 {
	if b == nil {
		return 0
	}
	return b.perClient
}

// Used is what is charged now, in all or (client != "") by one client.
func (b *Budget) Used(client string) int64 {
	if b == nil {
		return 0
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if client != "" {
		return b.clients[client]
	}
	return b.used
}

// Charge is memory held for one purpose; it grows and shrinks with what it holds.
type Charge struct {
	b      *Budget
	client string
	what   string
	n      int64
}

// Charge charges n bytes to client for what (a short description for the error).
func (b *Budget) Charge(client, what string, n int64) (*Charge, error) {
	c := &Charge{b: b, client: client, what: what}
	if err := c.Grow(n); err != nil {
		return nil, err
	}
	return c, nil
}

// Grow adds n bytes to the charge, or refuses them (RESOURCE_EXHAUSTED) and leaves it
// as it was. Idle state is reclaimed first when the bytes do not fit.
func (c *Charge) Grow(n int64) error {
	if c == nil || c.b == nil || n <= 0 {
		return nil
	}
	b := c.b
	if n > b.perClient {
		// Nothing reclaimed could make room: refuse at once.
		b.count("client_" + b.kind.name)
		return status.Errorf(codes.ResourceExhausted, "%s needs %s, more than one client may hold (%s: %s)", c.what, Bytes(n), b.kind.clientFlag, Bytes(b.perClient))
	}
	for attempt := 0; ; attempt++ {
		b.mu.Lock()
		clientOver := b.clients[c.client]+n > b.perClient
		over := b.used+n > b.total
		if !clientOver && !over {
			b.used += n
			b.clients[c.client] += n
			c.n += n
			b.usedGauge.Set(float64(b.used))
			b.mu.Unlock()
			return nil
		}
		reclaim := b.reclaim
		clientUsed, used := b.clients[c.client], b.used
		b.mu.Unlock()
		who := c.client
		if over && !clientOver {
			who = ""
		}
		if attempt < 64 && reclaimAny(reclaim, who) {
			continue
		}
		k := b.kind
		if clientOver {
			b.count("client_" + k.name)
			return status.Errorf(codes.ResourceExhausted, "%s needs %s, but client %s already holds %s of its %s share of %s (%s); retry when its other requests have finished",
				c.what, Bytes(n), c.client, Bytes(clientUsed), Bytes(b.perClient), k.of, k.clientFlag)
		}
		b.count(k.name)
		return status.Errorf(codes.ResourceExhausted, "%s needs %s, but requests in progress hold %s of %s of %s (%s); retry later",
			c.what, Bytes(n), Bytes(used), k.of, Bytes(b.total), k.flag)
	}
}

func (b *Budget) count(limit string) {
	if b.refused != nil {
		b.refused.WithLabelValues(limit).Inc()
	}
}

// Shrink gives back n bytes of the charge.
func (c *Charge) Shrink(n int64) {
	if c == nil || c.b == nil || n <= 0 {
		return
	}
	b := c.b
	b.mu.Lock()
	n = min(n, c.n)
	c.n -= n
	b.used -= n
	if left := b.clients[c.client] - n; left > 0 {
		b.clients[c.client] = left
	} else {
		delete(b.clients, c.client)
	}
	b.usedGauge.Set(float64(b.used))
	b.mu.Unlock()
}

// Size is what the charge holds now.
func (c *Charge) Size() int64 {
	if c == nil || c.b == nil {
		return 0
	}
	c.b.mu.Lock()
	defer c.b.mu.Unlock()
	return c.n
}

// Release gives back the whole charge; it may be called more than once.
func (c *Charge) Release() {
	if c == nil || c.b == nil {
		return
	}
	c.b.mu.Lock()
	n := c.n
	c.b.mu.Unlock()
	c.Shrink(n)
}

func reclaimAny(rs []Reclaimer, client string) bool {
	for _, r := range rs {
		if r(client) {
			return true
		}
	}
	return false
}

// Slots counts things in progress (uploads, walks, queued executions) per client and
// in all; Acquire refuses beyond either bound.
type Slots struct {
	label            string // the refusal metric's label, e.g. "uploads" (and "client_uploads")
	name             string // for errors, e.g. "uploads"
	flag             string // the serve flag that sets perClient
	perClient, total int
	refused          *prometheus.CounterVec

	mu      sync.Mutex
	n       int
	clients map[string]int
	reclaim Reclaimer
}

// NewSlots returns a counter of name allowing perClient per client and total in all
// (0: no bound); refusals are counted in b's refusal metric under label, if b is not
// nil. flag names the setting in refusals.
func NewSlots(b *Budget, label, name, flag string, perClient, total int) *Slots {
	s := &Slots{label: label, name: name, flag: flag, perClient: perClient, total: total, clients: map[string]int{}}
	if b != nil {
		s.refused = b.refused
	}
	return s
}

// OnShortage sets the reclaimer Acquire calls before it refuses.
func (s *Slots) OnShortage(r Reclaimer) { s.reclaim = r }

// PerClient is the bound per client (0: none).
func (s *Slots) PerClient() int { return s.perClient }

// Acquire takes one slot for client; release gives it back (once).
func (s *Slots) Acquire(client string) (release func(), err error) {
	for attempt := 0; ; attempt++ {
		s.mu.Lock()
		clientOver := s.perClient > 0 && s.clients[client] >= s.perClient
		over := s.total > 0 && s.n >= s.total
		if !clientOver && !over {
			s.n++
			s.clients[client]++
			s.mu.Unlock()
			var once sync.Once
			return func() { once.Do(func() { s.put(client) }) }, nil
		}
		s.mu.Unlock()
		who := client
		if over && !clientOver {
			who = ""
		}
		if attempt < 64 && s.reclaim != nil && s.reclaim(who) {
			continue
		}
		if clientOver {
			s.count("client_" + s.label)
			return nil, status.Errorf(codes.ResourceExhausted, "client %s already has %d %s in progress, its limit (%s); retry when some have finished", client, s.perClient, s.name, s.flag)
		}
		s.count(s.label)
		return nil, status.Errorf(codes.ResourceExhausted, "the server already has %d %s in progress, its limit; retry later", s.total, s.name)
	}
}

// InUse is how many slots client (or, for "", everyone) holds.
func (s *Slots) InUse(client string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if client != "" {
		return s.clients[client]
	}
	return s.n
}

func (s *Slots) put(client string) {
	s.mu.Lock()
	s.n--
	if s.clients[client] <= 1 {
		delete(s.clients, client)
	} else {
		s.clients[client]--
	}
	s.mu.Unlock()
}

func (s *Slots) count(limit string) {
	if s.refused != nil {
		s.refused.WithLabelValues(limit).Inc()
	}
}

// Bytes formats n for people: 1536 -> "1.5 KiB".
func Bytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}

// DefaultMemoryShare is the part of the machine's memory (or of the cgroup's limit,
// if lower) that DefaultMemory gives the server's budget.
const DefaultMemoryShare = 4

// DefaultMemory is the default memory budget: a quarter of the memory the process
// may use (physical memory, or the cgroup's memory.max if it is lower), or 1 GiB if
// neither can be read.
func DefaultMemory() int64 {
	total := memTotal()
	if lim := cgroupLimit(); lim > 0 && (total == 0 || lim < total) {
		total = lim
	}
	if total <= 0 {
		return 1 << 30
	}
	return total / DefaultMemoryShare &^ (1<<20 - 1) // whole MiB
}

// memTotal reads MemTotal from /proc/meminfo.
func memTotal() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemTotal:" {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			if err == nil {
				return kb << 10
			}
		}
	}
	return 0
}

// cgroupLimit reads the memory.max of the process's cgroup (v2), 0 if unbounded or unknown.
func cgroupLimit() int64 {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "0::"); ok {
			v, err := os.ReadFile("/sys/fs/cgroup" + strings.TrimSpace(rest) + "/memory.max")
			if err != nil {
				return 0
			}
			n, err := strconv.ParseInt(strings.TrimSpace(string(v)), 10, 64)
			if err != nil {
				return 0 // "max"
			}
			return n
		}
	}
	return 0
}

// Work bounds the CPU-heavy work (decompressing, hashing, parsing directories) done
// for one client: a client's work runs on at most a few cores at once, and takes, over
// time, at most rate cores (core-seconds per second, with a burst of workBurst), so
// that a client sending work as fast as it can leaves the rest of the machine to the
// others. A client's work beyond that waits for its own turn, never for another's;
// unlike Slots it waits rather than refuses: work already admitted is not thrown away.
// While it holds a token, the work runs on an OS thread of its own at a lower priority
// (nice WorkNice), so that the kernel gives the machine's CPUs to latency-bound work
// first: other clients' calls, and the actions running in sandboxes. What is counted
// is the CPU time that thread used while the token was held (user and system), not
// the wall time: on a busy machine a niced thread waits for a CPU most of the time,
// and counting that wait as work would throttle a client for others' load.
//
// The rate holds a client back only while it shares the server: while another client
// has a call in progress (any call, an Execute waiting on its action included; see
// Enter) or ended one less than workQuiet ago. A client alone on the server slows
// nobody by going on, so it does, and what it owes is forgiven: it pays its rate from
// the moment another client shows up. A client that never called Enter is never alone,
// and with evenAlone (a machine shared with other work) no client is.
type Work struct {
	perClient int
	rate      float64 // cores
	evenAlone bool    // hold a client alone on the server to the rate too
	clock     clock.Clock
	nice      int                  // the priority work runs at; 0: as the process
	cpu       func() time.Duration // the calling thread's CPU time (threadCPU)

	mu      sync.Mutex
	clients map[string]*workTokens
	leaves  int
	present map[string]*presence // clients with calls in progress or just ended (Enter)
	entered int

	waited prometheus.Counter // seconds of work held back by the rate
}

// presence is one client's calls in progress and when its last one ended.
type presence struct {
	calls int
	last  time.Time
}

// workQuiet is how long after its last call a client still counts as sharing the
// server: the gap between one build's calls and the next is shorter.
const workQuiet = 2 * time.Second

// WorkNice is the nice value CPU-heavy client work runs at.
const WorkNice = 10

// workBurst is how much work a client that was idle may do before its rate applies.
const workBurst = 500 * time.Millisecond

type workTokens struct {
	ch     chan struct{}
	users  int           // callers holding or waiting for a token
	credit time.Duration // work the client may still do now; negative: owed
	last   time.Time     // when credit was last brought up to date
}

// DefaultClientCPUs is the default rate of Work: an eighth of the CPUs, at least a
// quarter of one (hashing at that rate still takes a few hundred MB/s).
func DefaultClientCPUs() float64 { return max(0.25, float64(runtime.NumCPU())/8) }

// NewWork returns a Work allowing each client rate cores over time (0:
// DefaultClientCPUs), while it shares the server or always with evenAlone, and, at
// once, as many whole cores as that (at least one).
func NewWork(rate float64, evenAlone bool) *Work {
	if rate <= 0 {
		rate = DefaultClientCPUs()
	}
	return &Work{perClient: max(1, int(math.Ceil(rate))), rate: rate, evenAlone: evenAlone, clock: clock.System(), nice: WorkNice, cpu: threadCPU,
		clients: map[string]*workTokens{}, present: map[string]*presence{},
		waited: prometheus.NewCounter(prometheus.CounterOpts{Name: "kiln_client_cpu_wait_seconds_total",
			Help: "Seconds clients' CPU-heavy work waited out --client-max-cpus (summed over the waits)."})}
}

// Register exports the rate's metrics: the time work waited for it, and how many
// clients are present (with a call in progress or ended within workQuiet).
func (w *Work) Register(reg prometheus.Registerer) {
	if w == nil || reg == nil {
		return
	}
	present := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "kiln_clients_present",
		Help: "Clients with a call in progress or ended in the last 2 s: while more than one, --client-max-cpus holds."},
		func() float64 {
			w.mu.Lock()
			defer w.mu.Unlock()
			w.prunePresent()
			return float64(len(w.present))
		})
	reg.MustRegister(w.waited, present)
}

// Enter records that client has a call in progress, until leave is called (once): the
// presence that decides whether other clients share the server. A nil *Work records
// nothing.
func (w *Work) Enter(client string) (leave func()) {
	if w == nil {
		return func() {}
	}
	w.mu.Lock()
	p := w.present[client]
	if p == nil {
		p = &presence{}
		w.present[client] = p
	}
	p.calls++
	if w.entered++; w.entered%1024 == 0 {
		w.prunePresent()
	}
	w.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			w.mu.Lock()
			p.calls--
			p.last = w.clock.Now()
			w.mu.Unlock()
		})
	}
}

// prunePresent forgets the clients gone quiet. Callers hold w.mu.
func (w *Work) prunePresent() {
	now := w.clock.Now()
	for c, p := range w.present {
		if p.quiet(now) {
			delete(w.present, c) // no call of its is in progress: no leave refers to it
		}
	}
}

// quiet reports whether p has no call in progress and ended its last over workQuiet ago.
func (p *presence) quiet(now time.Time) bool { return p.calls == 0 && now.Sub(p.last) >= workQuiet }

// Alone reports whether client has a call in progress and no other client has one or
// ended one within workQuiet: whether its rate is waived now (never with evenAlone).
func (w *Work) Alone(client string) bool {
	if w == nil {
		return false
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.alone(client)
}

// alone is Alone; it forgets clients gone quiet on the way. Callers hold w.mu.
func (w *Work) alone(client string) bool {
	if w.evenAlone {
		return false
	}
	now := w.clock.Now()
	for c, p := range w.present {
		if p.quiet(now) {
			delete(w.present, c)
			continue
		}
		if c != client {
			return false
		}
	}
	p := w.present[client]
	return p != nil && p.calls > 0
}

// threadCPU is the CPU time the calling OS thread has used; -1 if it cannot be read.
func threadCPU() time.Duration {
	var ts unix.Timespec
	if unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts) != nil {
		return -1
	}
	return time.Duration(ts.Nano())
}

// sleep waits on c for d, or until ctx ends (a gRPC status then).
func sleep(ctx context.Context, c clock.Clock, d time.Duration) error {
	if err := c.Sleep(ctx, d); err != nil {
		return status.FromContextError(err).Err()
	}
	return nil
}

// refill brings t's credit up to now. Callers hold w.mu.
func (w *Work) refill(t *workTokens) {
	now := w.clock.Now()
	if !t.last.IsZero() {
		t.credit += time.Duration(float64(now.Sub(t.last)) * w.rate)
	}
	t.credit = min(t.credit, workBurst)
	t.last = now
}

// Acquire waits for one of client's tokens and for client to be within its rate (or
// for ctx to end); release gives the token back, once, and counts the time it was held.
// A nil *Work never waits.
func (w *Work) Acquire(ctx context.Context, client string) (release func(), err error) {
	if w == nil {
		return func() {}, nil
	}
	w.mu.Lock()
	t := w.clients[client]
	if t == nil {
		t = &workTokens{ch: make(chan struct{}, w.perClient), credit: workBurst, last: w.clock.Now()}
		w.clients[client] = t
	}
	t.users++
	w.mu.Unlock()
	select {
	case t.ch <- struct{}{}:
	case <-ctx.Done():
		w.leave(client, t)
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	// Within the rate: wait out what the client owes, while it shares the server.
	for {
		w.mu.Lock()
		w.refill(t)
		owed := -t.credit
		if owed > 0 && w.alone(client) {
			t.credit, owed = 0, 0
		}
		w.mu.Unlock()
		if owed <= 0 {
			break
		}
		d := time.Duration(float64(owed) / w.rate)
		w.waited.Add(d.Seconds())
		if err := sleep(ctx, w.clock, d); err != nil {
			<-t.ch
			w.leave(client, t)
			return nil, err
		}
	}
	m := w.begin()
	var once sync.Once
	return func() {
		once.Do(func() {
			used := m.end()
			w.mu.Lock()
			w.charge(client, t, used)
			w.mu.Unlock()
			<-t.ch
			w.leave(client, t)
		})
	}, nil
}

// Also runs fn as part of the work of client, whose token the caller holds, when fn
// runs on another goroutine than the holder's (a request's blobs stored side by side):
// fn runs at the work priority, and the CPU time it takes counts against client's rate.
// A nil *Work just runs fn.
func (w *Work) Also(client string, fn func()) {
	if w == nil {
		fn()
		return
	}
	m := w.begin()
	fn()
	used := m.end()
	w.mu.Lock()
	if t := w.clients[client]; t != nil {
		w.charge(client, t, used)
	}
	w.mu.Unlock()
}

// charge counts work done for client against its credit; alone, the client owes
// nothing for it. Callers hold w.mu.
func (w *Work) charge(client string, t *workTokens, used time.Duration) {
	w.refill(t)
	t.credit -= used
	if t.credit < 0 && w.alone(client) {
		t.credit = 0
	}
}

// meter measures the work done on one goroutine, pinned to its OS thread meanwhile.
type meter struct {
	w       *Work
	tid     int
	cpu     time.Duration // the thread's CPU time at the start; -1: unknown
	wall    time.Time
	prev    int
	lowered bool
}

// begin pins the calling goroutine to its thread, lowers the thread's priority and
// starts counting; end, called on the same goroutine, undoes both and returns the work
// done: the thread's CPU time, or the wall time if the thread's clock cannot be read
// (or end runs on another thread, where the start's reading means nothing).
func (w *Work) begin() *meter {
	runtime.LockOSThread()
	m := &meter{w: w, tid: unix.Gettid(), wall: w.clock.Now()}
	m.prev, m.lowered = w.lower()
	m.cpu = w.cpu()
	return m
}

func (m *meter) end() time.Duration {
	used := m.w.clock.Now().Sub(m.wall)
	if now := m.w.cpu(); m.cpu >= 0 && now >= m.cpu && unix.Gettid() == m.tid {
		used = now - m.cpu
	}
	if m.lowered {
		restore(m.prev)
	}
	runtime.UnlockOSThread()
	return used
}

// lower pins the calling goroutine to its OS thread and lowers that thread's priority
// to nice w.nice (if it is not lower already); it returns the nice value to restore
// and whether it changed anything.
func (w *Work) lower() (prev int, lowered bool) {
	if w.nice <= 0 {
		return 0, false
	}
	runtime.LockOSThread()
	raw, err := unix.Getpriority(unix.PRIO_PROCESS, 0) // the calling thread; the kernel answers 20 - nice
	prev = 20 - raw
	if err != nil || prev >= w.nice || unix.Setpriority(unix.PRIO_PROCESS, 0, w.nice) != nil {
		runtime.UnlockOSThread()
		return 0, false
	}
	return prev, true
}

// restore gives the thread lowered by lower its nice value prev back and unpins it.
// Raising a priority needs CAP_SYS_NICE (kiln serve with execution runs as root);
// without it the goroutine stays on its lowered thread, which ends with it, rather
// than handing a lowered thread to other goroutines.
func restore(prev int) {
	if unix.Setpriority(unix.PRIO_PROCESS, 0, prev) == nil {
		runtime.UnlockOSThread()
	}
}

// leave drops a user of client's tokens; an idle client is forgotten once it owes
// nothing (forgetting it sooner would cancel its debt).
func (w *Work) leave(client string, t *workTokens) {
	w.mu.Lock()
	defer w.mu.Unlock()
	t.users--
	w.refill(t)
	if t.users == 0 && t.credit >= workBurst {
		delete(w.clients, client)
	}
	if w.leaves++; w.leaves%1024 == 0 {
		for c, o := range w.clients {
			if w.refill(o); o.users == 0 && o.credit >= workBurst {
				delete(w.clients, c)
			}
		}
	}
}

// WorkReader holds one of client's work tokens while what it returned is processed:
// it gives the token back while it waits for more input (the network) and takes it
// again when input arrives, so the work done on a stream's data counts as the client's.
type WorkReader struct {
	R       io.Reader
	W       *Work
	Client  string
	Ctx     context.Context
	release func()
}

func (r *WorkReader) Read(p []byte) (int, error) {
	r.Done()
	n, err := r.R.Read(p)
	if n > 0 || err == nil {
		rel, aerr := r.W.Acquire(r.Ctx, r.Client)
		if aerr != nil {
			return 0, aerr
		}
		r.release = rel
	}
	return n, err
}

// WriteTo hands what R hands over (R's own WriteTo, without a copy, if it has one) to
// w, holding a token while w processes each piece: the same work as through Read.
func (r *WorkReader) WriteTo(w io.Writer) (int64, error) {
	r.Done()
	ww := &workWriter{w: w, r: r}
	if wt, ok := r.R.(io.WriterTo); ok {
		return wt.WriteTo(ww)
	}
	return io.Copy(ww, struct{ io.Reader }{r.R})
}

// workWriter holds its WorkReader's client's token while each write is processed.
type workWriter struct {
	w io.Writer
	r *WorkReader
}

func (w *workWriter) Write(p []byte) (int, error) {
	rel, err := w.r.W.Acquire(w.r.Ctx, w.r.Client)
	if err != nil {
		return 0, err
	}
	defer rel()
	return w.w.Write(p)
}

// Done gives back the token held, if any.
func (r *WorkReader) Done() {
	if r.release != nil {
		r.release()
		r.release = nil
	}
}

// Calls bounds the rate at which one client may start calls: rate calls per second on
// average, burst at once. A call beyond that waits for its turn (the client's own
// calls only), and one that would have more than maxWaiting of the client's calls
// waiting is refused with RESOURCE_EXHAUSTED: even a refused call costs the server
// something, so a client cannot make it do unbounded work by sending cheap calls.
type Calls struct {
	rate       float64
	burst      float64
	maxWaiting int
	clock      clock.Clock
	refused    *prometheus.CounterVec

	mu      sync.Mutex
	clients map[string]*callBucket
	pruned  time.Time
}

type callBucket struct {
	tokens  float64 // calls the client may start now; negative: turns already promised
	last    time.Time
	waiting int
}

// DefaultClientCalls is the default rate of calls per client and second.
const DefaultClientCalls = 1000

// NewCalls returns a limit of rate calls per second per client (0: DefaultClientCalls)
// with a burst of twice as many, counting refusals in b's metric.
func NewCalls(b *Budget, rate float64) *Calls {
	if rate <= 0 {
		rate = DefaultClientCalls
	}
	c := &Calls{rate: rate, burst: max(2*rate, 1), maxWaiting: 256, clock: clock.System(), clients: map[string]*callBucket{}}
	if b != nil {
		c.refused = b.refused
	}
	return c
}

// Wait returns when client may start a call, or refuses it. A nil *Calls never waits.
func (c *Calls) Wait(ctx context.Context, client string) error {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	now := c.clock.Now()
	b := c.clients[client]
	if b == nil {
		b = &callBucket{tokens: c.burst, last: now}
		c.clients[client] = b
	}
	b.tokens = min(c.burst, b.tokens+now.Sub(b.last).Seconds()*c.rate)
	b.last = now
	if b.tokens >= 1 {
		b.tokens--
		c.prune(now)
		c.mu.Unlock()
		return nil
	}
	if b.waiting >= c.maxWaiting {
		c.mu.Unlock()
		if c.refused != nil {
			c.refused.WithLabelValues("client_calls").Inc()
		}
		return status.Errorf(codes.ResourceExhausted, "client %s already has %d calls waiting for their turn (--client-max-calls %g per second); retry later", client, c.maxWaiting, c.rate)
	}
	wait := time.Duration((1 - b.tokens) / c.rate * float64(time.Second))
	b.tokens-- // this call's turn
	b.waiting++
	c.mu.Unlock()
	err := sleep(ctx, c.clock, wait)
	c.mu.Lock()
	b.waiting--
	if err != nil {
		b.tokens++ // the turn was not used
	}
	c.mu.Unlock()
	return err
}

// prune forgets, now and then, clients whose bucket is full again. Callers hold c.mu.
func (c *Calls) prune(now time.Time) {
	if now.Sub(c.pruned) < time.Minute {
		return
	}
	c.pruned = now
	for id, b := range c.clients {
		if b.waiting == 0 && b.tokens+now.Sub(b.last).Seconds()*c.rate >= c.burst {
			delete(c.clients, id)
		}
	}
}
