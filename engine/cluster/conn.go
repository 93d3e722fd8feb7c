package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Names of the cluster's streams, buckets and subjects in its NATS account (one
// cluster per account: accounts isolate them).
const (
	workStream    = "KILN_WORK"    // work queue: one subject per platform key
	workSubject   = "kiln.work."   // + platform key
	stateBucket   = "KILN_EXEC"    // x.<exec>, o.<op>, f.<in-flight key>
	workersBucket = "KILN_WORKERS" // w.<worker id>: heartbeats
	trustBucket   = "KILN_TRUST"   // key.<keyid>, log
	linksSubject  = "kiln.links"   // a worker left a link for the sequencer (a wake-up only)
)

// MinServerVersion is the oldest nats-server kiln runs on: 2.10 is the oldest release
// line with the KV and work-queue consumer behaviour kiln relies on that its
// maintainers still fix (Debian 12's 2.9.10 is refused at start).
const MinServerVersion = "2.10.0"

// Conn is a connection to the cluster's JetStream with its streams and buckets.
type Conn struct {
	NC      *nats.Conn
	JS      jetstream.JetStream
	State   jetstream.KeyValue // executions, operations, in-flight keys
	Workers jetstream.KeyValue // worker heartbeats
	Trust   jetstream.KeyValue // admitted executor keys and the log key
	Work    jetstream.Stream
	cfg     Config
	log     *slog.Logger

	mu          sync.Mutex
	reconnected chan struct{} // closed and replaced at every reconnection
}

// Connect connects to the cluster cfg names (not "embedded": start it first and pass
// its URL), checks the server's version and creates the streams and buckets if needed.
// name identifies this process to the servers (kiln-serve@host, ...).
func Connect(ctx context.Context, cfg Config, name string, log *slog.Logger) (*Conn, error) {
	cfg = cfg.Resolved()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Conn{cfg: cfg, log: log, reconnected: make(chan struct{})}
	opts := []nats.Option{
		nats.Name(name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond),
		nats.Timeout(5 * time.Second),
		nats.PingInterval(5 * time.Second),
		nats.MaxPingsOutstanding(3),
		// Publishes while disconnected fail at once instead of waiting in a buffer:
		// the caller retries (or tells its client) knowing the outcome.
		nats.ReconnectBufSize(-1),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn("cluster connection lost; reconnecting", "cluster", cfg.String(), "err", err)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.Info("cluster connection back", "server", nc.ConnectedUrlRedacted())
			c.mu.Lock()
			close(c.reconnected)
			c.reconnected = make(chan struct{})
			c.mu.Unlock()
		}),
	}
	// Files are named, not loaded: nats.go reads them at every (re)connection, so a
	// rotated certificate or credentials file is used from the next one on.
	if cfg.Creds != "" {
		opts = append(opts, nats.UserCredentials(cfg.Creds))
	}
	if cfg.TLSCA != "" {
		opts = append(opts, nats.RootCAs(cfg.TLSCA))
	}
	if cfg.TLSCert != "" {
		opts = append(opts, nats.ClientCert(cfg.TLSCert, cfg.TLSKey))
	}
	nc, err := nats.Connect(strings.Join(cfg.Servers(), ","), opts...)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "connect to the cluster at %s: %v", cfg.String(), err)
	}
	c.NC = nc
	if err := checkVersion(nc.ConnectedServerVersion()); err != nil {
		nc.Close()
		return nil, err
	}
	if err := c.setup(ctx); err != nil {
		if errors.Is(err, jetstream.ErrJetStreamNotEnabled) || errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount) || strings.Contains(err.Error(), "no responders") {
			err = status.Errorf(codes.FailedPrecondition, "the NATS server at %s has no JetStream for this account: start it with -js -sd DIR", nc.ConnectedUrlRedacted())
		}
		nc.Close()
		return nil, err
	}
	return c, nil
}

// checkVersion refuses servers older than MinServerVersion.
func checkVersion(v string) error {
	if versionLess(v, MinServerVersion) {
		return status.Errorf(codes.FailedPrecondition, "the NATS server is version %s; kiln needs %s or newer (Debian's nats-server 2.9 is too old: `go install github.com/nats-io/nats-server/v2@v2.15.3`)", v, MinServerVersion)
	}
	return nil
}

