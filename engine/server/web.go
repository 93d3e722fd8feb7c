package server

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"path"
	"sync/atomic"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/auth"
	"github.com/kilnbuild/kiln/engine/cluster"
	"github.com/kilnbuild/kiln/engine/history"
	"github.com/kilnbuild/kiln/engine/scheduler"
	"github.com/kilnbuild/kiln/engine/ui"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/status"
)

// Web UI timings: how often the history follows the log, and the overview samples
// the metrics.
const (
	followEvery = 500 * time.Millisecond
	sampleEvery = 10 * time.Second
)

// openHistory opens the data dir's history index for the web UI.
func openHistory(data engine.DataDir, log *slog.Logger) (*history.Index, error) {
	return history.Open(path.Join(data.History(), "index.db"), log)
}

// observer records every finished execution and cache hit in the history, once it
// is open.
func observer(hp *atomic.Pointer[history.Index]) func(scheduler.Finished) {
	return func(f scheduler.Finished) {
		h := hp.Load()
		if h == nil {
			return
		}
		h.Record(history.RunFromExecution(history.Execution{Instance: f.Instance, Action: f.Action, Clients: f.Owners,
			Submitted: f.Submitted, Done: f.Done, Outcome: f.Outcome, Response: f.Response, Attest: f.Attest}))
	}
}

// actionURL makes an action's page URL from the UI's public base URL.
func actionURL(base string) func(cache.Digest) string {
	return func(d cache.Digest) string { return ui.ActionURL(base, d) }
}

// startWeb builds the web UI over the open engine and starts following the log and
// sampling the metrics until ctx ends. A cluster frontend's UI trusts the cluster's
// keys and follows its log: the one its sequencer publishes in the bucket (or, with
// --cluster embedded, the one in this data dir).
func startWeb(ctx context.Context, eng *engine.Engine, h *history.Index, reg *prometheus.Registry, version string, cl *clusterFrontend, log *slog.Logger) (http.Handler, error) {
	lk := eng.Signer.Keyring().Log()
	lv, err := lk.Verifier()
	if err != nil {
		return nil, err
	}
	store := eng.Signer.Store()
	cfg := ui.Config{CAS: eng.CAS, Attest: store, Keys: eng.Signer.Keyring(), Quarantine: eng.Quarantine,
		Toolchains: eng.Toolchains, History: h, Version: version, Logger: log}
	if cl == nil {
		go h.Follow(ctx, history.Links{Log: store.LogReader(lv), Envelopes: store}, followEvery)
	} else {
		if cl.embedded == nil && eng.Bucket != nil {
			store = store.WithLog(cluster.SharedLog(eng.Bucket))
			cfg.Attest = store
		}
		cfg.Cluster = cl.conn.TrustSet
		go followCluster(ctx, h, store, cl, log)
	}
	sampler := ui.NewSampler(reg, 0, nil)
	go sampler.Run(ctx, sampleEvery)
	cfg.Metrics = sampler
	return ui.New(cfg)
}

// followCluster follows the cluster's log once its sequencer has published its key.
func followCluster(ctx context.Context, h *history.Index, store *attest.Store, cl *clusterFrontend, log *slog.Logger) {
	for {
		t, err := cl.conn.TrustSet(ctx)
		if err == nil && t.Log != nil {
			lv, err := t.Log.Verifier()
			if err != nil {
				log.Warn("history: the cluster's log key", "err", err)
				return
			}
			h.Follow(ctx, history.Links{Log: store.LogReader(lv), Envelopes: store}, followEvery)
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(followEvery):
		}
	}
}

// requirePermission lets through only the requests whose caller may use perm, as
// the gRPC side decides it (package engine/auth: the verified client certificate of
// the TLS connection, a bearer token in the Authorization header, the revocation list,
// the policy); without a policy or an issuer every client that reached the listener
// may. A refusal is 403 with the reason and nothing else.
func requirePermission(a *auth.Authenticator, perm string, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, err := a.AuthenticateHTTP(r, perm); err != nil {
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			w.Header().Set("X-Content-Type-Options", "nosniff")
			w.Header().Set("Content-Security-Policy", ui.ContentSecurityPolicy)
			w.WriteHeader(http.StatusForbidden)
			fmt.Fprintln(w, "403 forbidden: "+status.Convert(err).Message())
			return
		}
		next.ServeHTTP(w, r)
	})
}
