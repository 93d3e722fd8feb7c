package sandbox

import (
	"os"

	"github.com/opencontainers/runc/libcontainer"
	// nsenter's C constructor does the namespace set-up of the re-executed init
	// before the Go runtime starts; it must be linked into every binary using Runner.
	_ "github.com/opencontainers/runc/libcontainer/nsenter"
)

// Init runs the container init when this process is a sandbox's re-executed child
// and never returns then; otherwise it returns at once. Call it first in main (and in
// TestMain of tests that use a Runner), before flags or other set-up.
func Init() {
	if len(os.Args) > 1 && os.Args[1] == "init" && os.Getenv("_LIBCONTAINER_INITPIPE") != "" {
		libcontainer.Init() // never returns
	}
}
