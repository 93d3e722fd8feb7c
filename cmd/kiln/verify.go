package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine"
	"github.com/kilnbuild/kiln/engine/executor"
	"github.com/kilnbuild/kiln/engine/verify"
	"github.com/spf13/cobra"
)

func newVerifyCmd() *cobra.Command {
	var (
		af         actionFlags
		action     string
		runs       int
		variations string
		jsonOut    bool
		keep       string
		diffoscope string
	)
	cmd := &cobra.Command{
		Use:   "verify [--runs N] [--variations LIST] [--json] [--keep DIR] (--action DIGEST | [kiln exec flags] -- ARGV...)",
		Short: "Run an action several times with sandbox variations and check that every output is identical",
		Long: `Run one action N times (--runs, default 2) in fresh sandboxes, without the action
cache: run 1 with kiln's fixed sandbox, each further run with every variation changed
(host name, uid/gid, exec-root path, CPU set, ASLR, environment order, and a later
wall-clock second). Every output file (also inside output directories), symlink,
directory, stdout, stderr and the exit code are compared bit for bit.

When something differs, each difference is narrowed down to the variation that
causes it by rerunning with one variation at a time, and the differing versions are
written to a report directory (--keep DIR, or a new temporary one) with diffoscope's
text and HTML reports when diffoscope is installed.

The action is given as with kiln exec (same flags), or by --action DIGEST when its
Action, Command and inputs are in the data dir's CAS.
Exit status: 0 deterministic, 1 nondeterministic, 2 usage or set-up error (including
an action that fails in its first run). See docs/verify.md.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			usage := func(format string, a ...any) error { return &exitError{code: 2, msg: fmt.Sprintf(format, a...)} }
			if (action == "") == (len(args) == 0) {
				return usage("give either --action DIGEST or the action's command after --")
			}
			if action != "" {
				for _, f := range []string{"toolchain", "input", "cwd", "output", "env", "timeout"} {
					if cmd.Flags().Changed(f) {
						return usage("--%s describes a new action; --action names a stored one: give one or the other", f)
					}
				}
			}
			vars, err := verify.ParseVariations(variations)
			if err != nil {
				return usage("--variations: %v", err)
			}
			if runs < 2 || runs > verify.MaxRuns {
				return usage("--runs %d: want 2 to %d", runs, verify.MaxRuns)
			}
			dpath := ""
			switch diffoscope {
			case "":
				dpath = verify.LookDiffoscope()
			case "none":
				dpath = verify.DiffoscopeDisabled
			default:
				if dpath, err = exec.LookPath(diffoscope); err != nil {
					return usage("--diffoscope %s: %v", diffoscope, err)
				}
			}
			if keep != "" {
				if ents, err := os.ReadDir(keep); err == nil && len(ents) > 0 {
					return usage("--keep %s: the directory is not empty", keep)
				} else if err != nil && !os.IsNotExist(err) {
					return usage("--keep %s: %v", keep, err)
				}
			}

			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			page := af.pageURL()
			eng, err := engine.Open(ctx, engine.Options{Data: engine.DataDir(af.data), Storage: af.storage, Logger: quietLogger(), ActionURL: page})
			if err != nil {
				return statusErr(err)
			}
			defer eng.Close()
			var d cache.Digest
			if action != "" {
				if d, err = cache.ParseDigest(strings.TrimPrefix(action, "sha256:")); err != nil {
					return usage("--action: %v", statusErr(err))
				}
			} else if d, err = executor.BuildAction(ctx, eng.CAS, af.spec(args)); err != nil {
				return statusErr(err)
			}
			rep, err := eng.Verify(ctx, d, verify.Options{Runs: runs, Variations: vars})
			if err != nil && action != "" {
				return fmt.Errorf("--action %s: %w", action, statusErr(err))
			}
			if err != nil {
				return statusErr(err)
			}
			if rep.BaselineFailed {
				if sd, err := cache.ParseDigest(strings.TrimPrefix(rep.Runs[0].Stderr, "sha256:")); err == nil {
					copyBlob(ctx, eng.CAS, sd.Proto(), os.Stderr)
				}
				return &exitError{code: 2, msg: withPage(fmt.Sprintf("the action failed in its first run (exit code %d): kiln verify needs an action that succeeds", rep.Runs[0].Exit), page, d)}
			}
			if keep != "" || !rep.Deterministic {
				dir := keep
				if dir == "" {
					if dir, err = os.MkdirTemp("", "kiln-verify-"); err != nil {
						return err
					}
				}
				err := verify.WriteArtifacts(ctx, eng.CAS, rep, verify.ArtifactOptions{Dir: dir, KeepAll: keep != "", Diffoscope: dpath})
				if err != nil {
					return fmt.Errorf("write the report to %s: %w", dir, err)
				}
			}
			if jsonOut {
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				if err := enc.Encode(rep); err != nil {
					return err
				}
			} else if err := verify.WriteText(os.Stdout, rep); err != nil {
				return err
			}
			if !rep.Deterministic {
				if page != nil {
					return &exitError{code: 1, msg: withPage("the action is not deterministic", page, d)}
				}
				return &exitError{code: 1}
			}
			return nil
		},
	}
	af.register(cmd)
	f := cmd.Flags()
	f.StringVar(&action, "action", "", "verify a stored action by digest (sha256:HEX/SIZE, as kiln exec prints it)")
	f.IntVar(&runs, "runs", 2, fmt.Sprintf("runs to compare, the baseline included (2 to %d)", verify.MaxRuns))
	f.StringVar(&variations, "variations", "all", "comma-separated variations: "+strings.Join(verify.All, ",")+" (or all)")
	f.BoolVar(&jsonOut, "json", false, "print the report as JSON")
	f.StringVar(&keep, "keep", "", "keep every run's outputs and the reports in this new or empty directory")
	f.StringVar(&diffoscope, "diffoscope", "", `diffoscope binary (default: diffoscope on PATH if installed; "none" to skip it)`)
	return cmd
}
