//go:build sandboxd

package daemonbin

import _ "embed"

// Binary is kiln-sandboxd, built by `make build` just before kiln.
//
//go:embed kiln-sandboxd
var Binary []byte
