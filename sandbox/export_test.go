package sandbox

// CgroupName exposes the cgroup parent name of a state dir to the tests.
var CgroupName = cgroupName

// ConfigFor returns cfg set to run sandboxes through the sandbox daemon binary exe,
// or from the calling process when exe is nil.
func ConfigFor(cfg Config, exe []byte) Config {
	if exe == nil {
		cfg.inProcess = true
	} else {
		cfg.daemon = exe
	}
	return cfg
}

// DaemonPid returns the pid of r's sandbox daemon (0 when r runs sandboxes itself).
func DaemonPid(r *Runner) int {
	d, ok := r.impl.(*daemonRunner)
	if !ok {
		return 0
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.d == nil {
		return 0
	}
	return d.d.pid
}
