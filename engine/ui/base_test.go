package ui

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/kilnbuild/kiln/cache"
)

func TestRecordBase(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ui-url")
	if got := RecordedBase(path); got != "" {
		t.Fatalf("nothing recorded, got %q", got)
	}
	remove, err := RecordBase(path, "https://kiln.example.com/")
	if err != nil {
		t.Fatal(err)
	}
	if got := RecordedBase(path); got != "https://kiln.example.com/" {
		t.Fatalf("got %q", got)
	}
	d := cache.DigestOf([]byte("x"))
	if got, want := ActionURL(RecordedBase(path), d), "https://kiln.example.com/action/"+d.Hash+"/1"; got != want {
		t.Fatalf("ActionURL %q, want %q", got, want)
	}
	remove()
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("remove left the record: %v", err)
	}

	// A record left by a process that is gone is ignored.
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(path, []byte("http://stale/\n"+strconv.Itoa(cmd.Process.Pid)+"\n"), 0o644)
	if got := RecordedBase(path); got != "" {
		t.Fatalf("a dead process's record gave %q", got)
	}
	// A newer server's record is not removed by an older one's remove.
	remove, _ = RecordBase(path, "http://old/")
	os.WriteFile(path, []byte("http://new/\n1\n"), 0o644)
	remove()
	if got := RecordedBase(path); got != "http://new/" {
		t.Fatalf("the newer record is gone: %q", got)
	}
	for _, junk := range []string{"", "http://x/\n", "http://x/\nnot-a-pid\n"} {
		os.WriteFile(path, []byte(junk), 0o644)
		if got := RecordedBase(path); got != "" {
			t.Fatalf("%q gave %q", junk, got)
		}
	}
}
