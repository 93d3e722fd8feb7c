package attest

import (
	"context"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/engine/attest/keys"
)

// TestProvenanceSignedAt: provenance records when it was signed (the keyring's clock,
// to the second), and ParseProvenance reads it back from the signed payload.
func TestProvenanceSignedAt(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	at := time.Date(2031, 5, 6, 7, 8, 9, 500, time.UTC)
	kr, err := keys.Open(ctx, PathsFor(f.data).Keys, keys.Options{Now: func() time.Time { return at }})
	if err != nil {
		t.Fatal(err)
	}
	_, env, _, err := BuildProvenance(ctx, f.store(t), kr, f.subject, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	p, err := ParseProvenance(ctx, env, f.trust)
	if err != nil {
		t.Fatal(err)
	}
	if !p.SignedAt.Equal(at.Truncate(time.Second)) {
		t.Fatalf("signed at %v, want %v", p.SignedAt, at.Truncate(time.Second))
	}
}

// TestCheckFacts: Check says which step of a link's verification failed: no trusted
// signature (no key, not looked up in the log), or a trusted key and log inclusion.
func TestCheckFacts(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	c := f.mustVerifier(t).Check(ctx, f.link.Digest)
	if c.Err != nil || c.Key == nil || !c.Logged || !c.KeyValid || c.Link == nil || c.Claims != f.binA.ActionDigest.Hash {
		t.Fatalf("verified link: %+v", c)
	}
	other := newFixture(t)
	v, err := f.verifier(t, other.trust)
	if err != nil {
		t.Fatal(err)
	}
	c = v.Check(ctx, f.link.Digest)
	if c.Err == nil || c.Key != nil || c.Logged || c.Link != nil {
		t.Fatalf("link by an untrusted key: %+v", c)
	}
}
