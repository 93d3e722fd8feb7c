package server

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"path"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/tlog"
	"github.com/kilnbuild/kiln/engine/history"
	"github.com/kilnbuild/kiln/engine/scheduler"
	"github.com/kilnbuild/kiln/engine/ui"
	"github.com/prometheus/client_golang/prometheus"
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
	base = strings.TrimRight(base, "/")
	return func(d cache.Digest) string { return base + ui.ActionPath(d) }
}

// startWeb builds the web UI over the open engine and starts following the log and
// sampling the metrics until ctx ends.
func startWeb(ctx context.Context, eng *engine.Engine, h *history.Index, reg *prometheus.Registry, version string, log *slog.Logger) (http.Handler, error) {
	lk := eng.Signer.Keyring().Log()
	lv, err := lk.Verifier()
	if err != nil {
		return nil, err
	}
	store := eng.Signer.Store()
	go h.Follow(ctx, history.Links{Log: tlog.NewReader(attest.PathsFor(string(eng.Data)).Log, lv), Envelopes: store}, followEvery)
	sampler := ui.NewSampler(reg, 0, nil)
	go sampler.Run(ctx, sampleEvery)
	return ui.New(ui.Config{CAS: eng.CAS, Attest: store, Keys: eng.Signer.Keyring(), Quarantine: eng.Quarantine,
		Toolchains: eng.Toolchains, History: h, Metrics: sampler, Version: version, Logger: log})
}

// httpCaller names the caller of an HTTP request as the gRPC side names the caller of
// a call: today the common name of its verified client certificate. This is the one
// seam between HTTP and the identities the policy knows (engine/auth's certificate,
// SPIFFE and token identities take its place when they land).
func httpCaller(r *http.Request) (string, bool) {
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 || len(r.TLS.VerifiedChains[0]) == 0 {
		return "", false
	}
	return r.TLS.VerifiedChains[0][0].Subject.CommonName, true
}

// allows reports whether the policy grants perm to the client with this common name.
func (p *AuthzPolicy) allows(cn, perm string) bool {
	for _, r := range p.Rules {
		if ok, _ := path.Match(r.Subject, cn); ok {
			return slices.Contains(r.Allow, perm)
		}
	}
	return false
}

// requirePermission lets through only the requests whose caller the policy grants
// perm; without a policy every client that reached the listener may (as on gRPC). A
// refusal is 403 with the reason and nothing else.
func requirePermission(p *AuthzPolicy, perm string, next http.Handler) http.Handler {
	if p == nil {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cn, ok := httpCaller(r)
		msg := ""
		switch {
		case !ok:
			msg = "no verified client certificate: the server's authorization policy names clients by theirs (serve the UI with --http-tls and --tls-client-ca)"
		case !p.allows(cn, perm):
			msg = fmt.Sprintf("client %q may not %s (policy %s)", cn, perm, p.file)
		}
		if msg != "" {
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			w.Header().Set("X-Content-Type-Options", "nosniff")
			w.Header().Set("Content-Security-Policy", ui.ContentSecurityPolicy)
			w.WriteHeader(http.StatusForbidden)
			fmt.Fprintln(w, "403 forbidden: "+msg)
			return
		}
		next.ServeHTTP(w, r)
	})
}
