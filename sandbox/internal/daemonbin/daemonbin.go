// Package daemonbin carries the kiln-sandboxd binary inside kiln, when kiln is built
// with the build tag sandboxd (`make build` builds the daemon first, into
// sandbox/internal/daemonbin/kiln-sandboxd, then kiln with that tag). Without the tag,
// Binary is empty and the sandbox package runs sandboxes in-process.
package daemonbin
