package cache

import (
	"context"
	"io"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Metrics counts store operations, bytes and action-cache hits for Prometheus.
type Metrics struct {
	ops      *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	acLookup *prometheus.CounterVec
}

// NewMetrics registers the store metrics with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kiln_store_operations_total", Help: "Store operations by store, operation and gRPC code.",
		}, []string{"store", "op", "code"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kiln_store_bytes_total", Help: "Blob bytes read from (out) and written to (in) the store.",
		}, []string{"store", "direction"}),
		acLookup: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kiln_action_cache_lookups_total", Help: "Action-cache lookups by result (hit, miss, error).",
		}, []string{"result"}),
	}
	reg.MustRegister(m.ops, m.bytes, m.acLookup)
	return m
}

// BlobStore wraps s so its operations are counted under name.
func (m *Metrics) BlobStore(name string, s BlobStore) BlobStore {
	return &meteredStore{BlobStore: s, m: m, name: name,
		in: m.bytes.WithLabelValues(name, "in"), out: m.bytes.WithLabelValues(name, "out")}
}

// ActionCache wraps ac so lookups count as hits and misses.
func (m *Metrics) ActionCache(ac ActionCache) ActionCache { return meteredAC{ActionCache: ac, m: m} }

type meteredStore struct {
	BlobStore
	m       *Metrics
	name    string
	in, out prometheus.Counter
}

func (s *meteredStore) count(op string, err error) {
	s.m.ops.WithLabelValues(s.name, op, status.Code(err).String()).Inc()
}

func (s *meteredStore) Get(ctx context.Context, d Digest, offset int64) (io.ReadCloser, error) {
	r, err := s.BlobStore.Get(ctx, d, offset)
	s.count("get", err)
	if err != nil {
		return nil, err
	}
	return &countingReader{ReadCloser: r, c: s.out}, nil
}

func (s *meteredStore) Put(ctx context.Context, d Digest, r io.Reader) error {
	err := s.BlobStore.Put(ctx, d, r)
	s.count("put", err)
	if err == nil {
		s.in.Add(float64(d.Size))
	}
	return err
}

func (s *meteredStore) FindMissing(ctx context.Context, ds []Digest) ([]Digest, error) {
	missing, err := s.BlobStore.FindMissing(ctx, ds)
	s.count("find_missing", err)
	return missing, err
}

type countingReader struct {
	io.ReadCloser
	c prometheus.Counter
}

func (r *countingReader) Read(p []byte) (int, error) {
	n, err := r.ReadCloser.Read(p)
	r.c.Add(float64(n))
	return n, err
}

type meteredAC struct {
	ActionCache
	m *Metrics
}

func (a meteredAC) Get(ctx context.Context, key ActionKey) (*repb.ActionResult, error) {
	r, err := a.ActionCache.Get(ctx, key)
	switch {
	case err == nil:
		a.m.acLookup.WithLabelValues("hit").Inc()
	case status.Code(err) == codes.NotFound:
		a.m.acLookup.WithLabelValues("miss").Inc()
	default:
		a.m.acLookup.WithLabelValues("error").Inc()
	}
	return r, err
}
