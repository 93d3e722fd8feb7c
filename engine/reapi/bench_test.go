package reapi

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/kilnbuild/kiln/cache"
	"google.golang.org/genproto/googleapis/bytestream"
)

// BenchmarkByteStreamRead reads 1 MiB blobs over parallel streams from an in-process
// server on loopback; compare with BenchmarkSHA256 (the verifying store's limit).
func BenchmarkByteStreamRead(b *testing.B) {
	e := newEnv(&testing.T{}, Options{})
	const n = 64
	var names []string
	for i := 0; i < n; i++ {
		data, _ := blob(&testing.T{}, 1<<20)
		d := e.put(&testing.T{}, data)
		names = append(names, "blobs/"+d.String())
	}
	b.SetBytes(1 << 20)
	b.ResetTimer()
	b.SetParallelism(4)
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			if _, err := readAll(context.Background(), e.bs, &bytestream.ReadRequest{ResourceName: names[i%n]}); err != nil {
				b.Error(err)
				return
			}
			i++
		}
	})
}

// BenchmarkByteStreamWrite writes fresh 1 MiB blobs over parallel streams (made before
// the timer starts, each a different blob).
func BenchmarkByteStreamWrite(b *testing.B) {
	e := newEnv(&testing.T{}, Options{})
	data, _ := blob(&testing.T{}, 1<<20+b.N)
	var next atomic.Int64
	b.SetBytes(1 << 20)
	b.SetParallelism(4)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			i := int(next.Add(1)) - 1
			chunk := data[i : i+1<<20]
			d := cache.DigestOf(chunk)
			if _, err := write(context.Background(), e.bs, "uploads/"+uuid()+"/blobs/"+d.String(), [][]byte{chunk}, 0, true); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
