package reapi

import (
	"context"
	"testing"

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

// BenchmarkByteStreamWrite writes fresh 1 MiB blobs over parallel streams.
func BenchmarkByteStreamWrite(b *testing.B) {
	e := newEnv(&testing.T{}, Options{})
	b.SetBytes(1 << 20)
	b.SetParallelism(4)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			data, d := blob(&testing.T{}, 1<<20)
			if _, err := write(context.Background(), e.bs, "uploads/"+uuid()+"/blobs/"+d.String(), [][]byte{data}, 0, true); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
