package gate

import (
	"bytes"
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/engine/quarantine"
	"github.com/kilnbuild/kiln/engine/revoke"
)

// fixedNow is the clock of every gate in the cache tests: equal requests give equal
// decisions across gates.
var fixedNow = time.Now()

// cachedGate is the fixture's gate with a verification cache shared across gates.
func (f *fixture) cachedGate(t testing.TB, trust keys.Trust, q *quarantine.List, c *attest.VerifyCache) *Gate {
	t.Helper()
	g := f.gate(t, policy(t, noSBOM), trust, q)
	g.opts.Cache = c
	g.opts.Now = func() time.Time { return fixedNow }
	return g
}

// decisionJSON is everything a decision says, the policy's input included.
func decisionJSON(t *testing.T, d *Decision) string {
	t.Helper()
	b, err := json.Marshal(struct {
		*Decision
		In *Input
	}{d, d.Input})
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestCacheSameDecision: deciding again from the cache gives exactly the decision
// (input document included) of a cold run, and of a gate without a cache; the second
// decision is answered from the cache (links, provenance, summaries), and a cache too
// small for the chain still decides the same.
func TestCacheSameDecision(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, 5)
	req := f.request(f.vsa(t, f.verifiers[0], "PASSED"), f.vsa(t, f.verifiers[1], "PASSED"))
	plain, err := f.cachedGate(t, f.trust, nil, nil).Decide(ctx, req)
	if err != nil || !plain.Allow {
		t.Fatalf("%+v %v", plain, err)
	}
	c := attest.NewVerifyCache(64 << 20)
	g := f.cachedGate(t, f.trust, nil, c)
	cold, err := g.Decide(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if s := c.Stats(); s.Hits != 0 || s.Entries != 5+1+2 {
		t.Fatalf("cold decision: %+v", s)
	}
	warm, err := g.Decide(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if s := c.Stats(); s.Hits != 5+1+2 {
		t.Fatalf("warm decision not from the cache: %+v", s)
	}
	want := decisionJSON(t, plain)
	for name, d := range map[string]*Decision{"cold": cold, "warm": warm} {
		if got := decisionJSON(t, d); got != want {
			t.Errorf("%s decision differs from the uncached one:\n%.3000s\nwant\n%.3000s", name, got, want)
		}
	}
	tiny := attest.NewVerifyCache(8 << 10)
	for range 2 {
		d, err := f.cachedGate(t, f.trust, nil, tiny).Decide(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		if got := decisionJSON(t, d); got != want {
			t.Errorf("decision with an 8 KiB cache differs:\n%.3000s\nwant\n%.3000s", got, want)
		}
	}
	if s := tiny.Stats(); s.Bytes > 8<<10 || s.Evictions == 0 {
		t.Errorf("8 KiB cache: %+v", s)
	}
}

// TestCacheTrustChange: verifications cached under one trust set are not used under
// another: without the builder key, or with the builder key retired before its links
// were logged, the gate denies after a cached allow.
func TestCacheTrustChange(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, 3)
	req := f.request(f.vsa(t, f.verifiers[0], "PASSED"), f.vsa(t, f.verifiers[1], "PASSED"))
	c := attest.NewVerifyCache(64 << 20)
	if d, err := f.cachedGate(t, f.trust, nil, c).Decide(ctx, req); err != nil || !d.Allow {
		t.Fatalf("%+v %v", d, err)
	}
	retired := keys.Trust{Log: f.trust.Log}
	for i, k := range f.trust.Keys {
		if i == 0 { // the builder's key
			zero := uint64(0)
			k.NotAfterLogSize = &zero
		}
		retired.Keys = append(retired.Keys, k)
	}
	for _, tc := range []struct {
		name  string
		trust keys.Trust
		want  string
	}{
		{"builder key no longer trusted", keys.Trust{Keys: f.trust.Keys[1:], Log: f.trust.Log}, "provenance-verified,chain-verified"},
		{"builder key retired at log size 0", retired, "chain-verified,link-key-valid,link-key-valid,link-key-valid"},
	} {
		d, err := f.cachedGate(t, tc.trust, nil, c).Decide(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		if got := rules(d.Violations); d.Allow || got != tc.want {
			t.Errorf("%s: allow %v, violations %s; want %s\n%+v", tc.name, d.Allow, got, tc.want, d.Violations)
		}
	}
}

// TestCacheRevocation: revoking the builder's key after a cached allow (kiln revoke
// key: its products are quarantined) denies the next decision: quarantine is read at
// every decision, never cached.
func TestCacheRevocation(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, 3)
	req := f.request(f.vsa(t, f.verifiers[0], "PASSED"), f.vsa(t, f.verifiers[1], "PASSED"))
	q, err := quarantine.Open(f.data)
	if err != nil {
		t.Fatal(err)
	}
	c := attest.NewVerifyCache(64 << 20)
	g := f.cachedGate(t, f.trust, q, c)
	if d, err := g.Decide(ctx, req); err != nil || !d.Allow {
		t.Fatalf("%+v %v", d, err)
	}
	res, err := revoke.Open(f.data).RevokeKey(ctx, f.builder.Keys[0], time.Time{}, "stolen", "test", q)
	if err != nil || len(res.Quarantined) == 0 {
		t.Fatalf("revoke: %+v %v", res, err)
	}
	hits := c.Stats().Hits
	d, err := g.Decide(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if got := rules(d.Violations); d.Allow || got != "not-quarantined" || !d.Input.Subject.Quarantined {
		t.Fatalf("after revocation: allow %v, violations %s\n%+v", d.Allow, got, d.Violations)
	}
	if c.Stats().Hits == hits {
		t.Fatal("the decision after the revocation did not use the cache: the test proves nothing")
	}
}

// TestCacheTampered: after a cached allow, a tampered summary or provenance about the
// same subject (other bytes, the same claims) is verified afresh and fails.
func TestCacheTampered(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, 3)
	pass1, pass2 := f.vsa(t, f.verifiers[0], "PASSED"), f.vsa(t, f.verifiers[1], "PASSED")
	c := attest.NewVerifyCache(64 << 20)
	g := f.cachedGate(t, f.trust, nil, c)
	if d, err := g.Decide(ctx, f.request(pass1, pass2)); err != nil || !d.Allow {
		t.Fatalf("%+v %v", d, err)
	}
	tamperedVSA := bytes.Replace(pass2, []byte(`"payload":"`), []byte(`"payload":"e`), 1)
	d, err := g.Decide(ctx, f.request(pass1, tamperedVSA))
	if err != nil {
		t.Fatal(err)
	}
	if got := rules(d.Violations); got != "vsa-verified,independent-rebuilds" {
		t.Errorf("tampered summary: violations %s", got)
	}
	// The provenance with one byte of its signature changed: the same statement.
	req := f.request(pass1, pass2)
	i := bytes.Index(f.provenance, []byte(`"sig":"`)) + len(`"sig":"`)
	tp := bytes.Clone(f.provenance)
	if tp[i] == 'A' {
		tp[i] = 'B'
	} else {
		tp[i] = 'A'
	}
	req.Provenance = &Doc{Name: "provenance.json", Data: tp}
	if d, err = g.Decide(ctx, req); err != nil {
		t.Fatal(err)
	}
	if d.Allow || d.Input.Provenance.Verified {
		t.Errorf("tampered provenance: allow %v, violations %s", d.Allow, rules(d.Violations))
	}
}
