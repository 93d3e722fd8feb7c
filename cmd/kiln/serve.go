package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/kilnbuild/kiln/engine"
	"github.com/kilnbuild/kiln/engine/server"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// newServeCmd is kiln serve; it hands the resolved configuration to serve
// (server.Serve, or a test's stand-in).
func newServeCmd(serve func(context.Context, server.Config) error) *cobra.Command {
	var (
		cfg         server.Config
		configFile  string
		printConfig bool
	)
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Serve the Remote Execution API (CAS, ByteStream, ActionCache, Capabilities)",
		Long: `Serve the Remote Execution API (CAS, ByteStream, ActionCache, Execution,
Capabilities, Remote Asset Fetch) from the data dir.

Every flag can also be set in a configuration file (--config, YAML or JSON), under
the flag's name as its key; flags given on the command line override the file.
--print-config prints the configuration as it would run, in a form --config reads.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			asJSON := false
			if configFile != "" {
				b, err := os.ReadFile(configFile)
				if err != nil {
					return &exitError{code: 2, msg: fmt.Sprintf("--config: %v", err)}
				}
				if err := loadUnderFlags(cmd.Flags(), func() error { return cfg.Load(bytes.NewReader(b), configFile) }); err != nil {
					return &exitError{code: 2, msg: statusErr(err).Error()}
				}
				asJSON = bytes.HasPrefix(bytes.TrimSpace(b), []byte("{"))
			}
			if err := cfg.Check(); err != nil {
				return &exitError{code: 2, msg: statusErr(err).Error()}
			}
			logger, err := newLogger(cfg.LogLevel, cfg.LogFormat)
			if err != nil {
				return &exitError{code: 2, msg: err.Error()}
			}
			cfg = cfg.Resolved()
			if printConfig {
				out, err := cfg.Marshal(asJSON)
				if err != nil {
					return err
				}
				_, err = cmd.OutOrStdout().Write(out)
				return err
			}
			cfg.Version, cfg.Logger = version, logger
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return serve(ctx, cfg)
		},
	}
	f := cmd.Flags()
	f.StringVar(&configFile, "config", "", "configuration file (YAML or JSON; keys are these flags' names); flags given here override it")
	f.BoolVar(&printConfig, "print-config", false, "print the configuration as kiln serve would run it (defaults resolved), in a form --config reads, and exit")
	f.StringVar(&cfg.Listen, "listen", "127.0.0.1:8980", "gRPC listen address")
	f.StringVar(&cfg.HTTPListen, "http-listen", "127.0.0.1:8981", "HTTP address of the web UI, /metrics and /healthz (empty: off)")
	f.StringVar(&cfg.PublicURL, "public-url", "", "the web UI's URL as clients reach it, for the page links in failed actions' reports (default: http(s)://<--http-listen address>)")
	f.Var(&cfg.MaxSize, "max-size", "bound on the store's size (with --storage: on its local tier), e.g. 50GiB (0: unbounded)")
	f.BoolVar(&cfg.AllowClientACWrites, "allow-client-ac-writes", false, "let clients write the action cache (cache-only deployments; never with remote execution)")
	f.BoolVar(&cfg.Fsync, "fsync", false, "fsync every blob before it becomes visible (durability across power loss)")
	l := &cfg.Limits
	f.Var(&l.MaxMemory, "max-memory", "memory budget that uploads, reads, tree walks and queued input trees are charged to, e.g. 4GiB (0: a quarter of the machine's memory)")
	f.Var(&l.ClientMemory, "client-max-memory", "most of --max-memory one client may hold (0: a quarter of it)")
	f.IntVar(&l.ClientUploads, "client-max-uploads", 0, "ByteStream uploads in progress per client (0: 512)")
	f.IntVar(&l.MaxUploads, "max-uploads", 0, "ByteStream uploads in progress in all (0: 4096)")
	f.IntVar(&l.ClientTrees, "client-max-trees", 0, "GetTree calls in progress per client (0: 8)")
	f.IntVar(&l.ClientQueued, "client-max-queued", 0, "executions per client waiting for a slot (0: 1000)")
	f.Float64Var(&l.ClientCalls, "client-max-calls", 0, "calls one client may start per second; more wait their turn (0: 1000)")
	f.Float64Var(&l.ClientCPUs, "client-max-cpus", 0, "cores one client's decompressing, hashing and tree parsing may use over time while other clients have calls in progress, e.g. 0.5 (0: an eighth of the CPUs, at least 0.25)")
	f.BoolVar(&l.ClientCPUsAlways, "client-max-cpus-always", false, "hold a client to --client-max-cpus even when it is alone on the server (a machine shared with other work)")
	ex := &cfg.Execution
	f.BoolVar(&ex.Disabled, "no-execution", false, "serve storage only (no Execution service, no sandbox)")
	f.StringVar(&ex.DefaultToolchain, "default-toolchain", "", "container-image for actions that name none (a pinned reference)")
	f.IntVar(&ex.Concurrency, "concurrency", 0, "actions run at once (0: number of CPUs)")
	f.IntVar(&ex.Prestart, "prestart", -1, "sandboxes kept prepared ahead of actions (-1: as many as --concurrency)")
	f.IntVar(&ex.MaxQueue, "max-queue", engine.DefaultMaxQueue, "actions waiting for a slot before Execute answers RESOURCE_EXHAUSTED")
	f.DurationVar(&ex.DefaultTimeout, "default-timeout", engine.DefaultTimeout, "timeout of actions that set none")
	f.DurationVar(&ex.MaxTimeout, "max-timeout", engine.DefaultMaxTimeout, "longest timeout an action may ask for")
	f.Float64Var(&ex.VerifyRate, "verify-rate", 0, "fraction of actions (sampled by digest) run twice with variations before caching; see docs/verify.md")
	f.BoolVar(&ex.IgnoreUnknownPlatformProperties, "ignore-unknown-platform-properties", false, "accept platform properties kiln does not understand instead of refusing the action")
	f.StringVar(&cfg.Lockfile, "lockfile", "", "Remote Asset API: serve only the downloads pinned in this kiln.lock")
	f.StringSliceVar(&cfg.FetchAllow, "fetch-allow", nil, "Remote Asset API: host or host:port downloads may come from (repeatable; none by default)")
	f.StringVar(&cfg.TLS.Cert, "tls-cert", "", "PEM certificate chain: serve gRPC over TLS (files are re-read when they change)")
	f.StringVar(&cfg.TLS.Key, "tls-key", "", "PEM private key of --tls-cert")
	f.StringVar(&cfg.TLS.ClientCA, "tls-client-ca", "", "PEM CA certificates: require clients to present a certificate they signed (mTLS)")
	f.BoolVar(&cfg.HTTPTLS, "http-tls", false, "serve /metrics and /healthz over TLS too, with --tls-cert (and client certificates with --tls-client-ca)")
	f.StringVar(&cfg.AuthzFile, "authz", "", "authorization policy (JSON): what each client certificate, SPIFFE ID or token may do (read, write, execute, fetch); see docs/serve.md")
	f.StringArrayVar(&cfg.OIDC.Issuers, "oidc-issuer", nil, "trust bearer tokens of this OIDC issuer (https URL; repeatable, each with an --oidc-audience); calls then need a token or a client certificate")
	f.StringArrayVar(&cfg.OIDC.Audiences, "oidc-audience", nil, "the audience tokens of the matching --oidc-issuer must name (this deployment's name)")
	f.DurationVar(&cfg.OIDC.MaxTTL, "oidc-max-ttl", 0, "refuse tokens that live longer than this (e.g. 1h; 0: any)")
	f.BoolVar(&cfg.OIDC.AllowPlaintext, "oidc-allow-plaintext", false, "accept bearer tokens over plaintext gRPC beyond loopback (they can be read and replayed on the way)")
	f.StringVar(&cfg.ExecutorKeyFile, "key-file", "", "executor signing key (ed25519, PKCS #8 PEM); default: the data dir's own key, created on first start")
	addDataFlag(cmd, (*string)(&cfg.Data))
	addStorageFlag(cmd, &cfg.Storage)
	addClusterFlags(cmd, &cfg.Cluster, "serve")
	f.StringVar(&cfg.LogLevel, "log-level", "info", "log level: debug, info, warn, error")
	f.StringVar(&cfg.LogFormat, "log-format", "text", "log format: text or json")
	return cmd
}

// loadUnderFlags runs load (which reads a configuration file onto the variables the
// flags are bound to) under the command line: every flag given on it is set again
// afterwards, so it overrides the file, while the file overrides the defaults.
func loadUnderFlags(fs *pflag.FlagSet, load func() error) error {
	type given struct {
		f     *pflag.Flag
		value string
		slice []string
	}
	var saved []given
	fs.Visit(func(f *pflag.Flag) { // the flags set on the command line
		g := given{f: f, value: f.Value.String()}
		if sv, ok := f.Value.(pflag.SliceValue); ok {
			g.slice = sv.GetSlice()
		}
		saved = append(saved, g)
	})
	if err := load(); err != nil {
		return err
	}
	for _, g := range saved {
		var err error
		if sv, ok := g.f.Value.(pflag.SliceValue); ok {
			err = sv.Replace(g.slice)
		} else {
			err = g.f.Value.Set(g.value)
		}
		if err != nil {
			return fmt.Errorf("--%s: %v", g.f.Name, err)
		}
	}
	return nil
}
