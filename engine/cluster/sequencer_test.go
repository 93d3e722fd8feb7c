package cluster

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/s3"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/test/harness"
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

// TestSinkMarksOnce: the same link submitted again by a worker puts no second pending
// marker once the first is in the bucket (the sequencer logs it, or has); a failed
// put is not remembered, so the retry puts it.
func TestSinkMarksOnce(t *testing.T) {
	srv := harness.StartS3(t, "kiln")
	srv.Setenv(t)
	cfg, err := s3.ParseURL(srv.URL("kiln", "c"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := s3.Open(context.Background(), cfg, s3.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	sink := &BucketSink{Bucket: b}
	env := cache.DigestOf([]byte("an envelope"))
	marker := filepath.Join(srv.Dir, "kiln", "c", pendingKey(env))
	if err := sink.Submit(ctx, env, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(marker); err != nil {
		t.Fatalf("no marker after the first submit: %v", err)
	}
	os.Remove(marker) // the sequencer logged it
	if err := sink.Submit(ctx, env, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(marker); !os.IsNotExist(err) {
		t.Fatalf("the same link submitted again put a second marker (%v)", err)
	}
	// A put that fails is not remembered.
	other := cache.DigestOf([]byte("another envelope"))
	srv.Kill()
	if err := sink.Submit(ctx, other, nil); err == nil {
		t.Fatal("submit with the bucket down succeeded")
	}
	srv.Start(t)
	if err := sink.Submit(ctx, other, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(srv.Dir, "kiln", "c", pendingKey(other))); err != nil {
		t.Fatalf("the retry after a failed put left no marker: %v", err)
	}
}
