package sandbox

// supportedArch: kiln-init and the seccomp profile exist for linux/amd64 only.
const supportedArch = true
