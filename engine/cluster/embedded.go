package cluster

import (
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// EmbeddedServer is JetStream inside kiln serve (--cluster embedded): one process holds
// the queue, the state and the sequencer, for a small team. It is a single point of
// failure: while it is down nothing is queued or answered (workers keep their running
// actions and report them when it is back; its store dir keeps the queue and state).
type EmbeddedServer struct {
	s   *server.Server
	url string
}

// StartEmbedded starts a NATS server with JetStream on listen (HOST:PORT), keeping its
// store in dir.
func StartEmbedded(listen, dir string, log *slog.Logger) (*EmbeddedServer, error) {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "--cluster-listen %q: %v", listen, err)
	}
	p, err := strconv.Atoi(port)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "--cluster-listen %q: bad port", listen)
	}
	if p == 0 {
		p = server.RANDOM_PORT
	}
	s, err := server.NewServer(&server.Options{ServerName: "kiln-embedded", Host: host, Port: p, JetStream: true, StoreDir: dir, NoSigs: true})
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "embedded cluster: %v", err)
	}
	if log != nil {
		s.SetLoggerV2(natsLogger{log.With("component", "nats")}, false, false, false)
	}
	go s.Start()
	if !s.ReadyForConnections(30 * time.Second) {
		s.Shutdown()
		return nil, status.Errorf(codes.Unavailable, "embedded cluster: JetStream did not start on %s within 30s", listen)
	}
	return &EmbeddedServer{s: s, url: s.ClientURL()}, nil
}

// URL is where the embedded server accepts clients (nats://HOST:PORT).
func (e *EmbeddedServer) URL() string { return e.url }

// Shutdown stops the server.
func (e *EmbeddedServer) Shutdown() {
	e.s.Shutdown()
	e.s.WaitForShutdown()
}

// natsLogger routes the embedded server's logs to slog (notices at debug: they are
// chatty; warnings and errors as such).
type natsLogger struct{ l *slog.Logger }

func (n natsLogger) Noticef(f string, v ...any) { n.l.Debug(fmt.Sprintf(f, v...)) }
func (n natsLogger) Warnf(f string, v ...any)   { n.l.Warn(fmt.Sprintf(f, v...)) }
func (n natsLogger) Fatalf(f string, v ...any)  { n.l.Error(fmt.Sprintf(f, v...)) }
func (n natsLogger) Errorf(f string, v ...any)  { n.l.Error(fmt.Sprintf(f, v...)) }
func (n natsLogger) Debugf(f string, v ...any)  { n.l.Debug(fmt.Sprintf(f, v...)) }
func (n natsLogger) Tracef(f string, v ...any)  {}
