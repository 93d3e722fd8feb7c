package dirplace

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// BenchmarkFileAfterRemoval creates files in a new store's 256 shards right after
// another store of 10,000 files beside it was removed, as a data dir removed and made
// again, or blobs evicted, leave them: with the shards beside their parent ("beside"),
// or spread by Spread. On ext4 without a journal each new inode skips every inode its
// group freed recently; elsewhere both cases cost alike.
//
//	go test -run '^$' -bench FileAfterRemoval ./internal/dirplace
func BenchmarkFileAfterRemoval(b *testing.B) {
	for _, spread := range []bool{false, true} {
		name := "beside"
		if spread {
			name = "spread"
		}
		b.Run(name, func(b *testing.B) {
			base := b.TempDir()
			store := func(dir string) string {
				if err := os.Mkdir(dir, 0o755); err != nil {
					b.Fatal(err)
				}
				if spread {
					if err := Spread(dir); err != nil {
						b.Fatal(err)
					}
				}
				for i := range 256 {
					if err := os.Mkdir(filepath.Join(dir, fmt.Sprintf("%02x", i)), 0o755); err != nil {
						b.Fatal(err)
					}
				}
				return dir
			}
			create := func(dir string, n int, tag string) {
				for k := range n {
					f, err := os.OpenFile(filepath.Join(dir, fmt.Sprintf("%02x", k%256), fmt.Sprintf("%s%d", tag, k)), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o444)
					if err != nil {
						b.Fatal(err)
					}
					f.Write([]byte("x"))
					f.Close()
				}
			}
			old := store(filepath.Join(base, "old"))
			create(old, 10000, "a")
			if err := os.RemoveAll(old); err != nil {
				b.Fatal(err)
			}
			time.Sleep(1100 * time.Millisecond) // an inode freed this very second is not "recent"
			cur := store(filepath.Join(base, "new"))
			b.ResetTimer()
			create(cur, b.N, "b")
		})
	}
}
