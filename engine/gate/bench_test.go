package gate

import (
	"context"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/engine/attest"
)

// noSBOM drops the SBOM rule from the production policy (fixtures carry no SBOM).
func noSBOM(s string) string {
	return strings.Replace(s, "require: input.sbom.present && (input.sbom.matches || !input.chain.verified)", "require: 'true'", 1)
}

// BenchmarkDecide1000Links is one whole decision for an artifact whose provenance
// lists 1,000 links: the provenance's signature, every link's signature, log inclusion
// proof and key validity, the chain walked, two summaries verified, the production
// policy's rules run. Nothing is cached across decisions (kiln gate; kiln gate serve
// without --cache-size). Run: go test ./engine/gate -run '^$' -bench 1000 -benchtime 20x -count 5
func BenchmarkDecide1000Links(b *testing.B) { benchDecide(b, nil) }

// BenchmarkDecide1000LinksCached is the same decision asked again of a gate with a
// verification cache (kiln gate serve): signatures and decoding come from the cache;
// the checkpoint, every inclusion proof, key validity, quarantine and the policy are
// checked again.
func BenchmarkDecide1000LinksCached(b *testing.B) { benchDecide(b, attest.NewVerifyCache(256<<20)) }

func benchDecide(b *testing.B, c *attest.VerifyCache) {
	ctx := context.Background()
	f := newFixture(b, 1000)
	g := f.gate(b, policy(b, noSBOM), f.trust, nil)
	g.opts.Cache = c
	req := f.request(f.vsa(b, f.verifiers[0], "PASSED"), f.vsa(b, f.verifiers[1], "PASSED"))
	d, err := g.Decide(ctx, req)
	if err != nil || !d.Allow || len(d.Input.Links) != 1000 {
		b.Fatalf("decision %+v: %v", d, err)
	}
	cpu := cpuTime()
	b.ResetTimer()
	for b.Loop() {
		if _, err := g.Decide(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
	// CPU time says more than wall time on a shared machine (other builds and tests
	// compete for its cores): it is what the decision costs.
	b.ReportMetric(float64((cpuTime()-cpu).Microseconds())/1000/float64(b.N), "cpu-ms/op")
	b.ReportMetric(float64(b.Elapsed().Microseconds())/1000/float64(b.N), "ms/decision")
	if c != nil && c.Stats().Hits < int64(b.N)*1000 {
		b.Fatalf("decisions not answered from the cache: %+v", c.Stats())
	}
}

// cpuTime is the CPU time (user + system) this process used so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkEvaluate1000Links is the policy alone over the input of 1,000 links.
func BenchmarkEvaluate1000Links(b *testing.B) {
	ctx := context.Background()
	f := newFixture(b, 1000)
	g := f.gate(b, policy(b, noSBOM), f.trust, nil)
	d, err := g.Decide(ctx, f.request(f.vsa(b, f.verifiers[0], "PASSED"), f.vsa(b, f.verifiers[1], "PASSED")))
	if err != nil || !d.Allow {
		b.Fatalf("decision %+v: %v", d, err)
	}
	p := g.Policy()
	b.ResetTimer()
	for b.Loop() {
		if vs, err := p.Evaluate(d.Input); err != nil || len(vs) != 0 {
			b.Fatal(vs, err)
		}
	}
}

// BenchmarkVerifyProvenance1000Links is the peer: what `kiln attest verify
// --provenance` does for the same artifact (the provenance's signature, every link,
// the chain; one goroutine), without the summaries, the facts and the policy.
func BenchmarkVerifyProvenance1000Links(b *testing.B) {
	ctx := context.Background()
	f := newFixture(b, 1000)
	g := f.gate(b, policy(b, noSBOM), f.trust, nil)
	lv, err := f.trust.Log.Verifier()
	if err != nil {
		b.Fatal(err)
	}
	cpu := cpuTime()
	b.ResetTimer()
	for b.Loop() {
		p, err := attest.ParseProvenance(ctx, f.provenance, f.trust)
		if err != nil {
			b.Fatal(err)
		}
		v, err := attest.NewVerifier(ctx, g.opts.Store, attest.VerifierOptions{Trust: f.trust, LogVerifier: lv})
		if err != nil {
			b.Fatal(err)
		}
		if ch := v.CheckProvenance(ctx, p, f.subject); !ch.OK() {
			b.Fatal(ch.Failures)
		}
	}
	b.ReportMetric(float64((cpuTime()-cpu).Milliseconds())/float64(b.N), "cpu-ms/op")
}
