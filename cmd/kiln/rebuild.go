package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/kilnbuild/kiln/engine"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/engine/cluster"
	"github.com/kilnbuild/kiln/engine/rebuild"
	"github.com/spf13/cobra"
)

func newExportCmd() *cobra.Command {
	var data, subject, out string
	var storage engine.StorageConfig
	var wait time.Duration
	var jsonOut bool
	c := &cobra.Command{
		Use:   "export --subject FILE|DIGEST --out BUNDLE",
		Short: "Write a self-contained bundle to rebuild an artifact: provenance, links, actions, inputs, toolchains, log",
		Long: `Write everything needed to rebuild an artifact elsewhere: its signed provenance,
the link of every action in its chain, the transparency log those links are in, every
Action, Command, input Directory and input file, and every toolchain image. BUNDLE is a
new directory, or a tar file if it ends in .tar (.tar.zst: compressed with zstd).
See docs/rebuild.md for the layout.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if subject == "" || out == "" {
				return &exitError{code: 2, msg: "--subject and --out are required"}
			}
			subj, err := attest.ParseSubject(subject)
			if err != nil {
				return statusErr(err)
			}
			ctx := cmd.Context()
			eng, err := engine.Open(ctx, engine.Options{Data: engine.DataDir(data), Storage: storage, Execution: engine.ExecutionConfig{Disabled: true}, Logger: quietLogger(), Version: version})
			if err != nil {
				return statusErr(err)
			}
			defer eng.Close()
			res, err := rebuild.Export(ctx, eng, subj, out, wait, version)
			if err != nil {
				return statusErr(err)
			}
			if jsonOut {
				return printJSON(os.Stdout, res)
			}
			fmt.Printf("bundle %s: %s, %d action(s), %d toolchain(s), %d blob(s), %d bytes of blobs\n",
				out, subj.Name, len(res.Manifest.Actions), len(res.Manifest.Toolchains), res.Blobs, res.Bytes)
			return nil
		},
	}
	addDataFlag(c, &data)
	addStorageFlag(c, &storage)
	c.Flags().StringVar(&subject, "subject", "", "the artifact: a file, or its sha256 digest")
	c.Flags().StringVar(&out, "out", "", "the bundle to write: a new directory, FILE.tar, or FILE.tar.zst (compressed)")
	c.Flags().DurationVar(&wait, "wait", 5*time.Second, "how long to wait for freshly signed links to be logged")
	c.Flags().BoolVar(&jsonOut, "json", false, "print JSON")
	return c
}

func newRebuildCmd() *cobra.Command {
	var (
		data, bundle, remote, instance, logKey, out string
		storage                                     engine.StorageConfig
		maxBundleSize                               string
		remoteTLS                                   rebuild.RemoteTLS
		keyFiles, remoteKeys                        []string
		clusterCfg                                  cluster.Config
		jsonOut                                     bool
		wait                                        time.Duration
	)
	c := &cobra.Command{
		Use:   "rebuild PROVENANCE --key PUB [--bundle BUNDLE | --remote ADDR]",
		Short: "Re-execute the actions recorded in an artifact's provenance and compare every product bit for bit",
		Long: `Verify PROVENANCE and every link it lists (signatures by --key, inclusion in the
transparency log, a connected chain) before anything runs; then re-execute every
recorded action without any cache in a fresh sandbox, in dependency order, and compare
each product with the recorded digest. Writes a DSSE-signed SLSA Verification Summary
(v1) to --out (default stdout), signed with this data dir's executor key.

Blobs and links come from --bundle (kiln export), else from this data dir. Actions run
locally in this data dir's sandbox, or on the kiln server at --remote, whose answers
count only as far as a link signed by a --remote-key vouches for them (a replay of the
recorded link is refused).

Exit status: 0 PASSED; 1 FAILED (the subject is then quarantined in this data dir, so
kiln serve on it no longer hands it out) or the provenance did not verify (nothing ran,
nothing quarantined); 2 usage or set-up error.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			raw, trust, err := readSigned(args[0], keyFiles, "the public key(s) the provenance and links must be signed with")
			if err != nil {
				return err
			}
			if trust, err = withClusterTrust(cmd.Context(), clusterCfg, trust); err != nil {
				return err
			}
			if logKey != "" {
				trust.Log = logKeyFlag(logKey)
			}
			maxBundle, err := parseSize(maxBundleSize)
			if err != nil || maxBundle <= 0 {
				return &exitError{code: 2, msg: fmt.Sprintf("--max-bundle-size %q: want a size such as 16GiB", maxBundleSize)}
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			eng, err := engine.Open(ctx, engine.Options{Data: engine.DataDir(data), Storage: storage, Logger: quietLogger(), Version: version, Execution: engine.ExecutionConfig{Disabled: remote != ""}})
			if err != nil {
				return &exitError{code: 2, msg: statusErr(err).Error()}
			}
			defer eng.Close()
			opts := rebuild.Options{Provenance: raw, ProvenanceURI: args[0], Trust: trust, Wait: wait, Version: version, Logger: quietLogger()}
			if bundle != "" {
				dir, done, err := rebuild.OpenBundle(bundle, maxBundle)
				if err != nil {
					return &exitError{code: 2, msg: statusErr(err).Error()}
				}
				defer done()
				opts.Bundle = dir
			}
			if remote != "" {
				rtrust, err := loadKeys(remoteKeys)
				if err != nil {
					return err
				}
				r, err := rebuild.DialRemote(ctx, remote, instance, remoteTLS, rtrust)
				if err != nil {
					return &exitError{code: 2, msg: statusErr(err).Error()}
				}
				defer r.Close()
				opts.Executor = r
			}
			res, err := rebuild.Rebuild(ctx, eng, opts)
			if err != nil {
				return &exitError{code: 1, msg: statusErr(err).Error()}
			}
			if err := writeOutput(out, append(res.VSA, '\n'), cmd.OutOrStdout()); err != nil {
				return err
			}
			w := os.Stderr
			if jsonOut {
				printJSON(os.Stdout, res)
			} else {
				for _, a := range res.Actions {
					state := "reproduced"
					if a.Error != "" {
						state = "error: " + a.Error
					} else if len(a.Differences) > 0 {
						state = fmt.Sprintf("%d product(s) differ", len(a.Differences))
					}
					fmt.Fprintf(w, "action %s: %d product(s), %s\n", a.Action, a.Products, state)
					for _, d := range a.Differences {
						fmt.Fprintf(w, "  %s: recorded %q, rebuilt %q\n", d.Path, d.Recorded, d.Rebuilt)
					}
				}
				fmt.Fprintf(w, "%s %s (%s), summary signed by %s\n", res.Verdict, res.Subject.Name, "sha256:"+res.Subject.SHA256, res.SignedBy)
			}
			if res.Verdict != rebuild.Passed {
				return &exitError{code: 1, msg: fmt.Sprintf("rebuild FAILED: %s; quarantined sha256:%s (see kiln quarantine ls)", res.Reason, res.Subject.SHA256)}
			}
			return nil
		},
	}
	addDataFlag(c, &data)
	addStorageFlag(c, &storage)
	c.Flags().StringArrayVar(&keyFiles, "key", nil, "trusted executor public key: PEM, or \"kiln attest pubkey --all --json\" output (repeatable)")
	c.Flags().StringVar(&logKey, "log-key", "", "the transparency log's verifier key (a note vkey, or a file holding one); default: from a --key JSON export or --cluster")
	addClusterFlags(c, &clusterCfg, "verify")
	c.Flags().StringVar(&bundle, "bundle", "", "bundle from kiln export (directory, .tar or .tar.zst); default: this data dir")
	c.Flags().StringVar(&remote, "remote", "", "re-execute on this kiln server (host:port) instead of locally")
	c.Flags().StringVar(&instance, "instance", "", "REAPI instance name for --remote")
	c.Flags().StringArrayVar(&remoteKeys, "remote-key", nil, "public key(s) of the --remote executor: every remote run's result must carry a link signed by one (required with --remote)")
	c.Flags().StringVar(&maxBundleSize, "max-bundle-size", "16GiB", "refuse a bundle file that unpacks to more than this (an unverified bundle could claim any size)")
	c.Flags().StringVar(&remoteTLS.CA, "remote-ca", "", "PEM CA certificates: talk TLS to --remote (default: plaintext, for a trusted network)")
	c.Flags().StringVar(&remoteTLS.Cert, "remote-client-cert", "", "PEM client certificate for --remote when it requires one (kiln serve --tls-client-ca)")
	c.Flags().StringVar(&remoteTLS.Key, "remote-client-key", "", "PEM private key of --remote-client-cert")
	c.Flags().StringVar(&remoteTLS.TokenFile, "remote-token-file", "", "file holding a bearer token for --remote when it requires one (kiln serve --oidc-issuer); re-read when it changes")
	c.Flags().StringVar(&out, "out", "", "write the signed verification summary here (default stdout)")
	c.Flags().BoolVar(&jsonOut, "json", false, "print the per-action result as JSON on stdout (use with --out)")
	c.Flags().DurationVar(&wait, "wait", 5*time.Second, "how long to wait for freshly signed links to be logged (local data dir)")
	return c
}

