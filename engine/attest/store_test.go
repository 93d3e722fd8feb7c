package attest

import (
	"fmt"
	"os"
	"sync"
	"testing"
)

// TestIndexConcurrentAppends: appenders racing on one product's index lose no line.
func TestIndexConcurrentAppends(t *testing.T) {
	st := NewStore(PathsFor(t.TempDir()), nil)
	prod := blob("shared output").Hash
	const n = 32
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			if err := st.AddProduct(AlgSHA256, prod, blob(fmt.Sprint("env", i))); err != nil {
				t.Error(err)
			}
		}(i)
	}
	wg.Wait()
	got, err := st.Producers(AlgSHA256, prod)
	if err != nil || len(got) != n {
		t.Fatalf("%d producers (%v), want %d", len(got), err, n)
	}
	// A torn last line (a writer that died mid-write) is skipped, not fatal.
	f, _ := os.OpenFile(st.productPath(AlgSHA256, prod), os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString("abc")
	f.Close()
	if got, err := st.Producers(AlgSHA256, prod); err != nil || len(got) != n {
		t.Fatalf("after a torn line: %d %v", len(got), err)
	}
}
