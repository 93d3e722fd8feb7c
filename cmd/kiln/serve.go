package main

import (
	"os"
	"os/signal"
	"syscall"

	"github.com/kilnbuild/kiln/engine"
	"github.com/spf13/cobra"
)

func newServeCmd() *cobra.Command {
	var (
		cfg     engine.ServerConfig
		data    string
		maxSize string
		logFlag logFlags
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
			cfg.Data = engine.DataDir(data)
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
	f.StringVar(&cfg.Lockfile, "lockfile", "", "Remote Asset API: serve only the downloads pinned in this kiln.lock")
	f.StringSliceVar(&cfg.FetchAllow, "fetch-allow", nil, "Remote Asset API: host or host:port downloads may come from (repeatable; none by default)")
	addDataFlag(cmd, &data)
	logFlag.register(cmd)
	return cmd
}
