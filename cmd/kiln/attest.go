package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/in-toto/in-toto-golang/in_toto"
	"github.com/kilnbuild/kiln/cache/disk"
	"github.com/kilnbuild/kiln/cache/s3"
	"github.com/kilnbuild/kiln/engine"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/engine/attest/tlog"
	"github.com/kilnbuild/kiln/engine/cluster"
	"github.com/spf13/cobra"
	"golang.org/x/mod/sumdb/note"
	"google.golang.org/grpc/status"
)

func newAttestCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "attest",
		Short: "Executor keys, provenance and verification of kiln's signed action links",
	}
	c.AddCommand(newAttestPubkeyCmd(), newAttestKeyCmd(), newAttestProvenanceCmd(), newAttestVerifyCmd(), newVerifySummaryCmd())
	return c
}

// openKeyring opens (creating on first use) the keyring of a data dir.
func openKeyring(ctx context.Context, dataDir string) (*keys.Keyring, error) {
	return keys.Open(ctx, attest.PathsFor(dataDir).Keys, keys.Options{})
}

// openStoreBucket opens the attestation store of a data dir with its CAS (in shared
// storage if storage is set), and the bucket (nil without storage).
func openStoreBucket(ctx context.Context, dataDir string, storage engine.StorageConfig) (*attest.Store, *s3.Bucket, func(), error) {
	cas, _, b, done, err := engine.OpenCAS(ctx, engine.DataDir(dataDir), storage, quietLogger())
	if err != nil {
		return nil, nil, nil, err
	}
	return attest.NewStore(attest.PathsFor(dataDir), engine.AttestationsCAS(cas, b)), b, done, nil
}

// openLogStore opens the attestation store of a data dir reading the log lv names:
// the data dir's own, or with storage, a cluster's published in the bucket
// (cluster.LogFor).
func openLogStore(ctx context.Context, dataDir string, storage engine.StorageConfig, lv note.Verifier) (*attest.Store, func(), error) {
	store, b, done, err := openStoreBucket(ctx, dataDir, storage)
	if err != nil {
		return nil, nil, err
	}
	return cluster.LogFor(store, lv, b), done, nil
}

// writeOutput writes data to path atomically, or to stdout for "" or "-".
func writeOutput(path string, data []byte, stdout io.Writer) error {
	if path == "" || path == "-" {
		_, err := stdout.Write(data)
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

func newAttestPubkeyCmd() *cobra.Command {
	var dataDir string
	var all, asJSON bool
	c := &cobra.Command{
		Use:   "pubkey",
		Short: "Print the active executor public key (PEM) and key id; --all adds retired keys and the log key",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			kr, err := openKeyring(cmd.Context(), dataDir)
			if err != nil {
				return err
			}
			exp, err := kr.Export()
			if err != nil {
				return err
			}
			if !all {
				var act []keys.PublicKey
				for _, k := range exp.Keys {
					if k.KeyID == exp.ActiveKeyID {
						act = append(act, k)
					}
				}
				exp.Keys = act
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return printJSON(out, exp)
			}
			for _, k := range exp.Keys {
				state := "active"
				if !k.Active() {
					state = "retired " + k.NotAfter.Format(time.RFC3339)
					if k.NotAfterLogSize != nil {
						state += fmt.Sprintf(" (log size %d)", *k.NotAfterLogSize)
					}
				}
				fmt.Fprintf(out, "# keyid %s (%s, %s, since %s)\n%s", k.KeyID, k.Source, state, k.NotBefore.Format(time.RFC3339), k.PEM)
			}
			if all {
				fmt.Fprintf(out, "# log %s\n%s\n", exp.Log.Origin, exp.Log.VKey)
			}
			return nil
		},
	}
	addDataFlag(c, &dataDir)
	c.Flags().BoolVar(&all, "all", false, "also print retired keys (with validity) and the log's checkpoint key")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON (the form \"kiln attest verify --key\" reads)")
	return c
}

func newAttestKeyCmd() *cobra.Command {
	c := &cobra.Command{Use: "key", Short: "Manage executor keys"}
	var dataDir, keyFile string
	var asJSON bool
	rotate := &cobra.Command{
		Use:   "rotate",
		Short: "Make a new executor key active and retire the old one (kept, so old links still verify)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			p := attest.PathsFor(dataDir)
			cas, err := disk.Open(ctx, p.CAS, disk.Options{})
			if err != nil {
				return err
			}
			defer cas.Close()
			s, err := attest.Open(ctx, attest.Options{DataDir: dataDir, CAS: cas})
			if err != nil {
				return err
			}
			defer s.Close(ctx)
			old, cur, err := s.Keyring().Rotate(ctx, keyFile)
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), map[string]any{"retired": old, "active": cur})
			}
			if old.KeyID != "" {
				fmt.Fprintf(cmd.OutOrStdout(), "retired %s (log size %d)\n", old.KeyID, deref(old.NotAfterLogSize))
			}
			fmt.Fprintf(cmd.OutOrStdout(), "active  %s\n", cur.KeyID)
			return nil
		},
	}
	addDataFlag(rotate, &dataDir)
	rotate.Flags().StringVar(&keyFile, "key-file", "", "use this ed25519 private key (PKCS #8 PEM) instead of generating one; kiln does not copy it")
	rotate.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	c.AddCommand(rotate)
	return c
}

