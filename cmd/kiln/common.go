package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine"
	"github.com/kilnbuild/kiln/internal/bytesize"
	"github.com/spf13/cobra"
	"google.golang.org/grpc/status"
)

// defaultDataDir is where every subcommand keeps its store unless --data says otherwise:
// $XDG_CACHE_HOME/kiln, else ~/.cache/kiln.
func defaultDataDir() string {
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "kiln")
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".cache", "kiln")
	}
	return filepath.Join(os.TempDir(), "kiln")
}

// addDataFlag registers the --data flag shared by every subcommand that touches the store.
func addDataFlag(cmd *cobra.Command, p *string) {
	cmd.Flags().StringVar(p, "data", defaultDataDir(), "data directory (store, toolchains, keys, logs)")
}

// addStorageFlag registers --storage, shared by every subcommand that reads or writes
// the store: with it the CAS and action cache live in a bucket and the data dir's store
// is their local tier (docs/storage.md). Credentials come from the AWS SDK's chain.
func addStorageFlag(cmd *cobra.Command, p *engine.StorageConfig) {
	cmd.Flags().Var(p, "storage", "shared storage: s3://BUCKET[/PREFIX]?endpoint=URL&region=R[&path-style=true] (credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, shared config or instance role); empty: the data dir only")
}

// parseSize reads a byte count such as 1048576, 512MiB, 50G or 2TB (powers of 1024).
func parseSize(s string) (int64, error) {
	n, err := bytesize.Parse(s)
	return int64(n), err
}

// newLogger returns a slog.Logger writing to stderr at level, in format text or json.
func newLogger(level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("bad --log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("bad --log-format %q: want text or json", format)
}

// statusErr turns a gRPC status error into a plain one-line error for the CLI: its
// message, and the blobs a MISSING PreconditionFailure names (so whoever reads the
// line knows what to upload or restore). nil stays nil.
func statusErr(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	msg := st.Message()
	if missing := cache.MissingFromError(err); len(missing) > 0 {
		const most = 10
		names := make([]string, 0, most+1)
		for i, d := range missing {
			if i == most {
				names = append(names, fmt.Sprintf("and %d more", len(missing)-most))
				break
			}
			names = append(names, "sha256:"+d.String())
		}
		msg += " (missing: " + strings.Join(names, ", ") + ")"
	}
	return errors.New(msg)
}

// quietLogger logs warnings and errors only, for CLI commands.
func quietLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// sortedKeys returns m's keys in order.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// printJSON writes v as indented JSON, the --json output of every command.
func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	return enc.Encode(v)
}
