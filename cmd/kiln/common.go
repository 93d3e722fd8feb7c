package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

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
func addStorageFlag(cmd *cobra.Command, p *string) {
	cmd.Flags().StringVar(p, "storage", "", "shared storage: s3://BUCKET[/PREFIX]?endpoint=URL&region=R[&path-style=true] (credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, shared config or instance role); empty: the data dir only")
}

// parseSize reads a byte count such as 1048576, 512MiB, 50G or 2TB (powers of 1024).
func parseSize(s string) (int64, error) {
	t := strings.TrimSpace(strings.ToUpper(s))
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		m      int64
	}{{"TIB", 1 << 40}, {"GIB", 1 << 30}, {"MIB", 1 << 20}, {"KIB", 1 << 10},
		{"TB", 1 << 40}, {"GB", 1 << 30}, {"MB", 1 << 20}, {"KB", 1 << 10},
		{"T", 1 << 40}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}, {"B", 1}} {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSpace(strings.TrimSuffix(t, u.suffix)), u.m
			break
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n < 0 || n > math.MaxInt64/mult {
		return 0, fmt.Errorf("bad size %q: want a byte count like 1048576, 512MiB or 50GiB", s)
	}
	return n * mult, nil
}

// logFlags are the logging flags of long-running commands.
type logFlags struct {
	level  string
	format string
}

func (l *logFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&l.level, "log-level", "info", "log level: debug, info, warn, error")
	cmd.Flags().StringVar(&l.format, "log-format", "text", "log format: text or json")
}

// logger returns a slog.Logger writing to stderr.
func (l *logFlags) logger() (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(l.level)); err != nil {
		return nil, fmt.Errorf("bad --log-level %q: want debug, info, warn or error", l.level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch l.format {
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("bad --log-format %q: want text or json", l.format)
}

// statusErr turns a gRPC status error into a plain one-line error for the CLI.
func statusErr(err error) error {
	if st, ok := status.FromError(err); ok {
		return errors.New(st.Message())
	}
	return err
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
