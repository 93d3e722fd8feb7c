package attest

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/kilnbuild/kiln/engine/attest/keys"
)

func (f *fixture) cachedVerifier(t *testing.T, trust keys.Trust, c *VerifyCache) *Verifier {
	t.Helper()
	lv, err := f.trust.Log.Verifier()
	if err != nil {
		t.Fatal(err)
	}
	v, err := NewVerifier(context.Background(), f.store(t), VerifierOptions{Trust: trust, LogVerifier: lv, Cache: c})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestVerifyCache: a link verified once is answered from the cache by the next
// verifier with the same trust set, with the same facts; tampered bytes, a retired key
// and an untrusted key are verified afresh and fail.
func TestVerifyCache(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	c := NewVerifyCache(1 << 20)
	cold := f.cachedVerifier(t, f.trust, c).Check(ctx, f.compile.Digest)
	if cold.Err != nil || cold.Link == nil {
		t.Fatalf("cold: %v", cold.Err)
	}
	if s := c.Stats(); s.Hits != 0 || s.Entries != 1 {
		t.Fatalf("after one verification: %+v", s)
	}
	warm := f.cachedVerifier(t, f.trust, c).Check(ctx, f.compile.Digest)
	if s := c.Stats(); s.Hits != 1 {
		t.Fatalf("the second verifier did not use the cache: %+v", s)
	}
	if warm.Err != nil || warm.Claims != cold.Claims || warm.Key.KeyID != cold.Key.KeyID || !warm.Logged || warm.LogIndex != cold.LogIndex ||
		!warm.KeyValid || warm.Link.Link.Name != cold.Link.Link.Name || !bytes.Equal(warm.Link.Raw, cold.Link.Raw) {
		t.Fatalf("warm %+v\ncold %+v", warm, cold)
	}

	// The same action claimed, one byte of argv changed, the old signature kept.
	p := bytes.Replace(payloadOf(t, f.compile.Envelope), []byte(`"-c"`), []byte(`"-C"`), 1)
	tampered := resign(t, f.compile.Envelope, p, nil)
	if r := f.cachedVerifier(t, f.trust, c).CheckBytes(ctx, tampered); r.Err == nil || !strings.Contains(r.Err.Error(), "no valid signature") {
		t.Fatalf("tampered envelope: %+v", r)
	}

	// The same key, now retired before the link was logged: not served the facts
	// cached while it was active.
	retired := keys.Trust{Log: f.trust.Log}
	for _, k := range f.trust.Keys {
		zero := uint64(0)
		k.NotAfterLogSize = &zero
		retired.Keys = append(retired.Keys, k)
	}
	hits := c.Stats().Hits
	if r := f.cachedVerifier(t, retired, c).Check(ctx, f.compile.Digest); r.Err == nil || !strings.Contains(r.Err.Error(), "retired at log size 0") {
		t.Fatalf("retired key: %+v", r)
	}
	// Another key altogether.
	other := keys.Trust{Keys: activeTrust(t, t.TempDir()).Keys, Log: f.trust.Log}
	if r := f.cachedVerifier(t, other, c).Check(ctx, f.compile.Digest); r.Err == nil || !strings.Contains(r.Err.Error(), "no valid signature") {
		t.Fatalf("untrusted key: %+v", r)
	}
	if s := c.Stats(); s.Hits != hits {
		t.Fatalf("another trust set was served from the cache: %+v", s)
	}
}

// TestVerifyCacheBound: the cache holds at most its size, dropping the least recently
// used first.
func TestVerifyCacheBound(t *testing.T) {
	f := newFixture(t)
	c := NewVerifyCache(linkCost(f.compile.Envelope) + linkCost(f.link.Envelope)/2)
	v := f.cachedVerifier(t, f.trust, c)
	ctx := context.Background()
	for _, d := range []Linked{f.compile, f.link} {
		if r := v.Check(ctx, d.Digest); r.Err != nil {
			t.Fatal(r.Err)
		}
	}
	s := c.Stats()
	if s.Entries != 1 || s.Evictions != 1 || s.Bytes > c.max {
		t.Fatalf("stats %+v, max %d", s, c.max)
	}
	if _, ok := c.Get(v.trustID, cacheLink, f.link.Digest); !ok {
		t.Fatal("the most recent entry was dropped")
	}
	if NewVerifyCache(0) != nil {
		t.Fatal("a zero-size cache keeps something")
	}
}
