package sandbox

import (
	"os"
)

// daemonEnvMark is set (to 1) in the environment of a sandbox daemon by the kiln
// process that starts it.
const daemonEnvMark = "_KILN_SANDBOXD"

// Init runs the sandbox daemon when kiln started this process as one, and never
// returns then; otherwise it returns at once. Call it first in main (and in TestMain
// of tests that use a Runner), before flags or other set-up.
//
// Any binary that calls Init can so serve as the sandbox daemon; kiln runs
// kiln-sandboxd (cmd/kiln-sandboxd), which links nothing else.
func Init() {
	if os.Getenv(daemonEnvMark) == "1" {
		os.Unsetenv(daemonEnvMark)
		os.Exit(daemonMain())
	}
}
