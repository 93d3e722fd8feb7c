package main

import (
	"context"
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/engine/cluster"
	"github.com/spf13/cobra"
)

// addClusterFlags registers the flags that say how a process joins a cluster: where
// (--cluster) and with which credentials and certificates. serve adds --cluster-listen
// (the embedded JetStream), worker the queue's lease settings.
func addClusterFlags(cmd *cobra.Command, c *cluster.Config, role string) {
	f := cmd.Flags()
	help := "the cluster's NATS servers: nats://HOST:PORT[,nats://HOST:PORT...] (tls:// for TLS)"
	switch role {
	case "serve":
		help += ", or \"embedded\" (JetStream in this process, with --cluster-listen; see docs/cluster.md)"
	case "verify":
		help = "also trust the keys a kiln cluster admitted (its workers' links), and verify against its log (published by its sequencer in --storage): " + help
	}
	f.StringVar(&c.URL, "cluster", "", help)
	f.StringVar(&c.Creds, "cluster-creds", "", "NATS credentials file (JWT and NKey seed), re-read at every reconnection")
	f.StringVar(&c.TLSCert, "cluster-tls-cert", "", "PEM client certificate for the NATS servers (re-read at every reconnection)")
	f.StringVar(&c.TLSKey, "cluster-tls-key", "", "PEM private key of --cluster-tls-cert")
	f.StringVar(&c.TLSCA, "cluster-tls-ca", "", "PEM CA certificates that sign the NATS servers' certificates")
	switch role {
	case "serve":
		f.StringVar(&c.Listen, "cluster-listen", "", "with --cluster embedded: where JetStream accepts workers (HOST:PORT)")
	case "worker":
		f.DurationVar(&c.AckWait, "ack-wait", cluster.DefaultAckWait, "how long a silent worker keeps an action before it goes to another (it reports every ack-wait/3)")
		f.IntVar(&c.MaxDeliver, "max-deliver", cluster.DefaultMaxDeliver, "how many workers may take an action before it fails (each died or lost its lease)")
	}
}

// connectCluster connects a command to the cluster cfg names.
func connectCluster(ctx context.Context, cfg cluster.Config, role string) (*cluster.Conn, error) {
	if !cfg.Enabled() {
		return nil, &exitError{code: 2, msg: "--cluster is required"}
	}
	if cfg.IsEmbedded() {
		return nil, &exitError{code: 2, msg: "--cluster embedded is for kiln serve; here name its --cluster-listen address: --cluster nats://HOST:PORT"}
	}
	if err := cfg.Check(); err != nil {
		return nil, &exitError{code: 2, msg: statusErr(err).Error()}
	}
	host, _ := os.Hostname()
	return cluster.Connect(ctx, cfg, "kiln-"+role+"@"+host, quietLogger())
}

// withClusterTrust adds what --cluster trusts to trust: the keys the cluster admitted
// and its sequencer's log key, which replaces any a --key export carried (the cluster's
// links are in its log); trust unchanged without --cluster.
func withClusterTrust(ctx context.Context, cfg cluster.Config, trust keys.Trust) (keys.Trust, error) {
	ct, err := clusterTrust(ctx, cfg)
	if err != nil {
		return trust, err
	}
	if ct.Log != nil {
		trust.Log = ct.Log
	}
	trust.Add(ct)
	return trust, nil
}

// clusterTrust reads a cluster's trust set for a verifier (--cluster on attest verify
// and rebuild); none without --cluster.
func clusterTrust(ctx context.Context, cfg cluster.Config) (keys.Trust, error) {
	if !cfg.Enabled() {
		return keys.Trust{}, nil
	}
	c, err := connectCluster(ctx, cfg, "verify")
	if err != nil {
		return keys.Trust{}, err
	}
	defer c.Close()
	t, err := c.TrustSet(ctx)
	if err != nil {
		return keys.Trust{}, err
	}
	if len(t.Keys) == 0 {
		return keys.Trust{}, fmt.Errorf("the cluster at %s trusts no executor key yet (kiln cluster admit-key)", cfg.String())
	}
	return t, nil
}

func newClusterCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "cluster",
		Short: "A kiln cluster's state and trust set: status, admit-key, retire-key",
	}
	c.AddCommand(newClusterStatusCmd(), newClusterAdmitCmd(), newClusterRetireCmd())
	return c
}

func newClusterStatusCmd() *cobra.Command {
	var cfg cluster.Config
	var asJSON bool
	c := &cobra.Command{
		Use:   "status",
		Short: "Workers, queue depth per platform and executions in flight",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			conn, err := connectCluster(cmd.Context(), cfg, "status")
			if err != nil {
				return err
			}
			defer conn.Close()
			st, err := conn.Status(cmd.Context())
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return printJSON(out, st)
			}
			fmt.Fprintf(out, "cluster %s: %d worker(s), %d execution(s) in flight, %d trusted key(s)\n", st.Server, len(st.Workers), st.InFlight, st.TrustedKeys)
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "PLATFORM\tPENDING\tRUNNING")
			for _, p := range st.Platforms {
				fmt.Fprintf(tw, "%s\t%d\t%d\n", p.Platform, p.Pending, p.Running)
			}
			tw.Flush()
			tw = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "WORKER\tID\tPLATFORM\tRUNNING\tKEY\tSEEN")
			for _, w := range st.Workers {
				name := w.Name
				if w.Draining {
					name += " (draining)"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d/%d\t%.16s\t%s ago\n", name, w.ID, w.Platform, w.Running, w.Concurrency, w.KeyID, time.Since(w.Seen).Round(time.Second))
			}
			return tw.Flush()
		},
	}
	addClusterFlags(c, &cfg, "status")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

func newClusterAdmitCmd() *cobra.Command {
	var cfg cluster.Config
	var asJSON bool
	c := &cobra.Command{
		Use:   "admit-key FILE",
		Short: "Trust a worker's executor key: its links are logged and verify (FILE: PEM, or kiln attest pubkey --json)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			data, err := os.ReadFile(args[0])
			if err != nil {
				return &exitError{code: 2, msg: err.Error()}
			}
			conn, err := connectCluster(cmd.Context(), cfg, "admin")
			if err != nil {
				return err
			}
			defer conn.Close()
			ks, err := conn.AdmitKeys(cmd.Context(), data, time.Now())
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), ks)
			}
			for _, k := range ks {
				fmt.Fprintf(cmd.OutOrStdout(), "admitted %s (since %s)\n", k.KeyID, k.NotBefore.Format(time.RFC3339))
			}
			return nil
		},
	}
	addClusterFlags(c, &cfg, "admin")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

func newClusterRetireCmd() *cobra.Command {
	var cfg cluster.Config
	var asJSON bool
	c := &cobra.Command{
		Use:   "retire-key ID",
		Short: "Stop trusting a worker's key for new links (links logged before stay valid)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			conn, err := connectCluster(cmd.Context(), cfg, "admin")
			if err != nil {
				return err
			}
			defer conn.Close()
			k, err := conn.RetireKey(cmd.Context(), args[0], time.Now())
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), k)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "retired %s on %s; the sequencer records the log size that bounds its links\n", k.KeyID, k.NotAfter.Format(time.RFC3339))
			return nil
		},
	}
	addClusterFlags(c, &cfg, "admin")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}
