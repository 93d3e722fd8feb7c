package seccomp

import (
	"testing"

	"github.com/opencontainers/runc/libcontainer/configs"
	libseccomp "github.com/seccomp/libseccomp-golang"
)

func TestProfileIsConsistent(t *testing.T) {
	isAllowed := map[string]bool{}
	for _, n := range allowed {
		if isAllowed[n] {
			t.Errorf("%s allowed twice", n)
		}
		isAllowed[n] = true
	}
	for _, s := range conditional {
		if isAllowed[s.Name] {
			t.Errorf("%s is both allowed and filtered by argument", s.Name)
		}
	}
	for _, n := range denied {
		if isAllowed[n] {
			t.Errorf("%s is both allowed and denied", n)
		}
		for _, s := range conditional {
			if s.Name == n {
				t.Errorf("%s is both denied and filtered by argument", n)
			}
		}
	}
	for _, s := range Config().Syscalls {
		if _, err := libseccomp.GetSyscallFromName(s.Name); err != nil {
			t.Errorf("libseccomp does not know %s: the rule would be dropped", s.Name)
		}
	}
	for _, n := range denied {
		if _, err := libseccomp.GetSyscallFromName(n); err != nil {
			t.Errorf("libseccomp does not know denied %s", n)
		}
	}
}

func TestConfigIsAFreshCopy(t *testing.T) {
	digest := Digest()
	a := Config()
	a.Syscalls[0].Name = "changed"
	for _, s := range a.Syscalls {
		if s.Action == configs.Allow && len(s.Args) > 0 {
			s.Args[0].Value = 12345
			break
		}
	}
	if Config().Syscalls[0].Name == "changed" || Digest() != digest {
		t.Fatal("Config shares state with the profile")
	}
	for _, s := range conditional {
		for _, a := range s.Args {
			if a.Value == 12345 {
				t.Fatal("Config shares argument filters with the profile")
			}
		}
	}
}
