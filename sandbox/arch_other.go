//go:build !amd64

package sandbox

const supportedArch = false
