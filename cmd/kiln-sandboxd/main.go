// Command kiln-sandboxd is kiln's sandbox daemon: kiln starts it (from a copy embedded
// in the kiln binary) and has it create every sandbox. It links only package sandbox
// and runc's libcontainer, because libcontainer re-executes the binary that calls it
// as each container's init: a small binary makes every sandbox cheaper than the whole
// of kiln would. See docs/sandbox.md. It is not meant to be run by hand.
package main

import (
	"fmt"
	"os"

	"github.com/kilnbuild/kiln/sandbox"
)

func main() {
	// When started by kiln, or re-executed as a container's init, become that
	// (never returns).
	sandbox.Init()
	fmt.Fprintln(os.Stderr, "kiln-sandboxd: this is kiln's sandbox daemon; kiln starts it, it is not run by hand")
	os.Exit(2)
}
