package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"os"
	"strings"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/engine/attest/tlog"
	"github.com/kilnbuild/kiln/engine/cluster"
	"github.com/spf13/cobra"
	"golang.org/x/mod/sumdb/note"
)

// tessera logs through klog; CLI commands print only their own results. A server
// that wants those logs calls tlog.RouteLibraryLogs with its logger at start, before
// it opens a log (klog's logger must not change while tessera runs).
func init() { tlog.RouteLibraryLogs(nil) }

func newLogCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "log",
		Short: "The transparency log of link envelopes: checkpoints, inclusion and consistency proofs",
	}
	c.AddCommand(newLogCheckpointCmd(), newLogProveCmd(), newLogConsistencyCmd())
	return c
}

type tlogFlags struct {
	dataDir string
	storage engine.StorageConfig
	cluster cluster.Config
	logKey  string
	asJSON  bool
}

func (f *tlogFlags) add(c *cobra.Command) {
	addDataFlag(c, &f.dataDir)
	addStorageFlag(c, &f.storage)
	addClusterFlags(c, &f.cluster, "verify")
	c.Flags().Lookup("storage").Usage = "shared storage of a kiln cluster: read the log its sequencer publishes there (log/) when the data dir does not hold it; " + c.Flags().Lookup("storage").Usage
	c.Flags().Lookup("cluster").Usage = "take the log key from this kiln cluster (its sequencer's)"
	c.Flags().StringVar(&f.logKey, "log-key", "", "the log's checkpoint verifier key (a note vkey, or a file holding one); default: --cluster's, else the data dir's keyring")
	c.Flags().BoolVar(&f.asJSON, "json", false, "print JSON")
}

// verifier resolves the key checkpoints are checked with: --log-key, --cluster's, or the
// data dir's keyring.
func (f *tlogFlags) verifier(ctx context.Context) (note.Verifier, error) {
	ct, err := clusterTrust(ctx, f.cluster)
	if err != nil {
		return nil, err
	}
	v, _, err := resolveLogKey(ctx, f.logKey, keys.Trust{Log: ct.Log}, f.dataDir)
	return v, err
}

// reader opens the log for reading, checking checkpoints with the log key: the data
// dir's, or with --storage, the one a cluster's sequencer publishes in the bucket when
// the data dir does not hold that log. store reads envelopes (with --storage, from the
// bucket too).
func (f *tlogFlags) reader(ctx context.Context) (r *tlog.Reader, store *attest.Store, done func(), err error) {
	v, err := f.verifier(ctx)
	if err != nil {
		return nil, nil, nil, err
	}
	store, done, err = openLogStore(ctx, f.dataDir, f.storage, v)
	if err != nil {
		return nil, nil, nil, err
	}
	return store.LogReader(v), store, done, nil
}

func b64(h []byte) string { return base64.StdEncoding.EncodeToString(h) }

func b64s(hs [][]byte) []string {
	out := make([]string, len(hs))
	for i, h := range hs {
		out[i] = b64(h)
	}
	return out
}

func newLogCheckpointCmd() *cobra.Command {
	var f tlogFlags
	c := &cobra.Command{
		Use:   "checkpoint",
		Short: "Print the latest signed checkpoint (verified with the log key)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, _, done, err := f.reader(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			cp, err := r.Checkpoint(cmd.Context())
			if err != nil {
				return err
			}
			if f.asJSON {
				return printJSON(cmd.OutOrStdout(), map[string]any{"origin": cp.Origin, "size": cp.Size, "root": b64(cp.Root), "checkpoint": string(cp.Raw)})
			}
			_, err = cmd.OutOrStdout().Write(cp.Raw)
			return err
		},
	}
	f.add(c)
	return c
}

func newLogProveCmd() *cobra.Command {
	var f tlogFlags
	c := &cobra.Command{
		Use:   "prove ENVELOPE-DIGEST",
		Short: "Prove a link envelope's inclusion in the latest checkpoint (the proof is verified before it is printed)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			r, store, done, err := f.reader(ctx)
			if err != nil {
				return err
			}
			defer done()
			cp, err := r.Checkpoint(ctx)
			if err != nil {
				return err
			}
			entry, err := logEntryFor(ctx, r, cp, args[0])
			if err != nil {
				return err
			}
			d, _ := attest.ParseLinkLogEntry(entry)
			hint, ok := store.LogIndex(d)
			idx, proof, err := r.Include(ctx, entry, hint, ok, cp, nil)
			if err != nil {
				return &exitError{code: 1, msg: fmt.Sprintf("envelope %s: %v", d, err)}
			}
			if f.asJSON {
				return printJSON(cmd.OutOrStdout(), map[string]any{
					"entry": string(entry), "index": idx, "tree_size": cp.Size, "root": b64(cp.Root),
					"leaf_hash": b64(tlog.LeafHash(entry)), "proof": b64s(proof), "checkpoint": string(cp.Raw), "verified": true,
				})
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "entry %q is leaf %d of %d (verified)\n", entry, idx, cp.Size)
			for _, h := range proof {
				fmt.Fprintln(out, b64(h))
			}
			fmt.Fprintf(out, "\n%s", cp.Raw)
			return nil
		},
	}
	f.add(c)
	return c
}

