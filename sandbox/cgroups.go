package sandbox

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/opencontainers/cgroups"
	devices "github.com/opencontainers/cgroups/devices/config"
	"github.com/opencontainers/cgroups/fs"
	"github.com/opencontainers/cgroups/fs2"
	"golang.org/x/sys/unix"

	// Registers the devices controller (v1 rules, v2 eBPF program) with the managers.
	_ "github.com/opencontainers/cgroups/devices"
)

// A Runner's sandboxes live in cgroups below one parent, kiln-sandbox-<hash of the
// state dir>, below the Runner's own cgroup. The parent holds the devices rule every
// sandbox shares (cgroup v1: sandboxes join the parent's devices cgroup; v2: the
// parent's device program applies to its descendants), so that creating a sandbox
// makes only the cgroups whose limits are its own: memory and pids, and cpu and
// cpuset when it asks for a quota or a CPU set.
type cgroupParent struct {
	name    string
	v2      bool
	own     map[string]string // v1: subsystem -> this process's cgroup
	mounts  map[string]string // v1: subsystem -> mount point of its hierarchy
	v2Dir   string            // v2: the parent's directory
	devices string            // v1: the parent's devices cgroup, which sandboxes join
}

// newCgroupParent creates the parent cgroup of name with the devices rule.
func newCgroupParent(name string) (*cgroupParent, error) {
	p := &cgroupParent{name: name, v2: cgroups.IsCgroup2UnifiedMode()}
	rules := []*devices.Rule{{Type: devices.WildcardDevice, Major: devices.Wildcard, Minor: devices.Wildcard, Permissions: "rwm", Allow: false}}
	for _, d := range sandboxDevices {
		rules = append(rules, &d.Rule)
	}
	res := &cgroups.Resources{Devices: rules}
	own, err := cgroups.ParseCgroupFile("/proc/self/cgroup")
	if err != nil {
		return nil, err
	}
	var m cgroups.Manager
	var dir string
	if p.v2 {
		p.v2Dir = filepath.Join("/sys/fs/cgroup", own[""], name)
		dir = p.v2Dir
		if m, err = fs2.NewManager(&cgroups.Cgroup{Resources: res}, dir); err != nil {
			return nil, err
		}
	} else {
		mounts, err := cgroups.GetCgroupMounts(false)
		if err != nil {
			return nil, err
		}
		p.own, p.mounts = own, map[string]string{}
		for _, m := range mounts {
			for _, s := range m.Subsystems {
				p.mounts[s] = m.Mountpoint
			}
		}
		for _, s := range []string{"memory", "pids", "devices"} {
			if p.mounts[s] == "" {
				return nil, fmt.Errorf("the %s cgroup hierarchy is not mounted", s)
			}
		}
		p.devices = p.dir("devices", "")
		dir = p.devices
		if m, err = fs.NewManager(&cgroups.Cgroup{Resources: res}, map[string]string{"devices": dir}); err != nil {
			return nil, err
		}
	}
	if err := m.Apply(-1); err != nil {
		return nil, fmt.Errorf("cgroup %s: %w", dir, err)
	}
	if err := m.Set(res); err != nil {
		return nil, fmt.Errorf("cgroup %s: devices: %w", dir, err)
	}
	return p, nil
}

// dir is the v1 directory of sub (a sandbox id, or "" for the parent) in subsystem's
// hierarchy.
func (p *cgroupParent) dir(subsystem, sub string) string {
	return filepath.Join(p.mounts[subsystem], p.own[subsystem], p.name, sub)
}

// sandboxCgroups are the cgroups of one sandbox.
type sandboxCgroups struct {
	m     cgroups.Manager
	procs []*os.File // cgroup.procs of every cgroup the sandbox joins
}

// create makes the cgroups of sandbox id with s's limits and opens the files the
// sandbox's first process writes itself into.
func (p *cgroupParent) create(id string, s *Spec) (_ *sandboxCgroups, retErr error) {
	res := &cgroups.Resources{
		Memory:     s.Limits.MemoryBytes,
		MemorySwap: s.Limits.MemoryBytes,
		PidsLimit:  &s.Limits.Pids,
		CpusetCpus: s.CPUs,
		// The parent's rule covers every sandbox (see cgroupParent).
		SkipDevices: true,
	}
	if s.Limits.CPUs > 0 {
		res.CpuPeriod = 100000
		res.CpuQuota = int64(s.Limits.CPUs * 100000)
	}
	cg := &cgroups.Cgroup{Resources: res}
	c := &sandboxCgroups{}
	var join []string
	if p.v2 {
		dir := filepath.Join(p.v2Dir, id)
		m, err := fs2.NewManager(cg, dir)
		if err != nil {
			return nil, err
		}
		c.m, join = m, []string{dir}
	} else {
		paths := map[string]string{"memory": p.dir("memory", id), "pids": p.dir("pids", id)}
		if s.CPUs != "" {
			if p.mounts["cpuset"] == "" {
				return nil, fmt.Errorf("a CPU set needs the cpuset cgroup hierarchy, which is not mounted")
			}
			paths["cpuset"] = p.dir("cpuset", id)
		}
		if res.CpuQuota > 0 {
			if p.mounts["cpu"] == "" {
				return nil, fmt.Errorf("a CPU quota needs the cpu cgroup hierarchy, which is not mounted")
			}
			paths["cpu"] = p.dir("cpu", id)
		}
		m, err := fs.NewManager(cg, paths)
		if err != nil {
			return nil, err
		}
		c.m = m
		for _, d := range paths {
			join = append(join, d)
		}
		join = append(join, p.devices)
	}
	defer func() {
		if retErr != nil {
			c.remove()
		}
	}()
	if err := c.m.Apply(-1); err != nil {
		return c, err
	}
	if err := c.m.Set(res); err != nil {
		return c, err
	}
	for _, d := range join {
		f, err := os.OpenFile(filepath.Join(d, "cgroup.procs"), os.O_WRONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return c, err
		}
		c.procs = append(c.procs, f)
	}
	return c, nil
}

// closeProcs closes the cgroup.procs files, once the sandbox has joined.
func (c *sandboxCgroups) closeProcs() {
	for _, f := range c.procs {
		f.Close()
	}
	c.procs = nil
}

// oomKilled reports whether the kernel's OOM killer killed a process in the cgroups.
func (c *sandboxCgroups) oomKilled() bool {
	n, err := c.m.OOMKillCount()
	return err == nil && n > 0
}

// remove removes the cgroups (their processes must be gone); it kills and waits for
// any process still in them (none should be: they all die with the pid namespace).
func (c *sandboxCgroups) remove() error {
	c.closeProcs()
	if c.m == nil {
		return nil
	}
	if err := c.m.Destroy(); err != nil {
		left := forceRemoveCgroups(c.m.GetPaths())
		if err := c.m.Destroy(); err != nil {
			return fmt.Errorf("%w (processes left: %v)", err, left)
		}
	}
	return nil
}
