// Command kiln is a hermetic, reproducible, attested build-execution engine: a Remote
// Execution API backend, a local action runner and a rebuild verifier in one binary.
package main

import (
	"errors"
	"fmt"
	"os"
	"strings"

	clog "github.com/containerd/log"
	"github.com/spf13/cobra"

	"github.com/kilnbuild/kiln/engine/server"
	"github.com/kilnbuild/kiln/sandbox"
)

// version is the kiln release; set with -ldflags "-X main.version=...".
var version = "0.1.0-dev"

func main() {
	// First of all: when started as the sandbox daemon (KILN_SANDBOX_DAEMON=0 aside,
	// kiln runs its embedded kiln-sandboxd instead), become it (never returns).
	sandbox.Init()
	// containerd's process-wide logger warns on every content-store open where
	// fs-verity is missing; kiln's own logs say what matters.
	_ = clog.SetLevel("error")
	root := newRootCmd()
	err := root.Execute()
	if err == nil {
		return
	}
	var ee *exitError
	if errors.As(err, &ee) {
		if ee.msg != "" {
			fmt.Fprintln(os.Stderr, "kiln: "+oneLine(ee.msg))
		}
		os.Exit(ee.code)
	}
	fmt.Fprintln(os.Stderr, "kiln: "+oneLine(statusErr(err).Error())) // a gRPC status prints as its message alone
	os.Exit(2)
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "kiln",
		Short:         "Hermetic, reproducible, attested build execution",
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       version,
	}
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error {
		return &exitError{code: 2, msg: err.Error()}
	})
	root.AddCommand(
		newServeCmd(server.Serve),
		newToolchainCmd(),
		newSandboxCmd(),
		newExecCmd(),
		newVerifyCmd(),
		newLockCmd(),
		newAttestCmd(),
		newLogCmd(),
		newQuarantineCmd(),
		newRevokeCmd(),
		newAuditCmd(),
		newExportCmd(),
		newRebuildCmd(),
		newGateCmd(),
		newWorkerCmd(),
		newSequencerCmd(),
		newClusterCmd(),
	)
	return root
}

// exitError ends the process with a given exit code and an optional one-line message.
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return fmt.Sprintf("exit status %d: %s", e.code, e.msg) }

// oneLine folds a multi-line message into one line, as every CLI error must be.
func oneLine(s string) string {
	s = strings.TrimSpace(s)
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", " ")), " ")
}
