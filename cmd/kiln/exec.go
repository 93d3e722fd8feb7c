package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine"
	"github.com/kilnbuild/kiln/engine/executor"
	"github.com/kilnbuild/kiln/engine/ui"
	"github.com/spf13/cobra"
	"google.golang.org/grpc/status"
)

// actionFlags are the flags that describe one action (kiln exec, kiln verify).
type actionFlags struct {
	data      string
	storage   engine.StorageConfig
	toolchain string
	input     string
	cwd       string
	outputs   []string
	env       []string
	timeout   time.Duration
	publicURL string
}

func (f *actionFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.toolchain, "toolchain", "", "toolchain image: docker://NAME@sha256:HEX, NAME@sha256:HEX or sha256:HEX (default: the store's default)")
	fl.StringVar(&f.input, "input", "", "directory that becomes the action's input root")
	fl.StringVar(&f.cwd, "cwd", "", "working directory, relative to the input root")
	fl.StringArrayVar(&f.outputs, "output", nil, "output path relative to --cwd (repeatable)")
	fl.StringArrayVar(&f.env, "env", nil, "environment entry NAME=VALUE (repeatable; nothing else is passed)")
	fl.DurationVar(&f.timeout, "timeout", 0, "action timeout (default: the engine's)")
	addDataFlag(cmd, &f.data)
	addStorageFlag(cmd, &f.storage)
	fl.StringVar(&f.publicURL, "public-url", "", "web UI of a kiln serve sharing this store, for the action's page in errors (default: the URL a kiln serve running on --data recorded)")
}

// pageURL makes the web page of an action, or is nil when no web UI is known: the one
// given by --public-url, else the one a kiln serve running on the same data dir recorded.
func (f *actionFlags) pageURL() func(cache.Digest) string {
	base := f.publicURL
	if base == "" {
		base = ui.RecordedBase(engine.DataDir(f.data).UIURL())
	}
	if base == "" {
		return nil
	}
	return func(d cache.Digest) string { return ui.ActionURL(base, d) }
}

// withPage appends an action's page, when a web UI is known, to an error message.
func withPage(msg string, page func(cache.Digest) string, d cache.Digest) string {
	if page == nil {
		return msg
	}
	if msg != "" {
		msg += "; "
	}
	return msg + "the action's page: " + page(d)
}

func (f *actionFlags) spec(args []string) executor.LocalSpec {
	return executor.LocalSpec{Toolchain: f.toolchain, InputDir: f.input, Cwd: f.cwd, Outputs: f.outputs,
		Env: f.env, Timeout: f.timeout, Args: args}
}

// execOutput is kiln exec's --json output.
type execOutput struct {
	Action   string            `json:"action"`
	ExitCode int32             `json:"exit_code"`
	Cached   bool              `json:"cached"`
	Status   string            `json:"status,omitempty"`
	Message  string            `json:"message,omitempty"`
	Outputs  map[string]string `json:"outputs"`
	Stdout   string            `json:"stdout"`
	Stderr   string            `json:"stderr"`
	Links    []string          `json:"links,omitempty"`
	Page     string            `json:"page,omitempty"` // the action's web page, when a web UI is known
}

func newExecCmd() *cobra.Command {
	var (
		af      actionFlags
		out     string
		jsonOut bool
		noCache bool
	)
	cmd := &cobra.Command{
		Use:   "exec [flags] -- ARGV...",
		Short: "Run one action locally in kiln's sandbox, through the same engine as the server",
		Long: `Run one action locally: the input directory and command become a REAPI Action
(stored in the data dir's CAS), which runs in a fresh sandbox on its pinned toolchain
exactly as kiln serve would run it, with the same digests, cache and sandbox.

The action's stdout and stderr are copied to kiln's; then the action digest, exit
code and output digests are printed on stdout (JSON with --json, which then replaces
the copy of the action's stdout). Outputs are written under --out when given.
Exit status: the action's own; 124 when it timed out; 2 for a usage or set-up error.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			page := af.pageURL()
			eng, err := engine.Open(ctx, engine.Options{Data: engine.DataDir(af.data), Storage: af.storage, Logger: quietLogger(), Version: version,
				ActionURL: page})
			if err != nil {
				return statusErr(err)
			}
			defer eng.Close()
			res, err := eng.RunLocal(ctx, af.spec(args), noCache, nil)
			if err != nil {
				return statusErr(err)
			}
			ex := res.Execution
			r := ex.Result
			if out != "" {
				if err := executor.WriteOutputs(ctx, eng.CAS, r, out); err != nil {
					return fmt.Errorf("write outputs to %s: %w", out, err)
				}
			}
			o := execOutput{Action: "sha256:" + res.ActionDigest.Hash + "/" + fmt.Sprint(res.ActionDigest.Size),
				ExitCode: r.GetExitCode(), Cached: ex.Cached, Message: ex.Message, Outputs: map[string]string{},
				Stdout: digestString(r.GetStdoutDigest()), Stderr: digestString(r.GetStderrDigest())}
			if ex.Status != nil {
				o.Status = status.Convert(ex.Status).Message()
			}
			if page != nil {
				o.Page = page(res.ActionDigest)
			}
			for _, f := range r.GetOutputFiles() {
				o.Outputs[f.GetPath()] = digestString(f.GetDigest())
			}
			for _, d := range r.GetOutputDirectories() {
				o.Outputs[d.GetPath()+"/"] = "tree:" + digestString(d.GetTreeDigest())
			}
			if !jsonOut {
				copyBlob(ctx, eng.CAS, r.GetStdoutDigest(), os.Stdout)
			}
			copyBlob(ctx, eng.CAS, r.GetStderrDigest(), os.Stderr)
			if jsonOut {
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				enc.Encode(o)
			} else {
				fmt.Printf("action %s\nexit %d\n", o.Action, o.ExitCode)
				if o.Cached {
					fmt.Println("cached true")
				}
				for _, p := range sortedKeys(o.Outputs) {
					fmt.Printf("output %s %s\n", p, o.Outputs[p])
				}
			}
			if ex.Job.TimedOut {
				return &exitError{code: 124, msg: withPage(o.Status, page, res.ActionDigest)}
			}
			if ex.Status != nil {
				return &exitError{code: 125, msg: withPage(o.Status, page, res.ActionDigest)}
			}
			if r.GetExitCode() != 0 {
				return &exitError{code: int(r.GetExitCode()), msg: withPage("", page, res.ActionDigest)}
			}
			return nil
		},
	}
	af.register(cmd)
	cmd.Flags().StringVar(&out, "out", "", "write the outputs under this directory")
	cmd.Flags().BoolVar(&jsonOut, "json", false, "print the result as JSON")
	cmd.Flags().BoolVar(&noCache, "no-cache", false, "neither read nor write the action cache")
	return cmd
}

func digestString(p interface {
	GetHash() string
	GetSizeBytes() int64
}) string {
	if p == nil || p.GetHash() == "" {
		return ""
	}
	return fmt.Sprintf("sha256:%s/%d", p.GetHash(), p.GetSizeBytes())
}

func copyBlob(ctx context.Context, cas cache.BlobStore, p interface {
	GetHash() string
	GetSizeBytes() int64
}, w io.Writer) {
	if p == nil || p.GetHash() == "" || p.GetSizeBytes() == 0 {
		return
	}
	d, err := cache.NewDigest(p.GetHash(), p.GetSizeBytes())
	if err != nil {
		return
	}
	if r, err := cas.Get(ctx, d, 0); err == nil {
		io.Copy(w, r)
		r.Close()
	}
}
