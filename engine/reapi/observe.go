package reapi

import (
	"context"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// Observer counts and logs every gRPC call: requests by method and code, and latency.
type Observer struct {
	requests *prometheus.CounterVec
	latency  *prometheus.HistogramVec
	log      *slog.Logger
}

// NewObserver registers the request metrics with reg.
func NewObserver(reg prometheus.Registerer, log *slog.Logger) *Observer {
	o := &Observer{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kiln_grpc_requests_total", Help: "gRPC requests by method and status code.",
		}, []string{"method", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "kiln_grpc_request_seconds", Help: "gRPC request latency by method.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
		}, []string{"method"}),
		log: log,
	}
	reg.MustRegister(o.requests, o.latency)
	return o
}

func (o *Observer) record(ctx context.Context, method string, start time.Time, err error) {
	code := status.Code(err)
	o.requests.WithLabelValues(method, code.String()).Inc()
	o.latency.WithLabelValues(method).Observe(time.Since(start).Seconds())
	if err != nil {
		o.log.Debug("rpc failed", "method", method, "code", code.String(), "err", status.Convert(err).Message(), "client", Client(ctx))
	}
}

// ServerOptions returns the interceptors to create a grpc.Server with.
func (o *Observer) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			start := time.Now()
			resp, err := h(ctx, req)
			o.record(ctx, info.FullMethod, start, err)
			return resp, err
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			start := time.Now()
			err := h(srv, ss)
			o.record(ss.Context(), info.FullMethod, start, err)
			return err
		}),
	}
}
