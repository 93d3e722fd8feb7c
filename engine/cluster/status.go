package cluster

import (
	"context"
	"encoding/json"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
)

// Status is the cluster as `kiln cluster status` shows it.
type Status struct {
	Server    string           `json:"server"`  // the NATS server answering, and its version
	Workers   []WorkerStatus   `json:"workers"` // live workers (a heartbeat within 3 intervals)
	Platforms []PlatformStatus `json:"platforms"`
	// InFlight is every execution queued or running.
	InFlight int `json:"in_flight"`
	// TrustedKeys counts admitted executor keys that are not retired.
	TrustedKeys int `json:"trusted_keys"`
}

// PlatformStatus is one platform key's queue.
type PlatformStatus struct {
	Platform string `json:"platform"`
	Pending  int    `json:"pending"` // queued, not handed to a worker
	Running  int    `json:"running"` // handed to a worker, not yet acknowledged
}

// WorkerStatus is a worker's latest heartbeat.
type WorkerStatus struct {
	ID          string    `json:"id"`
	Name        string    `json:"name"`
	Platform    string    `json:"platform"`
	Concurrency int       `json:"concurrency"`
	Running     int       `json:"running"`
	KeyID       string    `json:"keyid"`
	Version     string    `json:"version"`
	Started     time.Time `json:"started"`
	Seen        time.Time `json:"seen"`
	Draining    bool      `json:"draining,omitempty"`
}

// Status reads the cluster's state: workers from their heartbeats, queues from the work
// stream and its consumers.
func (c *Conn) Status(ctx context.Context) (Status, error) {
	st := Status{Server: c.NC.ConnectedUrlRedacted() + " (nats-server " + c.NC.ConnectedServerVersion() + ")", Workers: []WorkerStatus{}, Platforms: []PlatformStatus{}}
	queues, err := c.queues(ctx)
	if err != nil {
		return st, err
	}
	for _, q := range queues {
		st.Platforms = append(st.Platforms, q)
		st.InFlight += q.Pending + q.Running
	}
	lister, err := c.Workers.ListKeys(ctx)
	if err != nil && err != jetstream.ErrNoKeysFound {
		return st, c.wrap(err, "list workers")
	}
	if lister != nil {
		for k := range lister.Keys() {
			e, err := c.Workers.Get(ctx, k)
			if err != nil {
				continue
			}
			var w WorkerStatus
			if json.Unmarshal(e.Value(), &w) == nil {
				st.Workers = append(st.Workers, w)
			}
		}
	}
	sort.Slice(st.Workers, func(i, j int) bool { return st.Workers[i].Name+st.Workers[i].ID < st.Workers[j].Name+st.Workers[j].ID })
	trust, err := c.TrustSet(ctx)
	if err != nil {
		return st, err
	}
	for _, k := range trust.Keys {
		if k.Active() {
			st.TrustedKeys++
		}
	}
	return st, nil
}

// queues counts each platform's queued and running actions: the work stream keeps a
// message until it is acknowledged, so its count per subject is both; the platform's
// consumer knows how many are handed out.
func (c *Conn) queues(ctx context.Context) ([]PlatformStatus, error) {
	info, err := c.Work.Info(ctx, jetstream.WithSubjectFilter(workSubject+"*"))
	if err != nil {
		return nil, c.wrap(err, "read the work stream")
	}
	by := map[string]*PlatformStatus{}
	get := func(p string) *PlatformStatus {
		if by[p] == nil {
			by[p] = &PlatformStatus{Platform: p}
		}
		return by[p]
	}
	total := map[string]int{}
	for subj, n := range info.State.Subjects {
		total[strings.TrimPrefix(subj, workSubject)] += int(n)
	}
	cl := c.Work.ListConsumers(ctx)
	for ci := range cl.Info() {
		p, ok := strings.CutPrefix(ci.Config.FilterSubject, workSubject)
		if !ok {
			continue
		}
		get(p).Running = ci.NumAckPending
	}
	for p, n := range total {
		q := get(p)
		q.Pending = max(n-q.Running, 0)
	}
	out := make([]PlatformStatus, 0, len(by))
	for _, q := range by {
		out = append(out, *q)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Platform < out[j].Platform })
	return out, nil
}

// queueCollector exports kiln_cluster_queue_pending{platform} (what an autoscaler
// watches) and kiln_cluster_queue_running{platform}, read from JetStream at scrape
// time (at most once a second).
type queueCollector struct {
	c                *Conn
	pending, running *prometheus.Desc
	mu               sync.Mutex
	at               time.Time
	last             []PlatformStatus
}

func newQueueCollector(c *Conn) *queueCollector {
	return &queueCollector{c: c,
		pending: prometheus.NewDesc("kiln_cluster_queue_pending", "Actions queued in the cluster and not yet handed to a worker, by platform.", []string{"platform"}, nil),
		running: prometheus.NewDesc("kiln_cluster_queue_running", "Actions handed to a worker and not yet acknowledged, by platform.", []string{"platform"}, nil),
	}
}

func (q *queueCollector) Describe(ch chan<- *prometheus.Desc) { ch <- q.pending; ch <- q.running }

func (q *queueCollector) Collect(ch chan<- prometheus.Metric) {
	q.mu.Lock()
	if time.Since(q.at) > time.Second {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		if qs, err := q.c.queues(ctx); err == nil {
			q.last, q.at = qs, time.Now()
		}
		cancel()
	}
	qs := q.last
	q.mu.Unlock()
	for _, p := range qs {
		ch <- prometheus.MustNewConstMetric(q.pending, prometheus.GaugeValue, float64(p.Pending), p.Platform)
		ch <- prometheus.MustNewConstMetric(q.running, prometheus.GaugeValue, float64(p.Running), p.Platform)
	}
}