// logEntryFor turns "HASH/SIZE", "HASH" or "sha256:HASH" into the log entry of that link
// envelope; without a size, the log is searched for the hash.
func logEntryFor(ctx context.Context, r *tlog.Reader, cp *tlog.Checkpoint, arg string) ([]byte, error) {
	s := strings.TrimPrefix(arg, "sha256:")
	if strings.Contains(s, "/") {
		d, err := cache.ParseDigest(s)
		if err != nil {
			return nil, &exitError{code: 2, msg: err.Error()}
		}
		return attest.LinkLogEntry(d), nil
	}
	if _, err := cache.NewDigest(s, 0); err != nil {
		return nil, &exitError{code: 2, msg: fmt.Sprintf("%q is not an envelope digest (HASH or HASH/SIZE)", arg)}
	}
	prefix := []byte("link:" + s + "/")
	var found []byte
	err := r.Scan(ctx, cp.Size, func(_ uint64, e []byte) bool {
		if bytes.HasPrefix(e, prefix) {
			found = append([]byte(nil), e...)
			return false
		}
		return true
	})
	if err != nil {
		return nil, err
	}
	if found == nil {
		return nil, &exitError{code: 1, msg: fmt.Sprintf("envelope %s is not in the log (checkpoint size %d)", s, cp.Size)}
	}
	return found, nil
}

func newLogConsistencyCmd() *cobra.Command {
	var f tlogFlags
	var from, to uint64
	var old string
	c := &cobra.Command{
		Use:   "consistency [--old CHECKPOINT | --from SIZE] [--to SIZE]",
		Short: "Prove that an older tree is a prefix of a newer one (the proof is verified before it is printed)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			r, _, done, err := f.reader(ctx)
			if err != nil {
				return err
			}
			defer done()
			cp, err := r.Checkpoint(ctx)
			if err != nil {
				return err
			}
			var root1 []byte
			source1 := "computed from the log's tiles"
			if old != "" {
				b, err := os.ReadFile(old)
				if err != nil {
					return &exitError{code: 2, msg: err.Error()}
				}
				ocp, err := tlog.ParseCheckpoint(b, r.Verifier())
				if err != nil {
					return &exitError{code: 1, msg: fmt.Sprintf("--old %s: %v", old, err)}
				}
				from, root1, source1 = ocp.Size, ocp.Root, "signed checkpoint "+old
			}
			if !cmd.Flags().Changed("to") {
				to = cp.Size
			}
			if from > to || to > cp.Size {
				return &exitError{code: 2, msg: fmt.Sprintf("need from (%d) <= to (%d) <= latest checkpoint size (%d)", from, to, cp.Size)}
			}
			if root1 == nil {
				if root1, err = r.RootAt(ctx, from); err != nil {
					return err
				}
			}
			root2, source2 := cp.Root, "latest signed checkpoint"
			if to != cp.Size {
				if root2, err = r.RootAt(ctx, to); err != nil {
					return err
				}
				source2 = "computed from the log's tiles"
			}
			pv, err := r.Prover(ctx, cp.Size)
			if err != nil {
				return err
			}
			proof, err := pv.Consistency(ctx, from, to)
			if err != nil {
				return err
			}
			if err := tlog.VerifyConsistency(from, root1, to, root2, proof); err != nil {
				return &exitError{code: 1, msg: err.Error()}
			}
			if f.asJSON {
				return printJSON(cmd.OutOrStdout(), map[string]any{
					"from": from, "to": to, "root_from": b64(root1), "root_to": b64(root2),
					"root_from_source": source1, "root_to_source": source2, "proof": b64s(proof), "verified": true,
				})
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "tree %d (%s, %s) is a prefix of tree %d (%s, %s): verified\n", from, b64(root1), source1, to, b64(root2), source2)
			for _, h := range proof {
				fmt.Fprintln(out, b64(h))
			}
			return nil
		},
	}
	f.add(c)
	c.Flags().Uint64Var(&from, "from", 0, "older tree size (its root is computed from the log's tiles)")
	c.Flags().StringVar(&old, "old", "", "older signed checkpoint file (saved from \"kiln log checkpoint\")")
	c.Flags().Uint64Var(&to, "to", 0, "newer tree size (default: the latest checkpoint)")
	return c
}
