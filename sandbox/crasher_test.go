package sandbox_test

import "os"

// crasher is filled in by the sweep test.
func crasher(dir string) { os.Exit(3) }
