//go:build !(linux && cgo)

package spawn

import "errors"

// Enabled says whether this build can start sandboxes: it cannot (it needs linux and
// cgo).
const Enabled = false

// Source is empty in this build.
var Source []byte

// Start fails in this build.
func Start(*Params) (*Process, error) { return nil, errors.New("spawn: not supported in this build") }
