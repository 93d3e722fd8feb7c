//go:build !(cgo && seccomp)

package seccomp

import (
	"errors"

	"golang.org/x/sys/unix"
)

// Enabled says whether Compile can compile the profile: not in this build (it needs
// cgo and the seccomp tag, to link libseccomp).
const Enabled = false

// Compile fails: this build does not link libseccomp.
func Compile() ([]unix.SockFilter, error) {
	return nil, errors.New("seccomp: kiln was built without seccomp support (build with CGO_ENABLED=1 -tags seccomp)")
}