func deref(p *uint64) uint64 {
	if p == nil {
		return 0
	}
	return *p
}

func newAttestProvenanceCmd() *cobra.Command {
	var dataDir, subject, out, sbom string
	var storage engine.StorageConfig
	var clusterCfg cluster.Config
	var wait time.Duration
	c := &cobra.Command{
		Use:   "provenance --subject FILE|DIGEST",
		Short: "Write signed SLSA provenance (and optionally a CycloneDX SBOM) for an artifact from its verified links",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			if subject == "" {
				return &exitError{code: 2, msg: "--subject is required"}
			}
			subj, err := attest.ParseSubject(subject)
			if err != nil {
				return err
			}
			kr, err := openKeyring(ctx, dataDir)
			if err != nil {
				return err
			}
			ct, err := clusterTrust(ctx, clusterCfg)
			if err != nil {
				return err
			}
			lk := kr.Log()
			if ct.Log != nil {
				lk = *ct.Log
			}
			lv, err := lk.Verifier()
			if err != nil {
				return err
			}
			store, done, err := openLogStore(ctx, dataDir, storage, lv)
			if err != nil {
				return err
			}
			defer done()
			ch, env, k, err := attest.BuildProvenanceWith(ctx, store, kr, ct, subj, wait)
			if ch != nil && !ch.OK() {
				for _, f := range ch.Failures {
					fmt.Fprintln(cmd.ErrOrStderr(), "kiln: "+f.String())
				}
				return &exitError{code: 1, msg: status.Convert(err).Message()}
			}
			if err != nil {
				return err
			}
			if err := writeOutput(out, append(env, '\n'), cmd.OutOrStdout()); err != nil {
				return err
			}
			if sbom != "" {
				b, err := attest.EncodeSBOM(ch.SBOM(version))
				if err != nil {
					return err
				}
				if err := writeOutput(sbom, b, cmd.OutOrStdout()); err != nil {
					return err
				}
			}
			if out != "" && out != "-" {
				fmt.Fprintf(cmd.OutOrStdout(), "provenance for %s: %d link(s), %d source(s), %d toolchain(s), signed by %s\n",
					subj.Name, len(ch.Links), len(ch.Sources), len(ch.Toolchains), k.ID())
			}
			return nil
		},
	}
	addDataFlag(c, &dataDir)
	addStorageFlag(c, &storage)
	addClusterFlags(c, &clusterCfg, "verify")
	c.Flags().StringVar(&subject, "subject", "", "the artifact: a file, or its sha256 digest")
	c.Flags().StringVar(&out, "out", "", "write the DSSE envelope here (default stdout)")
	c.Flags().StringVar(&sbom, "sbom", "", "also write a CycloneDX JSON SBOM here")
	c.Flags().DurationVar(&wait, "wait", 5*time.Second, "how long to wait for a log checkpoint covering freshly logged links")
	return c
}

