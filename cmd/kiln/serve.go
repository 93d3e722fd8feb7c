package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/kilnbuild/kiln/engine"
	"github.com/kilnbuild/kiln/engine/auth"
	"github.com/spf13/cobra"
)

func newServeCmd() *cobra.Command {
	var (
		cfg                  engine.ServerConfig
		data                 string
		maxSize              string
		logFlag              logFlags
		oidcIssuers, oidcAud []string
	)
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Serve the Remote Execution API (CAS, ByteStream, ActionCache, Capabilities)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			n, err := parseSize(maxSize)
			if err != nil {
				return err
			}
			cfg.MaxSize = n
			if r := cfg.Execution.VerifyRate; r < 0 || r > 1 || r != r {
				return &exitError{code: 2, msg: fmt.Sprintf("--verify-rate %v: want a fraction from 0 to 1", r)}
			}
			if len(oidcIssuers) != len(oidcAud) {
				return &exitError{code: 2, msg: fmt.Sprintf("%d --oidc-issuer but %d --oidc-audience: give them in pairs, one audience per issuer", len(oidcIssuers), len(oidcAud))}
			}
			for i := range oidcIssuers {
				cfg.OIDC.Issuers = append(cfg.OIDC.Issuers, auth.Issuer{URL: oidcIssuers[i], Audience: oidcAud[i]})
			}
			cfg.Data = engine.DataDir(data)
			cfg.Version = version
			if cfg.Logger, err = logFlag.logger(); err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return engine.Serve(ctx, cfg)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.Listen, "listen", "127.0.0.1:8980", "gRPC listen address")
	f.StringVar(&cfg.HTTPListen, "http-listen", "127.0.0.1:8981", "HTTP address for /metrics and /healthz (empty: off)")
	f.StringVar(&maxSize, "max-size", "0", "bound on the store's size, e.g. 50GiB (0: unbounded)")
	f.BoolVar(&cfg.AllowClientACWrites, "allow-client-ac-writes", false, "let clients write the action cache (cache-only deployments; never with remote execution)")
	f.BoolVar(&cfg.Fsync, "fsync", false, "fsync every blob before it becomes visible (durability across power loss)")
	ex := &cfg.Execution
	f.BoolVar(&ex.Disabled, "no-execution", false, "serve storage only (no Execution service, no sandbox)")
	f.StringVar(&ex.DefaultToolchain, "default-toolchain", "", "container-image for actions that name none (a pinned reference)")
	f.IntVar(&ex.Concurrency, "concurrency", 0, "actions run at once (0: number of CPUs)")
	f.IntVar(&ex.MaxQueue, "max-queue", 10000, "actions waiting for a slot before Execute answers RESOURCE_EXHAUSTED")
	f.DurationVar(&ex.DefaultTimeout, "default-timeout", 15*time.Minute, "timeout of actions that set none")
	f.DurationVar(&ex.MaxTimeout, "max-timeout", time.Hour, "longest timeout an action may ask for")
	f.Float64Var(&ex.VerifyRate, "verify-rate", 0, "fraction of actions (sampled by digest) run twice with variations before caching; see docs/verify.md")
	f.BoolVar(&ex.IgnoreUnknownPlatformProperties, "ignore-unknown-platform-properties", false, "accept platform properties kiln does not understand instead of refusing the action")
	f.StringVar(&cfg.Lockfile, "lockfile", "", "Remote Asset API: serve only the downloads pinned in this kiln.lock")
	f.StringSliceVar(&cfg.FetchAllow, "fetch-allow", nil, "Remote Asset API: host or host:port downloads may come from (repeatable; none by default)")
	f.StringVar(&cfg.TLS.Cert, "tls-cert", "", "PEM certificate chain: serve gRPC over TLS (files are re-read when they change)")
	f.StringVar(&cfg.TLS.Key, "tls-key", "", "PEM private key of --tls-cert")
	f.StringVar(&cfg.TLS.ClientCA, "tls-client-ca", "", "PEM CA certificates: require clients to present a certificate they signed (mTLS)")
	f.BoolVar(&cfg.HTTPTLS, "http-tls", false, "serve /metrics and /healthz over TLS too, with --tls-cert (and client certificates with --tls-client-ca)")
	f.StringVar(&cfg.AuthzFile, "authz", "", "authorization policy (JSON): what each client certificate, SPIFFE ID or token may do (read, write, execute, fetch); see docs/serve.md")
	f.StringArrayVar(&oidcIssuers, "oidc-issuer", nil, "trust bearer tokens of this OIDC issuer (https URL; repeatable, each with an --oidc-audience); calls then need a token or a client certificate")
	f.StringArrayVar(&oidcAud, "oidc-audience", nil, "the audience tokens of the matching --oidc-issuer must name (this deployment's name)")
	f.DurationVar(&cfg.OIDC.MaxTTL, "oidc-max-ttl", 0, "refuse tokens that live longer than this (e.g. 1h; 0: any)")
	f.BoolVar(&cfg.OIDC.AllowPlaintext, "oidc-allow-plaintext", false, "accept bearer tokens over plaintext gRPC beyond loopback (they can be read and replayed on the way)")
	f.StringVar(&cfg.ExecutorKeyFile, "key-file", "", "executor signing key (ed25519, PKCS #8 PEM); default: the data dir's own key, created on first start")
	addDataFlag(cmd, &data)
	logFlag.register(cmd)
	return cmd
}
