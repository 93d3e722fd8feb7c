package cluster

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"log/slog"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestSequencerRechecksMissingKey: a link whose key is missing from the trust set the
// sequencer read for its pass (read short while the server restarted, or admitted
// since) is checked against the key read again by itself, not rejected; a link no
// admitted key signed is refused.
func TestSequencerRechecksMissingKey(t *testing.T) {
	ctx := context.Background()
	c := embeddedJS(t)()
	s := &Sequencer{c: c, log: slog.New(slog.DiscardHandler)}
	signed := func(admit bool) (*keys.Signer, []byte) {
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		k := keys.NewSigner(priv)
		if admit {
			if _, err := c.AdmitKeys(ctx, keys.PublicPEM(k.Public()), time.Now()); err != nil {
				t.Fatal(err)
			}
		}
		env, err := attest.SignEnvelope(ctx, k, []byte(`{"_type":"link"}`))
		if err != nil {
			t.Fatal(err)
		}
		return k, env
	}
	admitted, good := signed(true)
	_, forged := signed(false)
	full, err := c.TrustSet(ctx)
	if err != nil || len(full.Keys) != 1 {
		t.Fatalf("trust set %+v, %v", full, err)
	}
	for name, trust := range map[string]keys.Trust{"read short": {}, "read in full": full} {
		e, err := attest.ParseEnvelope(good)
		if err != nil {
			t.Fatal(err)
		}
		k, err := s.verify(ctx, e, trust)
		if err != nil || k.KeyID != admitted.ID() {
			t.Errorf("%s: the admitted key's link: key %q, %v; want it verified by %s", name, k.KeyID, err, admitted.ID())
		}
		e, _ = attest.ParseEnvelope(forged)
		if _, err := s.verify(ctx, e, trust); status.Code(err) != codes.PermissionDenied {
			t.Errorf("%s: a link no admitted key signed: %v, want PermissionDenied", name, err)
		}
	}
	// A trust set that cannot be read is an error, not an empty set.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if tr, err := c.TrustSet(cctx); err == nil {
		t.Errorf("trust set read with a dead context: %d keys and no error", len(tr.Keys))
	}
}
