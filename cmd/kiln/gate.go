package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/kilnbuild/kiln/cache/disk"
	"github.com/kilnbuild/kiln/engine"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/cluster"
	"github.com/kilnbuild/kiln/engine/gate"
	"github.com/kilnbuild/kiln/engine/quarantine"
	"github.com/kilnbuild/kiln/engine/rebuild"
	"github.com/kilnbuild/kiln/engine/server"
	"github.com/spf13/cobra"
)

// gateFlags are what kiln gate and kiln gate serve share: the policy, the trust, and
// where links, the log and the quarantine list are.
type gateFlags struct {
	data, policy, bundle, logKey, maxBundle string
	keyFiles                                []string
	wait                                    time.Duration
	storage                                 engine.StorageConfig
	// cluster (kiln gate only) adds the keys a cluster admitted and its log key.
	cluster cluster.Config
}

func (f *gateFlags) register(c *cobra.Command) {
	addDataFlag(c, &f.data)
	c.Flags().StringVar(&f.policy, "policy", "", "the policy (YAML with CEL rules; see docs/gate.md and examples/gate/)")
	c.Flags().StringArrayVar(&f.keyFiles, "keys", nil, "trusted public keys for provenance, links and summaries: PEM, or the output of \"kiln attest pubkey --all --json\" (repeatable)")
	c.Flags().StringVar(&f.logKey, "log-key", "", "the transparency log's verifier key (a note vkey, or a file holding one); default: from a --keys JSON export")
	c.Flags().StringVar(&f.bundle, "bundle", "", "read links and the log from this bundle (kiln export) instead of the data dir")
	c.Flags().StringVar(&f.maxBundle, "max-bundle-size", "16GiB", "refuse a bundle file that unpacks to more than this")
	c.Flags().DurationVar(&f.wait, "wait", 5*time.Second, "how long to wait for freshly signed links to be logged")
	addStorageFlag(c, &f.storage)
	c.Flags().Lookup("storage").Usage = "read links (and a cluster's published log) from this shared storage: " + c.Flags().Lookup("storage").Usage
}

// open loads the policy and keys and opens the store: every failure is a set-up error
// (exit 2). sign also opens the data dir's active executor key to sign decisions;
// vc (nil: none) keeps verified documents across decisions.
func (f *gateFlags) open(ctx context.Context, sign bool, vc *attest.VerifyCache) (*gate.Gate, func(), error) {
	usage := func(err error) (*gate.Gate, func(), error) {
		return nil, nil, &exitError{code: 2, msg: statusErr(err).Error()}
	}
	if f.policy == "" || (len(f.keyFiles) == 0 && !f.cluster.Enabled()) {
		return nil, nil, &exitError{code: 2, msg: "--policy and --keys (or --cluster) are required"}
	}
	if f.bundle != "" && f.storage.S3 != nil {
		return nil, nil, &exitError{code: 2, msg: "--bundle and --storage both say where links are: give one"}
	}
	pol, err := gate.LoadPolicy(f.policy)
	if err != nil {
		return usage(err)
	}
	trust, err := loadKeys(f.keyFiles)
	if err != nil {
		return usage(err)
	}
	if trust, err = withClusterTrust(ctx, f.cluster, trust); err != nil {
		return usage(err)
	}
	if f.logKey != "" {
		trust.Log = logKeyFlag(f.logKey)
	}
	var closers []func()
	done := func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i]()
		}
	}
	storeDir := f.data
	if f.bundle != "" {
		max, err := parseSize(f.maxBundle)
		if err != nil || max <= 0 {
			return usage(fmt.Errorf("--max-bundle-size %q: want a size such as 16GiB", f.maxBundle))
		}
		dir, cleanup, err := rebuild.OpenBundle(f.bundle, max)
		if err != nil {
			return usage(err)
		}
		closers = append(closers, cleanup)
		storeDir = dir
	}
	var store *attest.Store
	if f.storage.S3 != nil {
		if trust.Log == nil {
			done()
			return usage(fmt.Errorf("--storage needs the log key (--keys from kiln attest pubkey --all --json, --log-key or --cluster)"))
		}
		lv, err := trust.Log.Verifier()
		if err != nil {
			done()
			return usage(err)
		}
		st, closeStore, err := openLogStore(ctx, f.data, f.storage, lv)
		if err != nil {
			done()
			return usage(err)
		}
		closers = append(closers, closeStore)
		store = st
	} else {
		p := attest.PathsFor(storeDir)
		cas, err := disk.Open(ctx, p.CAS, disk.Options{ReadOnly: f.bundle != ""})
		if err != nil {
			done()
			return usage(err)
		}
		closers = append(closers, func() { cas.Close() })
		store = attest.NewStore(p, cas)
	}
	q, err := quarantine.Open(f.data)
	if err != nil {
		done()
		return usage(err)
	}
	opts := gate.Options{Policy: pol, Trust: trust, Store: store, Quarantine: q, Wait: f.wait, Version: version, Cache: vc}
	if sign {
		kr, err := openKeyring(ctx, f.data)
		if err != nil {
			done()
			return usage(err)
		}
		if opts.Signer, err = kr.Active(); err != nil {
			done()
			return usage(err)
		}
	}
	g, err := gate.New(opts)
	if err != nil {
		done()
		return usage(err)
	}
	return g, done, nil
}