func newAttestVerifyCmd() *cobra.Command {
	var dataDir, subject, logKey, pinned, layout, provenance, sbom string
	var storage engine.StorageConfig
	var clusterCfg cluster.Config
	var keyFiles, layoutKeys []string
	var asJSON bool
	var wait time.Duration
	c := &cobra.Command{
		Use:   "verify --subject FILE|DIGEST --key PUB",
		Short: "Verify an artifact's links: signatures by trusted keys, log inclusion, a connected chain (and a layout, provenance, SBOM)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			if subject == "" || (len(keyFiles) == 0 && !clusterCfg.Enabled()) {
				return &exitError{code: 2, msg: "--subject and --key (or --cluster) are required"}
			}
			subj, err := attest.ParseSubject(subject)
			if err != nil {
				return err
			}
			trust, err := loadKeys(keyFiles)
			if err != nil {
				return err
			}
			if trust, err = withClusterTrust(ctx, clusterCfg, trust); err != nil {
				return err
			}
			logSource := ""
			if clusterCfg.Enabled() && logKey == "" {
				logSource = "cluster" // what --cluster verifies against
			}
			logVerifier, from, err := resolveLogKey(ctx, logKey, trust, dataDir)
			if err != nil {
				return err
			}
			if logSource == "" {
				logSource = from
			}
			var pin *tlog.Checkpoint
			if pinned != "" {
				b, err := os.ReadFile(pinned)
				if err != nil {
					return &exitError{code: 2, msg: err.Error()}
				}
				if pin, err = tlog.ParseCheckpoint(b, logVerifier); err != nil {
					return fmt.Errorf("--checkpoint %s: %w", pinned, err)
				}
			}
			store, done, err := openLogStore(ctx, dataDir, storage, logVerifier)
			if err != nil {
				return err
			}
			defer done()
			res := verifyResult{Subject: subj.Name, SHA256: subj.SHA256, LogKey: logSource}
			v, err := attest.NewVerifier(ctx, store, attest.VerifierOptions{Trust: trust, LogVerifier: logVerifier, Pinned: pin, WaitCheckpoint: wait})
			if err != nil {
				res.Failures = append(res.Failures, err.Error())
				return res.finish(cmd, asJSON)
			}
			res.CheckpointSize = v.Checkpoint().Size
			var ch *attest.Chain
			if provenance != "" {
				b, err := os.ReadFile(provenance)
				if err != nil {
					return &exitError{code: 2, msg: err.Error()}
				}
				p, err := attest.ParseProvenance(ctx, b, trust)
				if err != nil {
					res.Failures = append(res.Failures, err.Error())
					return res.finish(cmd, asJSON)
				}
				ch = v.CheckProvenance(ctx, p, subj)
			} else if ch, err = v.Chain(ctx, subj); err != nil {
				return err
			}
			for _, f := range ch.Failures {
				res.Failures = append(res.Failures, f.String())
			}
			if sbom != "" {
				b, err := os.ReadFile(sbom)
				if err != nil {
					return &exitError{code: 2, msg: err.Error()}
				}
				for _, f := range ch.CheckSBOM(b) {
					res.Failures = append(res.Failures, f.String())
				}
			}
			if layout != "" && len(res.Failures) == 0 {
				if err := runInTotoVerify(cmd, ch, layout, layoutKeys); err != nil {
					res.Failures = append(res.Failures, "in-toto layout: "+oneLine(err.Error()))
				}
			}
			for _, l := range ch.Links {
				res.Links = append(res.Links, linkSummary{Action: l.Link.Name, Envelope: l.Envelope.String(), KeyID: l.KeyID, LogIndex: l.LogIndex})
			}
			for _, s := range ch.Sources {
				res.Sources = append(res.Sources, s.Path+" "+s.Alg+":"+s.Hash)
			}
			res.Toolchains = ch.Toolchains
			return res.finish(cmd, asJSON)
		},
	}
	addDataFlag(c, &dataDir)
	addStorageFlag(c, &storage)
	c.Flags().StringVar(&subject, "subject", "", "the artifact: a file, or its sha256 digest")
	c.Flags().StringArrayVar(&keyFiles, "key", nil, "trusted executor keys: a PEM public key file, or \"kiln attest pubkey --all --json\" output (repeatable)")
	c.Flags().StringVar(&logKey, "log-key", "", "the log's checkpoint verifier key (a note vkey, or a file holding one); default: from a --key JSON export or --cluster, else the data dir's keyring")
	addClusterFlags(c, &clusterCfg, "verify")
	c.Flags().StringVar(&pinned, "checkpoint", "", "a checkpoint trusted earlier; the log must be consistent with it")
	c.Flags().StringVar(&layout, "layout", "", "also run in-toto's InTotoVerify with this layout (steps named by action digest hash)")
	c.Flags().StringArrayVar(&layoutKeys, "layout-key", nil, "public key (PEM) of the layout's signer (repeatable; required with --layout)")
	c.Flags().StringVar(&provenance, "provenance", "", "verify the chain exactly as this provenance envelope states it")
	c.Flags().StringVar(&sbom, "sbom", "", "check that this CycloneDX SBOM lists exactly the chain's sources and toolchains")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	c.Flags().DurationVar(&wait, "wait", 5*time.Second, "how long to wait for a log checkpoint covering freshly logged links")
	return c
}

// logKeyFlag is a --log-key value: a note verifier key, or a file holding one.
func logKeyFlag(v string) *keys.LogKey {
	if b, err := os.ReadFile(v); err == nil {
		v = strings.TrimSpace(string(b))
	}
	return &keys.LogKey{VKey: v}
}

