// Package server is `kiln serve`: the gRPC and HTTP listeners, TLS, the authorization
// policy, and the REAPI services over an engine.
package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine"
	"github.com/kilnbuild/kiln/engine/asset"
	"github.com/kilnbuild/kiln/engine/audit"
	"github.com/kilnbuild/kiln/engine/auth"
	"github.com/kilnbuild/kiln/engine/execution"
	"github.com/kilnbuild/kiln/engine/history"
	"github.com/kilnbuild/kiln/engine/limits"
	"github.com/kilnbuild/kiln/engine/reapi"
	"github.com/kilnbuild/kiln/engine/ui"
	"github.com/kilnbuild/kiln/lockfiles"
	"github.com/kilnbuild/kiln/toolchains"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"
)

// ClientACNamespace is where client-written action results are kept (see
// cache.WithNamespace).
const ClientACNamespace = "\x00client-written"

// drainTimeout bounds how long a graceful shutdown waits for calls in flight.
const drainTimeout = 10 * time.Second

// Serve runs the REAPI server until ctx is cancelled, then drains calls in flight.
func Serve(ctx context.Context, cfg Config) error {
	if err := cfg.Check(); err != nil {
		return err
	}
	cfg = cfg.Resolved()
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	verifier, policy, err := authConfig(ctx, cfg, log)
	if err != nil {
		return err
	}
	var creds grpc.ServerOption
	var httpTLS *tls.Config
	if cfg.TLS.Enabled() {
		tc, err := ServerTLS(cfg.TLS, log)
		if err != nil {
			return err
		}
		creds = grpc.Creds(credentials.NewTLS(tc))
		if cfg.HTTPTLS {
			httpTLS = &tls.Config{MinVersion: tls.VersionTLS12, GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
				c, err := tc.GetConfigForClient(hello)
				if err != nil {
					return nil, err
				}
				c = c.Clone()
				c.NextProtos = []string{"http/1.1"}
				return c, nil
			}}
		}
	}
	var lock *lockfiles.Lockfile
	if cfg.Lockfile != "" {
		l, err := lockfiles.Load(cfg.Lockfile)
		if err != nil {
			return err
		}
		lock = l
	}
	// The HTTP listener comes first: its address is the web UI's, which failed
	// actions' reports name.
	var hl net.Listener
	httpAddr := ""
	if cfg.HTTPListen != "" {
		if hl, err = net.Listen("tcp", cfg.HTTPListen); err != nil {
			return fmt.Errorf("listen on %s: %w", cfg.HTTPListen, err)
		}
		defer hl.Close()
		httpAddr = hl.Addr().String()
	}
	mem := newBudget(cfg.Limits)
	mem.Register(reg)
	work := limits.NewWork(cfg.Limits.ClientCPUs, cfg.Limits.ClientCPUsAlways)
	work.Register(reg)
	opts := cfg.Options
	opts.Primary, opts.Logger, opts.Registerer, opts.Pinner = true, log, reg, pinner(lock)
	opts.Memory, opts.ClientQueued, opts.Work = mem, cfg.Limits.ClientQueued, work
	cl, err := joinCluster(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer cl.close()
	if cl != nil {
		opts.Scheduler = cl
	}
	var hist atomic.Pointer[history.Index] // opened once the engine holds the data dir
	publicURL := cfg.PublicURL
	if hl != nil {
		opts.Observe = observer(&hist)
		if publicURL == "" {
			scheme := "http"
			if httpTLS != nil {
				scheme = "https"
			}
			publicURL = scheme + "://" + httpAddr
		}
		opts.ActionURL = actionURL(publicURL)
	}
	eng, err := engine.Open(ctx, opts)
	if err != nil {
		return err
	}
	defer eng.Close()
	if err := cl.startSequencer(ctx, eng, reg); err != nil {
		return err
	}
	defer cl.stopSequencer()
	if hl != nil {
		// After Open took the store's primary lock: a second server on this data dir
		// is refused there, with its reason, not here after a lock timeout.
		h, err := openHistory(opts.Data, log)
		if err != nil {
			return err
		}
		defer h.Close()
		hist.Store(h)
	}
	ropts := reapi.Options{AllowClientACWrites: cfg.AllowClientACWrites, Logger: log, Memory: mem,
		ClientUploads: cfg.Limits.ClientUploads, MaxUploads: cfg.Limits.MaxUploads, ClientTrees: cfg.Limits.ClientTrees, Work: work}
	if cfg.Storage.S3 == nil {
		// With shared storage --max-size bounds the local tier only: uploads go to the
		// bucket, and a blob larger than the tier is not kept in it.
		ropts.StoreSpace = mem.StoreSpace(int64(cfg.MaxSize))
	}
	if !cfg.Execution.Disabled {
		ropts.ExecutionCapabilities = &repb.ExecutionCapabilities{
			DigestFunction:  repb.DigestFunction_SHA256,
			DigestFunctions: []repb.DigestFunction_Value{repb.DigestFunction_SHA256},
			ExecEnabled:     true,
		}
	}
	ac := eng.AC
	if cfg.AllowClientACWrites {
		// Results clients upload live apart from the executor's: a data dir served
		// cache-only today and with execution tomorrow never executes from them.
		ac = cache.WithNamespace(ac, ClientACNamespace)
	}
	// Results clients write record who wrote them (the executor's, who asked: Request.Owner).
	srv := reapi.New(eng.CAS, auth.RecordWrites(ac), ropts)
	defer srv.Close()
	obs := reapi.NewObserver(reg, log)
	gopts := append(obs.ServerOptions(), grpc.MaxRecvMsgSize(reapi.MaxMessageSize), grpc.MaxConcurrentStreams(maxStreams))
	if creds != nil {
		gopts = append(gopts, creds)
	}
	// After the observer (refused calls are counted), before everything else (which
	// then sees the caller: auth.CallerFrom).
	authn := newAuthenticator(verifier, policy, cfg.OIDC, eng.Revocations, log)
	gopts = append(gopts, authn.ServerOptions()...)
	// Each call waits for its client's turn, the client named as authn established it
	// (a token's identity, else its certificate's, else its address).
	gopts = append(gopts, reapi.CallLimit(limits.NewCalls(mem, cfg.Limits.ClientCalls), work)...)
	if policy != nil {
		log.Info("authorization policy", "file", cfg.AuthzFile, "rules", policy.String())
	}
	for _, is := range cfg.OIDC.pairs() {
		log.Info("oidc issuer trusted", "issuer", is.URL, "audience", is.Audience, "max_ttl", cfg.OIDC.MaxTTL)
	}
	g := grpc.NewServer(gopts...)
	srv.Register(g)
	if eng.Scheduler != nil {
		execution.NewServer(eng.Scheduler, log, audit.Open(string(cfg.Data))).Register(g)
	}
	assets, err := asset.New(eng.CAS, asset.Config{Lockfile: lock, Allow: cfg.FetchAllow, SizeOf: eng.SizeOf, Logger: log})
	if err != nil {
		return err
	}
	assets.Register(g)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(g, hs)
	reflection.Register(g)

	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", cfg.Listen, err)
	}
	if tcp, ok := lis.Addr().(*net.TCPAddr); ok && !tcp.IP.IsLoopback() && cfg.TLS.ClientCA == "" && verifier == nil {
		log.Warn("listening beyond loopback without client certificates: anyone who reaches the port can use this server (see --tls-client-ca)", "grpc", lis.Addr().String())
	}
	var httpSrv *http.Server
	webCtx, stopWeb := context.WithCancel(ctx)
	defer stopWeb()
	if hl != nil {
		web, err := startWeb(webCtx, eng, hist.Load(), reg, cfg.Version, cl, log)
		if err != nil {
			lis.Close()
			return err
		}
		if policy != nil && policy.UsesCertificates() && httpTLS == nil {
			log.Warn("web UI: --authz names clients by certificates but --http-tls is not set, so no HTTP client has one to be named by")
		}
		mux := http.NewServeMux()
		mux.Handle("/", requirePermission(authn, auth.PermRead, web))
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
			resp, err := hs.Check(r.Context(), &healthpb.HealthCheckRequest{})
			if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
				http.Error(w, "not serving", http.StatusServiceUnavailable)
				return
			}
			fmt.Fprintln(w, "ok")
		})
		httpSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		if httpTLS != nil {
			hl = tls.NewListener(hl, httpTLS)
		}
		go httpSrv.Serve(hl)
	}

	errc := make(chan error, 1)
	go func() { errc <- g.Serve(lis) }()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	log.Info("kiln serving", "grpc", lis.Addr().String(), "http", httpAddr, "ui", publicURL, "data", string(cfg.Data),
		"store", eng.Store.String(), "max_size", cfg.MaxSize, "client_ac_writes", cfg.AllowClientACWrites, "tls", cfg.TLS.Enabled(), "client_certificates", cfg.TLS.ClientCA != "",
		"execution", !cfg.Execution.Disabled, "cluster", cfg.Cluster.String(), "max_memory", mem.Total(), "client_memory", mem.PerClient())
	if hl != nil {
		remove, err := ui.RecordBase(cfg.Data.UIURL(), publicURL)
		if err != nil {
			log.Warn("cannot record the web UI's URL for the CLI", "err", err)
		}
		defer remove()
	}
	if cfg.Ready != nil {
		cfg.Ready(lis.Addr().String(), httpAddr)
	}

	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down: draining calls in flight")
	hs.Shutdown()
	stopped := make(chan struct{})
	go func() { g.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(drainTimeout):
		log.Warn("drain timed out; closing remaining calls")
		g.Stop()
	}
	if httpSrv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		httpSrv.Shutdown(sctx)
		cancel()
	}
	if err := <-errc; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return err
	}
	log.Info("stopped")
	return nil
}

// pinner returns the lockfile as a toolchain tag pinner, or none.
func pinner(l *lockfiles.Lockfile) toolchains.TagPinner {
	if l == nil {
		return nil
	}
	return l
}
