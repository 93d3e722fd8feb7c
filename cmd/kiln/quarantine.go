package main

import (
	"fmt"
	"os"

	"github.com/kilnbuild/kiln/engine/quarantine"
	"github.com/spf13/cobra"
)

func newQuarantineCmd() *cobra.Command {
	var data string
	var jsonOut bool
	open := func() (*quarantine.List, error) { return quarantine.Open(data) }
	c := &cobra.Command{
		Use:   "quarantine",
		Short: "Artifacts kiln no longer hands out (failed rebuilds, operator blocks), and the audit log",
		Long: `A quarantined artifact (by digest) is never returned by kiln serve on this data
dir: action-cache entries whose outputs include it are misses, and an execution that
produces it fails with FAILED_PRECONDITION. kiln rebuild quarantines the subject of a
FAILED rebuild; operators quarantine and release by hand. Every change is appended to
DATA/audit.log.`,
	}
	c.PersistentFlags().BoolVar(&jsonOut, "json", false, "print JSON")
	c.PersistentFlags().StringVar(&data, "data", defaultDataDir(), "data directory (store, toolchains, keys, logs)")

	ls := &cobra.Command{
		Use: "ls", Short: "List quarantined artifacts with their reasons", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			l, err := open()
			if err != nil {
				return statusErr(err)
			}
			es, err := l.List()
			if err != nil {
				return statusErr(err)
			}
			if jsonOut {
				if es == nil {
					es = []quarantine.Entry{}
				}
				return printJSON(os.Stdout, es)
			}
			for _, e := range es {
				subj := ""
				if e.Subject != "" {
					subj = " " + e.Subject
				}
				fmt.Printf("%s%s\t%s\tby %s\t%s\n", e.Digest, subj, e.Since.Format("2006-01-02T15:04:05Z"), e.By, e.Reason)
			}
			return nil
		},
	}
	var reason, subject string
	add := &cobra.Command{
		Use: "add DIGEST --reason TEXT", Short: "Quarantine an artifact by digest (sha256:HEX)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			l, err := open()
			if err != nil {
				return statusErr(err)
			}
			e, err := l.Add(args[0], subject, reason, "kiln quarantine add")
			if err != nil {
				return statusErr(err)
			}
			if jsonOut {
				return printJSON(os.Stdout, e)
			}
			fmt.Printf("quarantined %s\n", e.Digest)
			return nil
		},
	}
	add.Flags().StringVar(&reason, "reason", "", "why (required; goes to the audit log)")
	add.Flags().StringVar(&subject, "subject", "", "a name for the artifact (informational)")
	release := &cobra.Command{
		Use: "release DIGEST --reason TEXT", Short: "Release a quarantined artifact", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			l, err := open()
			if err != nil {
				return statusErr(err)
			}
			e, err := l.Release(args[0], reason, "kiln quarantine release")
			if err != nil {
				return statusErr(err)
			}
			if jsonOut {
				return printJSON(os.Stdout, e)
			}
			fmt.Printf("released %s\n", e.Digest)
			return nil
		},
	}
	release.Flags().StringVar(&reason, "reason", "", "why (required; goes to the audit log)")
	audit := &cobra.Command{
		Use: "audit", Short: "Print the audit log of quarantines and releases", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			l, err := open()
			if err != nil {
				return statusErr(err)
			}
			rs, err := l.Audit()
			if err != nil {
				return statusErr(err)
			}
			if jsonOut {
				if rs == nil {
					rs = []quarantine.AuditRecord{}
				}
				return printJSON(os.Stdout, rs)
			}
			for _, r := range rs {
				fmt.Printf("%s\t%s\t%s\tby %s (uid %d on %s)\t%s\n", r.Time.Format("2006-01-02T15:04:05Z"), r.Event, r.Digest, r.By, r.User, r.Host, r.Reason)
			}
			return nil
		},
	}
	c.AddCommand(ls, add, release, audit)
	return c
}
