package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/audit"
	"github.com/kilnbuild/kiln/engine/quarantine"
	"github.com/kilnbuild/kiln/engine/revoke"
	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func newRevokeCmd() *cobra.Command {
	var (
		data, identity, key, since, reason string
		jsonOut                            bool
	)
	c := &cobra.Command{
		Use:   "revoke (--identity PATTERN | --key KEYID [--since TIME]) --reason TEXT",
		Short: "Refuse a client identity, or revoke an executor key and quarantine what it signed",
		Long: `kiln revoke writes DATA/revocations.json; a running kiln serve on the data dir reads
it at the next call (no restart).

--identity PATTERN refuses every caller whose identity matches, with UNAUTHENTICATED:
cert:COMMON-NAME, spiffe://TRUST-DOMAIN/PATH or oidc:ISSUER#SUBJECT, '*' matching any
run of characters (e.g. 'oidc:https://token.actions.githubusercontent.com#repo:acme/app:*').

--key KEYID (at least 8 hex digits of an executor key id, see kiln attest pubkey --all)
stops every kiln process on the data dir from signing with the key, and quarantines
every artifact a link signed by it at or after --since names as a product (default:
all of them); it prints them. Rotate the key next (kiln attest key rotate).

Every revocation and undo is appended to DATA/audit.log.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if (identity == "") == (key == "") {
				return &exitError{code: 2, msg: "give exactly one of --identity PATTERN or --key KEYID"}
			}
			if since != "" && key == "" {
				return &exitError{code: 2, msg: "--since goes with --key (an identity is refused from now on)"}
			}
			l := revoke.Open(data)
			if identity != "" {
				e, err := l.RevokeIdentity(identity, reason, "kiln revoke")
				if err != nil {
					return statusErr(err)
				}
				if jsonOut {
					return printJSON(os.Stdout, e)
				}
				fmt.Printf("revoked %s (%s)\n", e.Identity, e.ID)
				return nil
			}
			t, err := parseSince(since, time.Now())
			if err != nil {
				return &exitError{code: 2, msg: err.Error()}
			}
			ring := filepath.Join(attest.PathsFor(data).Keys, "keyring.json")
			if _, err := os.Stat(ring); err != nil {
				return statusErr(status.Errorf(codes.NotFound, "no executor keyring in %s: nothing was signed there", data))
			}
			kr, err := openKeyring(cmd.Context(), data)
			if err != nil {
				return statusErr(err)
			}
			ks, err := kr.Keys()
			if err != nil {
				return statusErr(err)
			}
			k, err := revoke.ResolveKey(ks, key)
			if err != nil {
				return statusErr(err)
			}
			q, err := quarantine.Open(data)
			if err != nil {
				return statusErr(err)
			}
			res, err := l.RevokeKey(cmd.Context(), k, t, reason, "kiln revoke", q)
			if err != nil {
				return statusErr(err)
			}
			if jsonOut {
				return printJSON(os.Stdout, res)
			}
			from := "ever"
			if !t.IsZero() {
				from = "since " + t.UTC().Format(time.RFC3339)
			}
			fmt.Printf("revoked executor key %s (%s): %d links signed by it %s; %d artifacts quarantined, %d already were\n",
				k.KeyID, res.Entry.ID, res.Links, from, len(res.Quarantined), len(res.AlreadyQuarantined))
			for _, d := range res.Quarantined {
				fmt.Printf("quarantined %s\n", d)
			}
			if k.Active() {
				fmt.Println("the key is the data dir's active key: nothing more is signed until you run `kiln attest key rotate`")
			}
			return nil
		},
	}
	f := c.Flags()
	f.StringVar(&identity, "identity", "", "identity pattern to refuse (cert:CN, spiffe://TD/PATH, oidc:ISSUER#SUBJECT; '*' matches anything)")
	f.StringVar(&key, "key", "", "executor key id (or a unique prefix of 8+ hex digits) to revoke")
	f.StringVar(&since, "since", "", "with --key: quarantine the products of links signed at or after TIME (RFC 3339, YYYY-MM-DD, or a duration ago such as 72h; default: all)")
	f.StringVar(&reason, "reason", "", "why (required; goes to the audit log)")
	c.PersistentFlags().BoolVar(&jsonOut, "json", false, "print JSON")
	c.PersistentFlags().StringVar(&data, "data", defaultDataDir(), "data directory (store, toolchains, keys, logs)")

	ls := &cobra.Command{
		Use: "ls", Short: "List the revocations in force", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			es, err := revoke.Open(data).List()
			if err != nil {
				return statusErr(err)
			}
			if jsonOut {
				if es == nil {
					es = []revoke.Entry{}
				}
				return printJSON(os.Stdout, es)
			}
			for _, e := range es {
				extra := ""
				if e.Key != "" {
					extra = fmt.Sprintf(" (%d artifacts quarantined", len(e.Quarantined))
					if !e.Since.IsZero() {
						extra += ", links since " + e.Since.Format(time.RFC3339)
					}
					extra += ")"
				}
				fmt.Printf("%s\t%s\t%s%s\tby %s\t%s\n", e.ID, e.At.Format(time.RFC3339), e.What(), extra, e.By, e.Reason)
			}
			return nil
		},
	}
	var undoReason string
	undo := &cobra.Command{
		Use: "undo ID|PATTERN|KEYID --reason TEXT", Short: "Lift a revocation (a key's: release the artifacts it quarantined)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			q, err := quarantine.Open(data)
			if err != nil {
				return statusErr(err)
			}
			e, released, err := revoke.Open(data).Undo(args[0], undoReason, "kiln revoke undo", q)
			if err != nil {
				return statusErr(err)
			}
			if jsonOut {
				if released == nil {
					released = []string{}
				}
				return printJSON(os.Stdout, map[string]any{"revocation": e, "released": released})
			}
			fmt.Printf("lifted %s (%s)\n", e.ID, e.What())
			for _, d := range released {
				fmt.Printf("released %s\n", d)
			}
			return nil
		},
	}
	undo.Flags().StringVar(&undoReason, "reason", "", "why (required; goes to the audit log)")
	c.AddCommand(ls, undo)
	return c
}

// parseSince reads --since: RFC 3339, a date (midnight UTC), or a duration before now.
func parseSince(s string, now time.Time) (time.Time, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return time.Time{}, nil
	}
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	if t, err := time.Parse("2006-01-02", s); err == nil {
		return t, nil
	}
	if d, err := time.ParseDuration(s); err == nil && d >= 0 {
		return now.Add(-d), nil
	}
	return time.Time{}, fmt.Errorf("--since %q: want RFC 3339 (2024-05-01T12:00:00Z), a date (2024-05-01) or a duration ago (72h)", s)
}

func newAuditCmd() *cobra.Command {
	var (
		data    string
		events  []string
		jsonOut bool
	)
	c := &cobra.Command{
		Use:   "audit",
		Short: "Print the audit log: quarantines, releases, revocations, Execute calls",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rs, err := audit.Open(data).Records(events...)
			if err != nil {
				return statusErr(err)
			}
			if jsonOut {
				if rs == nil {
					rs = []audit.Record{}
				}
				return printJSON(os.Stdout, rs)
			}
			for _, r := range rs {
				var what []string
				for _, kv := range [][2]string{{"", r.Digest}, {"", r.Subject}, {"identity=", r.Identity}, {"key=", r.Key},
					{"revocation=", r.Revocation}, {"action=", r.Action}, {"operation=", r.Operation}, {"peer=", r.Peer}} {
					if kv[1] != "" {
						what = append(what, kv[0]+kv[1])
					}
				}
				fmt.Printf("%s\t%s\t%s\tby %s (uid %d on %s)\t%s\n", r.Time.Format("2006-01-02T15:04:05Z"), r.Event, strings.Join(what, " "), r.By, r.User, r.Host, r.Reason)
			}
			return nil
		},
	}
	c.Flags().StringArrayVar(&events, "event", nil, "only these events (quarantine, release, revoke, unrevoke, execute; repeatable)")
	c.Flags().BoolVar(&jsonOut, "json", false, "print JSON")
	addDataFlag(c, &data)
	return c
}
