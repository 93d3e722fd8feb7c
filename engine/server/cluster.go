package server

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/kilnbuild/kiln/engine"
	"github.com/kilnbuild/kiln/engine/cluster"
	"github.com/kilnbuild/kiln/engine/execution"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// checkCluster refuses cluster settings that cannot work.
func (c Config) checkCluster() error {
	if err := c.Cluster.Check(); err != nil {
		return err
	}
	if !c.Cluster.Enabled() {
		return nil
	}
	if c.Storage.S3 == nil {
		return status.Error(codes.InvalidArgument, "--cluster needs --storage: the frontends and workers share blobs, results and links through it")
	}
	if c.Execution.Disabled {
		return status.Error(codes.InvalidArgument, "--cluster and --no-execution do not go together: a cluster frontend's whole job is to queue executions")
	}
	return nil
}

// clusterFrontend is kiln serve's part of a cluster: its connection, the embedded
// JetStream when it runs one, and the scheduler it gives the engine.
type clusterFrontend struct {
	conn     *cluster.Conn
	embedded *cluster.EmbeddedServer
	log      *slog.Logger
	stop     context.CancelFunc
	done     chan struct{}
}

// joinCluster connects to the cluster cfg names (starting the embedded one first); nil
// without a cluster.
func joinCluster(ctx context.Context, cfg Config, log *slog.Logger) (*clusterFrontend, error) {
	cc := cfg.Cluster
	if !cc.Enabled() {
		return nil, nil
	}
	f := &clusterFrontend{log: log}
	if cc.IsEmbedded() {
		dir := filepath.Join(string(cfg.Data), "cluster")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, status.Errorf(codes.Internal, "embedded cluster: %v", err)
		}
		e, err := cluster.StartEmbedded(cc.Listen, dir, log)
		if err != nil {
			return nil, err
		}
		f.embedded = e
		cc.URL = e.URL()
		log.Warn("embedded cluster: JetStream and the sequencer run in this process, a single point of failure; workers connect to "+e.URL(), "store", dir)
	}
	host, _ := os.Hostname()
	conn, err := cluster.Connect(ctx, cc, "kiln-serve@"+host, log)
	if err != nil {
		f.close()
		return nil, err
	}
	f.conn = conn
	return f, nil
}

// NewScheduler implements engine.SchedulerFactory: the engine's scheduler is the
// cluster's frontend.
func (f *clusterFrontend) NewScheduler(e *engine.Engine) (execution.Scheduler, error) {
	return cluster.NewFrontend(f.conn, e.Executor, e.CAS, e.Options.Registerer, f.log).Limit(e.Options.Memory, e.Options.Work, e.Options.ClientQueued), nil
}

// startSequencer runs the sequencer in this process when JetStream does.
func (f *clusterFrontend) startSequencer(ctx context.Context, eng *engine.Engine, reg prometheus.Registerer) error {
	if f == nil || f.embedded == nil {
		return nil
	}
	seq := cluster.NewSequencer(f.conn, eng.Bucket, eng.Signer, cluster.SequencerOptions{Logger: f.log, Registerer: reg})
	sctx, stop := context.WithCancel(ctx)
	f.stop, f.done = stop, make(chan struct{})
	go func() {
		defer close(f.done)
		if err := seq.Run(sctx); err != nil {
			f.log.Error("sequencer stopped", "err", err)
		}
	}()
	return nil
}

// stopSequencer stops the in-process sequencer (before the engine closes its signer).
func (f *clusterFrontend) stopSequencer() {
	if f != nil && f.stop != nil {
		f.stop()
		<-f.done
		f.stop = nil
	}
}

func (f *clusterFrontend) close() {
	if f == nil {
		return
	}
	f.stopSequencer()
	if f.conn != nil {
		f.conn.Close()
	}
	if f.embedded != nil {
		f.embedded.Shutdown()
	}
}
