// Package engine opens a data dir and composes kiln from its parts: the store, the
// toolchains, the signer, the executor and the scheduler (packages below engine/).
package engine

import "path/filepath"

// DataDir is the layout of a kiln data directory, shared by `kiln serve` and every CLI
// command (several may use one directory at once).
type DataDir string

// Store is the on-disk CAS and action cache (package cache/disk).
func (d DataDir) Store() string { return filepath.Join(string(d), "store") }

// Toolchains holds imported toolchain images and their unpacked roots.
func (d DataDir) Toolchains() string { return filepath.Join(string(d), "toolchains") }

// Keys holds the executor's signing keys; it is never mounted into a sandbox.
func (d DataDir) Keys() string { return filepath.Join(string(d), "keys") }

// Log holds the transparency log of link envelopes.
func (d DataDir) Log() string { return filepath.Join(string(d), "log") }

// History holds the web UI's index of executions (package engine/history); it is
// derived from the log and rebuilt from it when removed, but for what only the server
// saw (clients, cache hits, time per phase).
func (d DataDir) History() string { return filepath.Join(string(d), "history") }

// Sandbox holds per-run sandbox state and exec roots.
func (d DataDir) Sandbox() string { return filepath.Join(string(d), "sandbox") }

// UIURL is where a running `kiln serve` with a web UI records its public URL, so that
// CLI commands on the same data dir can name an action's page in their errors.
func (d DataDir) UIURL() string { return filepath.Join(string(d), "ui-url") }
