package verify

import (
	"fmt"
	"strconv"
	"strings"
)

// The variations: what a run may change about the sandbox without changing what a
// deterministic action produces. Their names are the --variations vocabulary.
const (
	Hostname = "hostname"  // the sandbox's host name
	UID      = "uid"       // the uid and gid the command runs as
	ExecRoot = "execroot"  // the in-sandbox path of the exec root
	CPUs     = "cpus"      // the CPU set: one CPU instead of all
	ASLR     = "aslr"      // address space randomisation off instead of on
	EnvOrder = "env-order" // the environment passed in reverse order
	Time     = "time"      // the run starts in a later wall-clock second
)

// Combination is the cause of a difference that no single variation reproduces.
const Combination = "combination"

// All is every variation, in the order runs apply and reports list them.
var All = []string{Hostname, UID, ExecRoot, CPUs, ASLR, EnvOrder, Time}

// CauseText explains each cause in a report.
var CauseText = map[string]string{
	Hostname: "the host name differs",
	UID:      "the uid/gid differ",
	ExecRoot: "the exec root's path differs (an absolute path is embedded)",
	CPUs:     "the CPU set or count differs",
	ASLR:     "differs from run to run with address space randomisation on and not with it off (addresses leak into the output)",
	EnvOrder: "the order of the environment differs",
	Time: "differs between two runs with the same settings started in different seconds " +
		"(the wall clock, or other run-to-run nondeterminism: randomness, thread scheduling)",
	Combination: "differs only with several variations combined (or intermittently); no single variation reproduces it",
}

// ParseVariations parses a comma-separated list of variation names; "all" or ""
// is every variation.
func ParseVariations(list string) ([]string, error) {
	list = strings.TrimSpace(list)
	if list == "" || list == "all" {
		return append([]string(nil), All...), nil
	}
	want := map[string]bool{}
	for _, n := range strings.Split(list, ",") {
		n = strings.TrimSpace(n)
		if n == "gid" {
			n = UID
		}
		if !isVariation(n) {
			return nil, fmt.Errorf("unknown variation %q (known: %s, or all)", n, strings.Join(All, ", "))
		}
		want[n] = true
	}
	var out []string
	for _, n := range All {
		if want[n] {
			out = append(out, n)
		}
	}
	return out, nil
}

func isVariation(n string) bool {
	for _, v := range All {
		if v == n {
			return true
		}
	}
	return false
}

// Setting is the sandbox one run gets. The baseline is kiln's fixed defaults; other
// runs change some fields (Varied names which).
type Setting struct {
	Name         string   `json:"name"`
	Varied       []string `json:"varied"` // empty: kiln's defaults
	Hostname     string   `json:"hostname"`
	UID          int      `json:"uid"`
	GID          int      `json:"gid"`
	ExecRootPath string   `json:"exec_root"`
	CPUs         string   `json:"cpus"` // cpuset; "" means every CPU
	ASLR         bool     `json:"aslr"`
	ReverseEnv   bool     `json:"reverse_env"`
	// NewSecond: the run started in a later wall-clock second than the run it is
	// compared with ended (the baseline, or the first of the two ASLR-off runs):
	// the time variation.
	NewSecond bool `json:"new_second"`
}

// IsBaseline reports whether s is kiln's fixed defaults.
func (s Setting) IsBaseline() bool { return len(s.Varied) == 0 }

// apply changes variation n of s to the value set k (k >= 1) uses.
func (s *Setting) apply(n string, k int, cpus []int) {
	switch n {
	case Hostname:
		s.Hostname = fmt.Sprintf("kiln-variant-%d", k)
	case UID:
		s.UID, s.GID = 1000+1111*k, 1000+1234*k
	case ExecRoot:
		s.ExecRootPath = fmt.Sprintf("/build/kiln-variant-%d/some/longer/path", k)
	case CPUs:
		// Alternate the first and the last CPU: the count and the set both change.
		c := cpus[0]
		if k%2 == 0 {
			c = cpus[len(cpus)-1]
		}
		s.CPUs = strconv.Itoa(c)
	case ASLR:
		s.ASLR = !s.ASLR
	case EnvOrder:
		s.ReverseEnv = !s.ReverseEnv
	case Time:
		s.NewSecond = true
	}
	s.Varied = append(s.Varied, n)
}

// with returns base changed by the variations names, using value set k.
func with(base Setting, name string, names []string, k int, cpus []int) Setting {
	s := base
	s.Name, s.Varied, s.NewSecond = name, nil, false
	for _, n := range names {
		s.apply(n, k, cpus)
	}
	return s
}