// versionLess compares dotted versions numerically ("2.9.10" < "2.10.0"); a
// pre-release suffix is ignored.
func versionLess(a, b string) bool {
	pa, pb := strings.Split(strings.SplitN(a, "-", 2)[0], "."), strings.Split(b, ".")
	for i := 0; i < 3; i++ {
		var x, y int
		if i < len(pa) {
			x, _ = strconv.Atoi(pa[i])
		}
		if i < len(pb) {
			y, _ = strconv.Atoi(pb[i])
		}
		if x != y {
			return x < y
		}
	}
	return false
}

// setup creates (or updates to this configuration) the stream and buckets.
func (c *Conn) setup(ctx context.Context) error {
	js, err := jetstream.New(c.NC)
	if err != nil {
		return status.Errorf(codes.Internal, "jetstream: %v", err)
	}
	c.JS = js
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	c.Work, err = js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name: workStream, Subjects: []string{workSubject + "*"},
		Retention: jetstream.WorkQueuePolicy, Storage: jetstream.FileStorage,
		// Execution ids are message ids: a frontend that publishes again (a retry, or
		// one joining a queued execution) never queues it twice within this window.
		Duplicates:  10 * time.Minute,
		Description: "kiln: actions waiting for a worker, one subject per platform",
	})
	if err != nil {
		return c.wrap(err, "create the work stream")
	}
	kv := func(name, what string, ttl time.Duration) (jetstream.KeyValue, error) {
		b, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: name, Description: what, TTL: ttl, Storage: jetstream.FileStorage, History: 1})
		if err != nil {
			return nil, c.wrap(err, "create the %s bucket", name)
		}
		return b, nil
	}
	if c.State, err = kv(stateBucket, "kiln: executions and operations", c.cfg.Retain); err != nil {
		return err
	}
	if c.Workers, err = kv(workersBucket, "kiln: worker heartbeats", 3*heartbeatEvery); err != nil {
		return err
	}
	if c.Trust, err = kv(trustBucket, "kiln: admitted executor keys and the log key", 0); err != nil {
		return err
	}
	return nil
}

// wrap turns a NATS error into a gRPC status: the cluster unreachable or timing out is
// UNAVAILABLE (the caller may retry), anything else INTERNAL.
func (c *Conn) wrap(err error, format string, args ...any) error {
	what := fmt.Sprintf(format, args...)
	if s, ok := status.FromError(err); ok && s.Code() != codes.Unknown {
		return status.Errorf(s.Code(), "%s: %s", what, s.Message())
	}
	switch {
	case errors.Is(err, context.Canceled):
		return status.Errorf(codes.Canceled, "%s: %v", what, err)
	case errors.Is(err, nats.ErrTimeout), errors.Is(err, context.DeadlineExceeded), errors.Is(err, nats.ErrNoResponders),
		errors.Is(err, nats.ErrConnectionClosed), errors.Is(err, nats.ErrConnectionReconnecting), errors.Is(err, nats.ErrDisconnected),
		errors.Is(err, jetstream.ErrNoStreamResponse), !c.NC.IsConnected():
		return status.Errorf(codes.Unavailable, "%s: the cluster (%s) is unavailable: %v", what, c.cfg.String(), err)
	}
	return status.Errorf(codes.Internal, "%s: %v", what, err)
}

// Reconnected returns a channel closed at the next reconnection (state read before
// may have missed updates while disconnected).
func (c *Conn) Reconnected() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reconnected
}

// Close drains and closes the connection.
func (c *Conn) Close() {
	if c.NC != nil {
		c.NC.Drain()
		deadline := time.Now().Add(5 * time.Second)
		for !c.NC.IsClosed() && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		c.NC.Close()
	}
}

// Config is the configuration the connection was made with, resolved.
func (c *Conn) Config() Config { return c.cfg }

// retry calls fn until it succeeds, fails with an error that is not UNAVAILABLE, or
// ctx ends; waits grow from 50ms to 2s (the cluster or storage coming back).
func retry(ctx context.Context, log *slog.Logger, what string, fn func() error) error {
	wait := 50 * time.Millisecond
	for n := 1; ; n++ {
		err := fn()
		if err == nil || status.Code(err) != codes.Unavailable {
			return err
		}
		if n == 1 || n%10 == 0 {
			log.Warn(what+": retrying", "attempt", n, "err", status.Convert(err).Message())
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(wait):
		}
		wait = min(2*wait, 2*time.Second)
	}
}
