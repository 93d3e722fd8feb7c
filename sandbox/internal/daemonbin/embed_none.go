//go:build !sandboxd

package daemonbin

// Binary is empty: this build does not carry the sandbox daemon.
var Binary []byte
