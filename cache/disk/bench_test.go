package disk

import (
	"bytes"
	"context"
	"fmt"
	"testing"

	"github.com/kilnbuild/kiln/cache"
)

// BenchmarkFindMissing: 10k digests per call, half present.
func BenchmarkFindMissing(b *testing.B) {
	ctx := context.Background()
	s, err := Open(ctx, b.TempDir(), Options{Primary: true, MaxSize: 1 << 30})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	var ds []cache.Digest
	for i := 0; i < 10000; i++ {
		data := []byte(fmt.Sprint("blob", i))
		d := cache.DigestOf(data)
		if i%2 == 0 {
			s.Put(ctx, d, bytes.NewReader(data))
		}
		ds = append(ds, d)
	}
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if m, _ := s.FindMissing(ctx, ds); len(m) != 5000 {
				b.Fatalf("missing %d", len(m))
			}
		}
	})
	b.ReportMetric(float64(b.N*len(ds))/b.Elapsed().Seconds(), "digests/s")
}
