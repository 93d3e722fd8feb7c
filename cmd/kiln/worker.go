package main

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/kilnbuild/kiln/cache/tiered"
	"github.com/kilnbuild/kiln/engine"
	"github.com/kilnbuild/kiln/engine/cluster"
	"github.com/kilnbuild/kiln/internal/bytesize"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
)

// clusterProcess are the flags kiln worker and kiln sequencer share.
type clusterProcess struct {
	data      string
	storage   engine.StorageConfig
	cluster   cluster.Config
	http      string
	logLevel  string
	logFormat string
}

func (p *clusterProcess) add(cmd *cobra.Command, role string) {
	addDataFlag(cmd, &p.data)
	addStorageFlag(cmd, &p.storage)
	addClusterFlags(cmd, &p.cluster, role)
	cmd.Flags().StringVar(&p.http, "http-listen", "", "HTTP address for /metrics (empty: off)")
	cmd.Flags().StringVar(&p.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	cmd.Flags().StringVar(&p.logFormat, "log-format", "text", "log format: text or json")
}

// running is a started worker or sequencer: its context (ended by SIGTERM or SIGINT),
// cluster connection, logger and metrics registry (served on --http-listen).
type running struct {
	ctx  context.Context
	stop func()
	conn *cluster.Conn
	reg  *prometheus.Registry
	log  *slog.Logger
}

// start checks the flags, makes the logger and the metrics registry, and connects to
// the cluster.
func (p *clusterProcess) start(cmd *cobra.Command, role string) (*running, error) {
	if p.storage.S3 == nil {
		return nil, &exitError{code: 2, msg: "--storage is required: a cluster shares blobs, results and links through it"}
	}
	log, err := newLogger(p.logLevel, p.logFormat)
	if err != nil {
		return nil, &exitError{code: 2, msg: err.Error()}
	}
	conn, err := connectCluster(cmd.Context(), p.cluster, role)
	if err != nil {
		return nil, err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	var hs *http.Server
	if p.http != "" {
		l, err := net.Listen("tcp", p.http)
		if err != nil {
			conn.Close()
			return nil, &exitError{code: 2, msg: "--http-listen: " + err.Error()}
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		hs = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go hs.Serve(l)
		log.Info("metrics", "http", l.Addr().String())
	}
	ctx, cancel := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	return &running{ctx: ctx, conn: conn, reg: reg, log: log, stop: func() {
		cancel()
		if hs != nil {
			hs.Close()
		}
		conn.Close()
	}}, nil
}

func newWorkerCmd() *cobra.Command {
	var (
		p    clusterProcess
		ex   engine.ExecutionConfig
		name string
		size bytesize.Size
		key  string
	)
	var grace time.Duration
	c := &cobra.Command{
		Use:   "worker --cluster nats://HOST:PORT --storage s3://... --data DIR [--concurrency N]",
		Short: "Run actions from a kiln cluster's queue in this machine's sandbox (docs/cluster.md)",
		Long: `Join a kiln cluster as a worker: take actions from its work queue, run each in a
fresh sandbox with the same executor as kiln serve (inputs hardlinked from this data
dir's verified local tier of --storage), store outputs, the action-cache entry and the
signed link in shared storage, report the result, and only then acknowledge the action.

The worker's executor key (kiln attest pubkey --data DIR) must be admitted first:
kiln cluster admit-key. SIGTERM stops taking work; running actions get --grace to
finish, then are handed back to the queue.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := p.start(cmd, "worker")
			if err != nil {
				return err
			}
			defer r.stop()
			if name == "" {
				h, _ := os.Hostname()
				name = "kiln-worker@" + h
			}
			ex = ex.Resolved()
			ex.MaxQueue = 4 * ex.Concurrency // it never queues more than it took
			sink := &cluster.BucketSink{Conn: r.conn}
			eng, err := engine.Open(context.WithoutCancel(r.ctx), engine.Options{Data: engine.DataDir(p.data), Primary: true, MaxSize: size,
				Storage: p.storage, Execution: ex, ExecutorKeyFile: key, Logger: r.log, Registerer: r.reg, Version: version, LinkSink: sink})
			if err != nil {
				return err
			}
			defer eng.Close()
			sink.Bucket = eng.Bucket
			k, err := eng.Signer.Keyring().Active()
			if err != nil {
				return err
			}
			wc := cluster.WorkerConfig{Name: name, Concurrency: ex.Concurrency, Grace: grace, KeyID: k.ID(), Version: version, Logger: r.log, Registerer: r.reg}
			if t, ok := eng.Store.(*tiered.Store); ok {
				wc.LocalTier = t.Local()
			}
			w := cluster.NewWorker(r.conn, eng.Scheduler, eng.CAS, eng.AC, wc)
			return w.Run(r.ctx)
		},
	}
	p.add(c, "worker")
	f := c.Flags()
	f.IntVar(&ex.Concurrency, "concurrency", 0, "actions run at once (0: number of CPUs)")
	f.IntVar(&ex.Prestart, "prestart", -1, "sandboxes kept prepared ahead of actions (-1: as many as --concurrency)")
	f.StringVar(&ex.DefaultToolchain, "default-toolchain", "", "container-image for actions that name none (a pinned reference)")
	f.DurationVar(&ex.DefaultTimeout, "default-timeout", engine.DefaultTimeout, "timeout of actions that set none")
	f.DurationVar(&ex.MaxTimeout, "max-timeout", engine.DefaultMaxTimeout, "longest timeout an action may ask for")
	f.Float64Var(&ex.VerifyRate, "verify-rate", 0, "fraction of actions (sampled by digest) run twice with variations before caching")
	f.BoolVar(&ex.IgnoreUnknownPlatformProperties, "ignore-unknown-platform-properties", false, "accept platform properties kiln does not understand")
	f.Var(&size, "max-size", "bound on this data dir's local tier of --storage, e.g. 50GiB (0: unbounded)")
	f.StringVar(&key, "key-file", "", "executor signing key (ed25519, PKCS #8 PEM); default: the data dir's own key")
	f.StringVar(&name, "name", "", "this worker's name in status and reports (default kiln-worker@HOST)")
	f.DurationVar(&grace, "grace", 30*time.Second, "after SIGTERM, how long running actions may finish before they are handed back")
	return c
}

func newSequencerCmd() *cobra.Command {
	var p clusterProcess
	var poll, sealAfter time.Duration
	c := &cobra.Command{
		Use:   "sequencer --cluster nats://HOST:PORT --storage s3://... --data DIR",
		Short: "Append every worker's links to the cluster's transparency log (run one)",
		Long: `Run the cluster's one log appender: take the links workers left in shared storage
(pending/), check each signature against the cluster's trust set, append each distinct
link once to the transparency log in --data (whose log key it publishes to the trust
set), index it, publish the log to the bucket (log/: tiles and entry bundles, then the
signed checkpoint), and only then delete its marker. While it is down links wait in
the bucket; it catches up when it starts. kiln attest verify --cluster --storage, kiln
log and kiln rebuild on any machine read the log from the bucket.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := p.start(cmd, "sequencer")
			if err != nil {
				return err
			}
			defer r.stop()
			eng, err := engine.Open(context.WithoutCancel(r.ctx), engine.Options{Data: engine.DataDir(p.data), Storage: p.storage,
				Execution: engine.ExecutionConfig{Disabled: true}, Logger: r.log, Registerer: r.reg, Version: version})
			if err != nil {
				return err
			}
			defer eng.Close()
			return cluster.NewSequencer(r.conn, eng.Bucket, eng.Signer, cluster.SequencerOptions{Poll: poll, SealAfter: sealAfter, Logger: r.log, Registerer: r.reg}).Run(r.ctx)
		},
	}
	p.add(c, "sequencer")
	c.Flags().DurationVar(&poll, "poll", 5*time.Second, "how often to look for pending links without a wake-up")
	c.Flags().DurationVar(&sealAfter, "seal-after", 30*time.Second, "how long after a key's retirement its links may still arrive; then its bound (the log size) is recorded and later links of that key are refused")
	return c
}
