// Package dirplacetest holds what tests of package dirplace's callers share.
package dirplacetest

import (
	"testing"

	"golang.org/x/sys/unix"
)

// SkipUnlessExt skips the test unless dir is on ext2/3/4, the filesystems whose
// placement flag dirplace.Spread sets (elsewhere Spread does nothing, by design).
func SkipUnlessExt(t testing.TB, dir string) {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type != unix.EXT4_SUPER_MAGIC {
		t.Skipf("%s is not on ext2/3/4 (magic %#x)", dir, st.Type)
	}
}