// loadKeys reads trusted executor keys from --key files: PEM public keys, or the JSON
// of `kiln attest pubkey --all --json` (which also carries the log key).
func loadKeys(files []string) (keys.Trust, error) {
	var trust keys.Trust
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return trust, &exitError{code: 2, msg: err.Error()}
		}
		t, err := keys.ParseTrust(b)
		if err != nil {
			return trust, fmt.Errorf("--key %s: %w", f, err)
		}
		trust.Add(t)
	}
	return trust, nil
}

// resolveLogKey picks the log verifier: --log-key, else one from a --key export, else
// the data dir's keyring (which trusts the local disk; say so).
func resolveLogKey(ctx context.Context, flag string, trust keys.Trust, dataDir string) (vk note.Verifier, source string, err error) {
	switch {
	case flag != "":
		v, err := logKeyFlag(flag).Verifier()
		return v, "--log-key", err
	case trust.Log != nil:
		v, err := trust.Log.Verifier()
		return v, "--key export", err
	default:
		kr, err := openKeyring(ctx, dataDir)
		if err != nil {
			return nil, "", err
		}
		lk := kr.Log()
		v, err := lk.Verifier()
		return v, "local keyring", err
	}
}

type linkSummary struct {
	Action   string `json:"action"`
	Envelope string `json:"envelope"`
	KeyID    string `json:"keyid"`
	LogIndex uint64 `json:"log_index"`
}

type verifyResult struct {
	OK             bool          `json:"ok"`
	Subject        string        `json:"subject"`
	SHA256         string        `json:"sha256"`
	LogKey         string        `json:"log_key_from"`
	CheckpointSize uint64        `json:"checkpoint_size"`
	Links          []linkSummary `json:"links"`
	Sources        []string      `json:"sources"`
	Toolchains     []string      `json:"toolchains"`
	Failures       []string      `json:"failures,omitempty"`
}

func (r *verifyResult) finish(cmd *cobra.Command, asJSON bool) error {
	r.OK = len(r.Failures) == 0
	out := cmd.OutOrStdout()
	if asJSON {
		if err := printJSON(out, r); err != nil {
			return err
		}
	} else if r.OK {
		fmt.Fprintf(out, "OK %s (sha256 %s): %d link(s) verified and logged (checkpoint size %d, log key from %s); %d source(s), %d toolchain(s)\n",
			r.Subject, r.SHA256, len(r.Links), r.CheckpointSize, r.LogKey, len(r.Sources), len(r.Toolchains))
	} else {
		for _, f := range r.Failures {
			fmt.Fprintln(out, "FAIL "+oneLine(f))
		}
	}
	if !r.OK {
		return &exitError{code: 1, msg: fmt.Sprintf("verification of %s failed: %s", r.Subject, r.Failures[0])}
	}
	return nil
}

// runInTotoVerify runs in-toto-golang's InTotoVerify over the chain's links, written as
// "<action>.<keyid8>.link" files (so layout steps are named by action digest hash).
// in-toto prints warnings on stdout; they are moved to stderr.
func runInTotoVerify(cmd *cobra.Command, ch *attest.Chain, layoutPath string, layoutKeyFiles []string) error {
	if len(layoutKeyFiles) == 0 {
		return fmt.Errorf("--layout needs --layout-key (the layout signer's public key)")
	}
	lk := map[string]in_toto.Key{}
	for _, f := range layoutKeyFiles {
		var k in_toto.Key
		if err := k.LoadKeyDefaults(f); err != nil {
			return fmt.Errorf("--layout-key %s: %v", f, err)
		}
		lk[k.KeyID] = k
	}
	md, err := in_toto.LoadMetadata(layoutPath)
	if err != nil {
		return fmt.Errorf("load %s: %v", layoutPath, err)
	}
	dir, err := os.MkdirTemp("", "kiln-links-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	for _, l := range ch.Links {
		if err := os.WriteFile(filepath.Join(dir, attest.LinkFile(l)), l.Raw, 0o600); err != nil {
			return err
		}
	}
	restore := redirectStdout(cmd.ErrOrStderr())
	_, err = in_toto.InTotoVerify(md, lk, dir, "", nil, nil, false)
	restore()
	return err
}

// redirectStdout sends what is written to os.Stdout to w until the returned func is
// called (in-toto-golang prints verification warnings with fmt.Printf).
func redirectStdout(w io.Writer) func() {
	r, pw, err := os.Pipe()
	if err != nil {
		return func() {}
	}
	old := os.Stdout
	os.Stdout = pw
	done := make(chan struct{})
	go func() {
		io.Copy(w, r)
		close(done)
	}()
	return func() {
		os.Stdout = old
		pw.Close()
		<-done
		r.Close()
	}
}
