package sandbox

import (
	"os"

	"github.com/opencontainers/runc/libcontainer"
	// nsenter's C constructor does the namespace set-up of the re-executed init
	// before the Go runtime starts; it must be linked into every binary using Runner.
	_ "github.com/opencontainers/runc/libcontainer/nsenter"
)

// daemonEnvMark is set (to 1) in the environment of a sandbox daemon by the kiln
// process that starts it.
const daemonEnvMark = "_KILN_SANDBOXD"

// Init runs the container init when this process is a sandbox's re-executed child,
// or the sandbox daemon when kiln started this process as one, and never returns
// then; otherwise it returns at once. Call it first in main (and in TestMain of tests
// that use a Runner), before flags or other set-up.
//
// Any binary that calls Init can so serve as the sandbox daemon; kiln runs
// kiln-sandboxd (cmd/kiln-sandboxd), which links nothing else, because the daemon's
// binary is what libcontainer re-executes as every container's init.
func Init() {
	if len(os.Args) > 1 && os.Args[1] == "init" && os.Getenv("_LIBCONTAINER_INITPIPE") != "" {
		libcontainer.Init() // never returns
	}
	if os.Getenv(daemonEnvMark) == "1" {
		os.Unsetenv(daemonEnvMark)
		os.Exit(daemonMain())
	}
}
