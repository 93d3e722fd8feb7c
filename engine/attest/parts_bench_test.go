package attest

import (
	"context"
	"testing"
)

// BenchmarkLinkCheckParts measures the parts of verifying one link envelope (a
// fixture-sized action): decoding the envelope, checking its signature, decoding the
// link payload (and, for comparison, the same with encoding/json).
//
//	go test ./engine/attest -run '^$' -bench LinkCheckParts
func BenchmarkLinkCheckParts(b *testing.B) {
	ctx := context.Background()
	data := b.TempDir()
	s := openSigner(b, data, Options{})
	l, err := s.Link(ctx, sampleAction())
	if err != nil {
		b.Fatal(err)
	}
	if err := s.Flush(ctx); err != nil {
		b.Fatal(err)
	}
	raw := l.Envelope
	b.Logf("envelope %d bytes", len(raw))
	trust := activeTrust(b, data)
	e, err := ParseEnvelope(raw)
	if err != nil {
		b.Fatal(err)
	}
	_, payload, err := VerifyEnvelope(ctx, e, trust)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("ParseEnvelope", func(b *testing.B) {
		for b.Loop() {
			if _, err := ParseEnvelope(raw); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("VerifyEnvelope", func(b *testing.B) {
		for b.Loop() {
			if _, _, err := VerifyEnvelope(ctx, e, trust); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("DecodeLink", func(b *testing.B) {
		for b.Loop() {
			if _, err := DecodeLink(payload); err != nil {
				b.Fatal(err)
			}
		}
	})
	// The peer: the same payload through encoding/json (DecodeLink's path for forms
	// the fast decoder leaves to it).
	b.Run("DecodeLinkJSON", func(b *testing.B) {
		for b.Loop() {
			if _, ok := decodeLinkJSON(payload); !ok {
				b.Fatal("refused")
			}
		}
	})
}
