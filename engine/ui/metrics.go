package ui

import (
	"context"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// Sample is what the overview plots, read from kiln's own Prometheus registry at one
// moment: counters as totals since start, gauges as they stood.
type Sample struct {
	T          time.Time
	Executions map[string]float64 // kiln_executions_total by outcome
	Lookups    map[string]float64 // kiln_action_cache_lookups_total by result
	Queue      float64            // kiln_execution_queue_length
	Running    float64            // kiln_executions_running
	PhaseSum   map[string]float64 // kiln_execution_phase_seconds sum by phase
	PhaseCount map[string]float64 // and count
}

// Sampler keeps the last samples of a registry in a ring buffer (an hour at 10 s).
type Sampler struct {
	g     prometheus.Gatherer
	now   func() time.Time
	mu    sync.Mutex
	ring  []Sample
	next  int
	count int
}

// NewSampler samples g into a ring of n samples; now is the clock (nil: time.Now).
func NewSampler(g prometheus.Gatherer, n int, now func() time.Time) *Sampler {
	if now == nil {
		now = time.Now
	}
	if n <= 0 {
		n = 360
	}
	return &Sampler{g: g, now: now, ring: make([]Sample, n)}
}

// Run samples every interval until ctx ends (and once at once).
func (s *Sampler) Run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		s.Add(s.Take())
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Take reads the registry now, without keeping the sample.
func (s *Sampler) Take() Sample {
	sm := Sample{T: s.now(), Executions: map[string]float64{}, Lookups: map[string]float64{}, PhaseSum: map[string]float64{}, PhaseCount: map[string]float64{}}
	mfs, _ := s.g.Gather()
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			switch mf.GetName() {
			case "kiln_executions_total":
				sm.Executions[label(m, "outcome")] += m.GetCounter().GetValue()
			case "kiln_action_cache_lookups_total":
				sm.Lookups[label(m, "result")] += m.GetCounter().GetValue()
			case "kiln_execution_queue_length":
				sm.Queue += m.GetGauge().GetValue()
			case "kiln_executions_running":
				sm.Running += m.GetGauge().GetValue()
			case "kiln_execution_phase_seconds":
				p := label(m, "phase")
				sm.PhaseSum[p] += m.GetHistogram().GetSampleSum()
				sm.PhaseCount[p] += float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return sm
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// Add keeps a sample, replacing the oldest when the ring is full.
func (s *Sampler) Add(sm Sample) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ring[s.next] = sm
	s.next = (s.next + 1) % len(s.ring)
	s.count = min(s.count+1, len(s.ring))
}

// Samples returns the kept samples, oldest first, and a fresh one at the end.
func (s *Sampler) Samples() []Sample {
	s.mu.Lock()
	out := make([]Sample, 0, s.count+1)
	for i := 0; i < s.count; i++ {
		out = append(out, s.ring[(s.next-s.count+i+len(s.ring))%len(s.ring)])
	}
	s.mu.Unlock()
	return append(out, s.Take())
}

// overviewCharts derives the overview's series from consecutive samples: executions
// per minute by outcome, the action cache's hit rate, queue depth and running
// executions, and the mean time per phase over the whole window.
func overviewCharts(ss []Sample) (perMin []Series, hitRate []Series, queue []Series, phases []Bar) {
	outcomes := []string{"ok", "failed", "cached", "error"}
	per := make([]Series, len(outcomes))
	for i, o := range outcomes {
		per[i] = Series{Name: o, Class: "o-" + o}
	}
	hits := Series{Name: "hit rate", Class: "o-cached"}
	q := Series{Name: "queued", Class: "s3"}
	run := Series{Name: "running", Class: "s0"}
	for i, s := range ss {
		q.Points = append(q.Points, Point{s.T, s.Queue})
		run.Points = append(run.Points, Point{s.T, s.Running})
		if i == 0 {
			continue
		}
		p := ss[i-1]
		dt := s.T.Sub(p.T).Minutes()
		if dt <= 0 {
			continue
		}
		for j, o := range outcomes {
			per[j].Points = append(per[j].Points, Point{s.T, max(0, s.Executions[o]-p.Executions[o]) / dt})
		}
		h, m := s.Lookups["hit"]-p.Lookups["hit"], s.Lookups["miss"]-p.Lookups["miss"]
		if h+m > 0 {
			hits.Points = append(hits.Points, Point{s.T, 100 * h / (h + m)})
		}
	}
	if len(ss) > 0 {
		first, last := ss[0], ss[len(ss)-1]
		var names []string
		for name := range last.PhaseCount {
			names = append(names, name)
		}
		order := map[string]int{"queue": 0, "input_fetch": 1, "sandbox": 2, "output_upload": 3, "attest": 4, "total": 5}
		sort.Slice(names, func(i, j int) bool { return order[names[i]] < order[names[j]] })
		// Over the window when it saw executions, else since the server started.
		for _, name := range names {
			n, sum := last.PhaseCount[name]-first.PhaseCount[name], last.PhaseSum[name]-first.PhaseSum[name]
			if n <= 0 {
				n, sum = last.PhaseCount[name], last.PhaseSum[name]
			}
			if n > 0 {
				phases = append(phases, Bar{Label: name, Value: sum / n, Note: "mean of " + fmtNum(n)})
			}
		}
	}
	return per, []Series{hits}, []Series{q, run}, phases
}