func newGateCmd() *cobra.Command {
	var (
		f                               gateFlags
		subject, provenance, sbom, lock string
		stage, out, inputOut            string
		vsas                            []string
		jsonOut                         bool
	)
	c := &cobra.Command{
		Use:   "gate --policy POLICY --keys PUB --subject FILE|DIGEST [--provenance FILE] [--vsa FILE]...",
		Short: "Decide whether an artifact may be promoted: a policy in CEL over its verified attestations, and a signed decision",
		Long: `Verify an artifact's provenance and every link it lists (signatures by --keys,
inclusion in the transparency log under a signed checkpoint, key validity when they
signed), its verification summaries (--vsa), its SBOM, the pins of --lockfile and the
data dir's quarantine list; build the policy's input from those verified facts only;
run the policy's rules; print every rule that failed with the attestation it concerns
and why. --out writes the decision as a signed in-toto statement (the data dir's
executor key). See docs/gate.md for the input document and the policy format.

Exit status: 0 allow; 1 deny; 2 usage or set-up error (a malformed policy names its
file and line).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if subject == "" {
				return &exitError{code: 2, msg: "--subject is required"}
			}
			subj, err := attest.ParseSubject(subject)
			if err != nil {
				return &exitError{code: 2, msg: statusErr(err).Error()}
			}
			req := gate.Request{Stage: stage, Subject: subj}
			read := func(path string) (*gate.Doc, error) {
				if path == "" {
					return nil, nil
				}
				b, err := os.ReadFile(path)
				if err != nil {
					return nil, &exitError{code: 2, msg: err.Error()}
				}
				return &gate.Doc{Name: filepath.Base(path), Data: b}, nil
			}
			if req.Provenance, err = read(provenance); err != nil {
				return err
			}
			if req.SBOM, err = read(sbom); err != nil {
				return err
			}
			if req.Lockfile, err = read(lock); err != nil {
				return err
			}
			for _, v := range vsas {
				d, err := read(v)
				if err != nil {
					return err
				}
				req.VSAs = append(req.VSAs, *d)
			}
			ctx := cmd.Context()
			g, done, err := f.open(ctx, out != "", nil)
			if err != nil {
				return err
			}
			defer done()
			d, err := g.Decide(ctx, req)
			if err != nil {
				return &exitError{code: 2, msg: statusErr(err).Error()}
			}
			if inputOut != "" {
				b, _ := json.MarshalIndent(d.Input, "", "  ")
				if err := writeOutput(inputOut, append(b, '\n'), cmd.OutOrStdout()); err != nil {
					return &exitError{code: 2, msg: err.Error()}
				}
			}
			if out != "" {
				if err := writeOutput(out, append(d.Envelope, '\n'), cmd.OutOrStdout()); err != nil {
					return &exitError{code: 2, msg: err.Error()}
				}
			}
			w := cmd.OutOrStdout()
			if jsonOut {
				printJSON(w, d)
			} else {
				printDecision(w, d)
			}
			if !d.Allow {
				return &exitError{code: 1, msg: fmt.Sprintf("DENY %s for %s: %d rule violation(s)", d.Subject.Name, d.Stage, len(d.Violations))}
			}
			return nil
		},
	}
	f.register(c)
	addClusterFlags(c, &f.cluster, "verify")
	c.Flags().StringVar(&subject, "subject", "", "the artifact: a file, or its sha256 digest")
	c.Flags().StringVar(&provenance, "provenance", "", "its signed SLSA provenance (kiln attest provenance); without it, links come from the store's index")
	c.Flags().StringArrayVar(&vsas, "vsa", nil, "a signed verification summary of a rebuild (kiln rebuild --out) (repeatable)")
	c.Flags().StringVar(&sbom, "sbom", "", "its CycloneDX SBOM (kiln attest provenance --sbom)")
	c.Flags().StringVar(&lock, "lockfile", "", "the kiln.lock the build pinned its toolchains and dependencies in")
	c.Flags().StringVar(&stage, "stage", "", "the stage to promote to (default: the policy's stage)")
	c.Flags().StringVar(&out, "out", "", "write the signed decision (DSSE envelope of an in-toto statement) here")
	c.Flags().StringVar(&inputOut, "input-out", "", "write the input document the policy saw here (JSON)")
	c.Flags().BoolVar(&jsonOut, "json", false, "print the decision as JSON")
	c.AddCommand(newGateServeCmd())
	return c
}

// printDecision prints a decision for people: the verdict, then each violation.
func printDecision(w interface{ Write([]byte) (int, error) }, d *gate.Decision) {
	fmt.Fprintf(w, "%s %s (sha256:%s) for stage %s: policy %s (sha256 %s), %d attestation(s) considered\n",
		d.Decision, d.Subject.Name, d.Subject.SHA256, d.Stage, d.Policy.Name, d.Policy.SHA256[:16], len(d.Attestations))
	for _, v := range d.Violations {
		att := v.Attestation
		if att == "" {
			att = "subject"
		}
		fmt.Fprintf(w, "  %s [%s]: %s\n", v.Rule, att, oneLine(v.Reason))
	}
	if d.SignedBy != "" {
		fmt.Fprintf(w, "decision signed by %s\n", d.SignedBy)
	}
}

func newGateServeCmd() *cobra.Command {
	var (
		f                   gateFlags
		listen              string
		tlsF                server.TLSFiles
		logLevel, logFormat string
		cacheSize           string
	)
	c := &cobra.Command{
		Use:   "serve --listen ADDR --policy POLICY --keys PUB",
		Short: "Answer gate decisions over HTTP (POST /v1/decide, JSON in and out), with TLS and mTLS as kiln serve",
		Long: `Serve the same decisions as kiln gate over HTTP, for an orchestrator's verification
step (an admission webhook, a Tekton task, a deploy job). POST /v1/decide takes the
subject, the stage and the documents (each {"name", "data": base64 of its bytes}) and
answers 200 with the decision and its signed envelope, allow or deny; 400 for a request
the gate cannot decide. Trust (--keys), the policy, the store and the quarantine list
are the server's, never the client's. --tls-cert/--tls-key serve HTTPS;
--tls-client-ca requires client certificates (mTLS). Verified link envelopes, provenance
and summaries are cached (--cache-size) by the digest of their bytes and the trust set;
log inclusion and quarantine are checked at every decision. See docs/gate.md.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(logLevel, logFormat)
			if err != nil {
				return &exitError{code: 2, msg: err.Error()}
			}
			if err := tlsF.Check(); err != nil {
				return &exitError{code: 2, msg: statusErr(err).Error()}
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			size, err := parseSize(cacheSize)
			if err != nil || size < 0 {
				return &exitError{code: 2, msg: fmt.Sprintf("--cache-size %q: want a size such as 256MiB, or 0", cacheSize)}
			}
			g, done, err := f.open(ctx, true, attest.NewVerifyCache(size))
			if err != nil {
				return err
			}
			defer done()
			var tc *tls.Config
			if tlsF.Enabled() {
				if tc, err = server.ServerTLS(tlsF, log); err != nil {
					return &exitError{code: 2, msg: statusErr(err).Error()}
				}
			}
			lis, err := net.Listen("tcp", listen)
			if err != nil {
				return &exitError{code: 2, msg: err.Error()}
			}
			if tcp, ok := lis.Addr().(*net.TCPAddr); ok && !tcp.IP.IsLoopback() && tlsF.ClientCA == "" {
				log.Warn("listening beyond loopback without client certificates: anyone who reaches the port can ask for decisions (see --tls-client-ca)")
			}
			log.Info("kiln gate serving", "addr", lis.Addr().String(), "tls", tc != nil, "client_certificates", tlsF.ClientCA != "",
				"policy", g.Policy().Name, "policy_sha256", g.Policy().SHA256)
			return gate.Serve(ctx, lis, tc, g.Handler(log), log)
		},
	}
	f.register(c)
	c.Flags().StringVar(&listen, "listen", "127.0.0.1:8982", "HTTP listen address")
	c.Flags().StringVar(&tlsF.Cert, "tls-cert", "", "PEM certificate chain: serve HTTPS (files are re-read when they change)")
	c.Flags().StringVar(&tlsF.Key, "tls-key", "", "PEM private key of --tls-cert")
	c.Flags().StringVar(&tlsF.ClientCA, "tls-client-ca", "", "PEM CA certificates: require clients to present a certificate they signed (mTLS)")
	c.Flags().StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn, error")
	c.Flags().StringVar(&logFormat, "log-format", "text", "log format: text or json")
	c.Flags().StringVar(&cacheSize, "cache-size", "256MiB", "memory for verified attestations kept across decisions (keyed by content digest and trust set); 0: none")
	return c
}
