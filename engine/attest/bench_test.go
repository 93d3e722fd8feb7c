package attest

import (
	"bytes"
	"context"
	"fmt"
	"sort"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest/keys"
)

// benchAction is a compile-sized action: n inputs, 2 outputs, distinct per i.
func benchAction(i, n int) Action {
	a := sampleAction()
	a.ActionDigest = blob(fmt.Sprintf("bench action %d", i))
	a.Inputs = make([]File, n)
	for j := range a.Inputs {
		a.Inputs[j] = file(fmt.Sprintf("external/lib/include/header_%04d.h", j), fmt.Sprintf("h%d", j))
	}
	a.Outputs = []File{file(fmt.Sprintf("out/obj_%d.o", i), fmt.Sprintf("obj %d", i)), file(fmt.Sprintf("out/obj_%d.d", i), fmt.Sprintf("dep %d", i))}
	return a
}

// BenchmarkLink measures what attestation adds to one action (sign + store + index +
// log append, waiting until the entry is durably integrated), next to its parts and to
// a peer: a plain CAS Put of the same envelope (what storing any output costs).
//
//	go test ./engine/attest -run '^$' -bench Link -benchtime 200x
func BenchmarkLink(b *testing.B) {
	ctx := context.Background()
	for _, inputs := range []int{10, 300} {
		for _, mode := range []struct {
			name string
			sync bool
		}{{"link", false}, {"link-synclog", true}} {
			b.Run(fmt.Sprintf("inputs=%d/%s", inputs, mode.name), func(b *testing.B) {
				s := openSigner(b, b.TempDir(), Options{SyncLog: mode.sync})
				acts := make([]Action, b.N)
				for i := range acts {
					acts[i] = benchAction(i, inputs)
				}
				lat := make([]time.Duration, b.N)
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					t0 := time.Now()
					if _, err := s.Link(ctx, acts[i]); err != nil {
						b.Fatal(err)
					}
					lat[i] = time.Since(t0)
				}
				b.StopTimer()
				reportMedian(b, lat)
				if err := s.Flush(ctx); err != nil {
					b.Fatal(err)
				}
			})
		}
		b.Run(fmt.Sprintf("inputs=%d/parallel-synclog", inputs), func(b *testing.B) {
			s := openSigner(b, b.TempDir(), Options{SyncLog: true})
			var next atomic.Int64
			b.SetParallelism(8) // several actions finishing at once, as on a busy server
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					i := int(next.Add(1))
					if _, err := s.Link(ctx, benchAction(i, inputs)); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
		b.Run(fmt.Sprintf("inputs=%d/sign-only", inputs), func(b *testing.B) {
			k := activeSigner2(b)
			a := benchAction(0, inputs)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				p, err := a.Payload()
				if err != nil {
					b.Fatal(err)
				}
				if _, err := SignEnvelope(ctx, k, p); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(fmt.Sprintf("inputs=%d/peer-cas-put", inputs), func(b *testing.B) {
			cas := openCAS(b, b.TempDir())
			p, _ := benchAction(0, inputs).Payload()
			env, _ := SignEnvelope(ctx, activeSigner2(b), p)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				// A distinct blob each time, as each action's envelope is.
				blobBytes := append(fmt.Appendf(nil, "%d", i), env...)
				if err := cas.Put(ctx, cache.DigestOf(blobBytes), bytes.NewReader(blobBytes)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func activeSigner2(b *testing.B) *keys.Signer {
	k, err := openSigner(b, b.TempDir(), Options{}).Keyring().Active()
	if err != nil {
		b.Fatal(err)
	}
	return k
}

func reportMedian(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		return
	}
	s := append([]time.Duration(nil), lat...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	b.ReportMetric(float64(s[len(s)/2].Microseconds()), "median-µs")
	b.ReportMetric(float64(s[len(s)*9/10].Microseconds()), "p90-µs")
}
