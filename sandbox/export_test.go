package sandbox

// CgroupName exposes the cgroup parent name of a state dir to the tests.
var CgroupName = cgroupName
