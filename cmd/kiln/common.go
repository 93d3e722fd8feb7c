package main

import (
	"os"
	"path/filepath"

	"github.com/spf13/cobra"
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
