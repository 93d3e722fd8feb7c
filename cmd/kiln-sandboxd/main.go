// Command kiln-sandboxd is kiln's sandbox daemon: kiln starts it (from a copy embedded
// in the kiln binary) and has it create every sandbox. It links only package sandbox.
// See docs/sandbox.md. It is not meant to be run by hand.
package main

import (
	"fmt"
	"os"

	"github.com/kilnbuild/kiln/sandbox"
)

func main() {
	// When started by kiln, become the daemon (never returns).
	sandbox.Init()
	fmt.Fprintln(os.Stderr, "kiln-sandboxd: this is kiln's sandbox daemon; kiln starts it, it is not run by hand")
	os.Exit(2)
}
