package keys

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"errors"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Export is the keyring's public half as `kiln attest pubkey --all --json` prints it and
// as `kiln attest verify --key` reads it back: every executor key with its validity, and
// the log's verifier key.
type Export struct {
	ActiveKeyID string      `json:"active_keyid"`
	Keys        []PublicKey `json:"keys"`
	Log         LogKey      `json:"log"`
}

// Export returns the keyring's public half.
func (k *Keyring) Export() (Export, error) {
	ks, err := k.Keys()
	if err != nil {
		return Export{}, err
	}
	e := Export{Keys: ks, Log: k.Log()}
	for _, p := range ks {
		if p.Active() {
			e.ActiveKeyID = p.KeyID
		}
	}
	return e, nil
}

// Trust is what a verifier trusts: executor keys (a key with validity bounds only vouches
// for links logged before its retirement) and, if known, the log's key.
type Trust struct {
	Keys []PublicKey
	Log  *LogKey
}

// Add merges another trust source into t.
func (t *Trust) Add(o Trust) {
	for _, k := range o.Keys {
		if _, ok := t.Key(k.KeyID); !ok {
			t.Keys = append(t.Keys, k)
		}
	}
	if t.Log == nil && o.Log != nil {
		t.Log = o.Log
	}
}

// Key returns the trusted key with the given id.
func (t Trust) Key(id string) (PublicKey, bool) {
	for _, k := range t.Keys {
		if k.KeyID == id {
			return k, true
		}
	}
	return PublicKey{}, false
}

// ParseTrust reads trusted keys from data: one or more "PUBLIC KEY" PEM blocks (ed25519,
// no validity bounds), or an Export as JSON (keys with validity, and the log key).
func ParseTrust(data []byte) (Trust, error) {
	trimmed := bytes.TrimSpace(data)
	if bytes.HasPrefix(trimmed, []byte("{")) {
		var e Export
		if err := json.Unmarshal(trimmed, &e); err != nil {
			return Trust{}, status.Errorf(codes.InvalidArgument, "key export: %v", err)
		}
		t := Trust{}
		for _, p := range e.Keys {
			pub, err := parsePublicPEM([]byte(p.PEM))
			if err != nil {
				return Trust{}, status.Errorf(codes.InvalidArgument, "key export: key %s: %v", p.KeyID, err)
			}
			if id := KeyID(pub); id != p.KeyID {
				return Trust{}, status.Errorf(codes.InvalidArgument, "key export: key id %s does not match its public key (%s)", p.KeyID, id)
			}
			p.Public = pub
			t.Keys = append(t.Keys, p)
		}
		if e.Log.VKey != "" {
			l := e.Log
			if _, err := l.Verifier(); err != nil {
				return Trust{}, err
			}
			t.Log = &l
		}
		if len(t.Keys) == 0 {
			return Trust{}, status.Error(codes.InvalidArgument, "key export lists no keys")
		}
		return t, nil
	}
	var t Trust
	rest := data
	for {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		pub, err := parsePublicPEM(pem.EncodeToMemory(blk))
		if err != nil {
			return Trust{}, status.Errorf(codes.InvalidArgument, "public key: %v", err)
		}
		t.Keys = append(t.Keys, PublicKey{KeyID: KeyID(pub), PEM: string(PublicPEM(pub)), Public: pub})
	}
	if len(t.Keys) == 0 {
		return Trust{}, status.Error(codes.InvalidArgument, "no PUBLIC KEY PEM block and not a kiln key export (JSON)")
	}
	return t, nil
}

// Verifier checks signatures by one trusted key; it implements dsse.Verifier.
type Verifier struct{ key PublicKey }

// NewVerifier returns a DSSE verifier for p.
func NewVerifier(p PublicKey) *Verifier { return &Verifier{key: p} }

// Verify checks sig over data.
func (v *Verifier) Verify(_ context.Context, data, sig []byte) error {
	if !ed25519.Verify(v.key.Public, data, sig) {
		return errors.New("ed25519 signature does not verify")
	}
	return nil
}

// KeyID returns the key's in-toto key id.
func (v *Verifier) KeyID() (string, error) { return v.key.KeyID, nil }

// Public returns the public key.
func (v *Verifier) Public() crypto.PublicKey { return v.key.Public }

// Fingerprint is a SHA-256 over everything the trust set says, in order: each key's id,
// public key, source and validity (not before, not after, the log size at retirement),
// and the log key. Equal trust sets have equal fingerprints; any change (a key added,
// removed, replaced, retired) gives another, so verification results cached under one
// fingerprint are never used under another trust set.
func (t Trust) Fingerprint() [32]byte {
	h := sha256.New()
	field := func(b []byte) {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(b)))
		h.Write(n[:])
		h.Write(b)
	}
	num := func(x int64) {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(x))
		h.Write(n[:])
	}
	num(int64(len(t.Keys)))
	for _, k := range t.Keys {
		field([]byte(k.KeyID))
		field(k.Public)
		field([]byte(k.PEM))
		field([]byte(k.Source))
		field([]byte(k.NotBefore.UTC().Format(time.RFC3339Nano)))
		if k.NotAfter != nil {
			field([]byte(k.NotAfter.UTC().Format(time.RFC3339Nano)))
		} else {
			field(nil)
			num(-1)
		}
		if k.NotAfterLogSize != nil {
			num(1)
			num(int64(*k.NotAfterLogSize))
		} else {
			num(0)
		}
	}
	if t.Log != nil {
		field([]byte(t.Log.Origin))
		field([]byte(t.Log.VKey))
	} else {
		num(-1)
	}
	var out [32]byte
	h.Sum(out[:0])
	return out
}
