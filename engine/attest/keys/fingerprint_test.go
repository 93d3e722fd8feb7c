package keys

import (
	"crypto/ed25519"
	"testing"
	"time"
)

// TestFingerprint: every part of a trust set changes its fingerprint; equal sets have
// equal ones.
func TestFingerprint(t *testing.T) {
	pub, _, _ := ed25519.GenerateKey(nil)
	pub2, _, _ := ed25519.GenerateKey(nil)
	base := func() Trust {
		return Trust{Keys: []PublicKey{{KeyID: "a", Public: pub, PEM: "pem", Source: SourceGenerated, NotBefore: time.Unix(100, 0)}},
			Log: &LogKey{Origin: "o", VKey: "v"}}
	}
	at, size := time.Unix(200, 0), uint64(7)
	edits := map[string]func(*Trust){
		"keyid":         func(t *Trust) { t.Keys[0].KeyID = "b" },
		"public key":    func(t *Trust) { t.Keys[0].Public = pub2 },
		"not before":    func(t *Trust) { t.Keys[0].NotBefore = time.Unix(101, 0) },
		"retired":       func(t *Trust) { t.Keys[0].NotAfter = &at },
		"retired at":    func(t *Trust) { t.Keys[0].NotAfterLogSize = &size },
		"key added":     func(t *Trust) { t.Keys = append(t.Keys, PublicKey{KeyID: "b", Public: pub2}) },
		"key removed":   func(t *Trust) { t.Keys = nil },
		"log key":       func(t *Trust) { t.Log = &LogKey{Origin: "o", VKey: "w"} },
		"no log key":    func(t *Trust) { t.Log = nil },
		"source":        func(t *Trust) { t.Keys[0].Source = SourceOperator },
		"pem":           func(t *Trust) { t.Keys[0].PEM = "other" },
		"same, rebuilt": nil,
	}
	want := base().Fingerprint()
	seen := map[[32]byte]string{}
	for name, edit := range edits {
		tr := base()
		if edit == nil {
			if tr.Fingerprint() != want {
				t.Errorf("%s: fingerprint changed", name)
			}
			continue
		}
		edit(&tr)
		fp := tr.Fingerprint()
		if fp == want {
			t.Errorf("%s: same fingerprint", name)
		}
		if o, dup := seen[fp]; dup {
			t.Errorf("%s and %s: same fingerprint", name, o)
		}
		seen[fp] = name
	}
}