func newVerifySummaryCmd() *cobra.Command {
	var keyFiles []string
	var subject string
	var jsonOut bool
	c := &cobra.Command{
		Use:   "verify-summary VSA --key PUB [--subject FILE|DIGEST]",
		Short: "Check a verification summary from kiln rebuild: signature, subject, PASSED",
		Long: `Verify the DSSE signature of a SLSA verification summary against --key, check that
it is about --subject (when given), and exit 0 only if its result is PASSED (1 when
FAILED or when anything does not verify).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			raw, trust, err := readSigned(args[0], keyFiles, "the public key(s) the summary must be signed with")
			if err != nil {
				return err
			}
			s, err := rebuild.CheckSummary(cmd.Context(), raw, trust)
			if err != nil {
				return &exitError{code: 1, msg: statusErr(err).Error()}
			}
			if subject != "" {
				want, err := attest.ParseSubject(subject)
				if err != nil {
					return &exitError{code: 2, msg: statusErr(err).Error()}
				}
				if want.SHA256 != s.Subject.SHA256 {
					return &exitError{code: 1, msg: fmt.Sprintf("the summary is about sha256:%s, not %s (sha256:%s)", s.Subject.SHA256, want.Name, want.SHA256)}
				}
			}
			if jsonOut {
				printJSON(os.Stdout, s)
			} else {
				fmt.Printf("%s %s (sha256:%s), signed by %s, policy %s\n", s.Result, s.Subject.Name, s.Subject.SHA256, s.KeyID, s.Policy)
			}
			if s.Result != rebuild.Passed {
				return &exitError{code: 1}
			}
			return nil
		},
	}
	c.Flags().StringArrayVar(&keyFiles, "key", nil, "trusted public key: PEM, or \"kiln attest pubkey --all --json\" output (repeatable)")
	c.Flags().StringVar(&subject, "subject", "", "the artifact the summary must be about: a file, or its sha256 digest")
	c.Flags().BoolVar(&jsonOut, "json", false, "print JSON")
	return c
}

// readSigned reads a signed document and the keys it must verify with (--key, which
// keyHelp describes); both failures are usage errors (exit 2).
func readSigned(path string, keyFiles []string, keyHelp string) ([]byte, keys.Trust, error) {
	if len(keyFiles) == 0 {
		return nil, keys.Trust{}, &exitError{code: 2, msg: "--key is required: " + keyHelp}
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, keys.Trust{}, &exitError{code: 2, msg: err.Error()}
	}
	trust, err := loadKeys(keyFiles)
	if err != nil {
		return nil, keys.Trust{}, err
	}
	return raw, trust, nil
}
