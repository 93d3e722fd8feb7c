package attest

import (
	"bytes"
	"context"
	"encoding/json"
	"strconv"
	"strings"

	"github.com/in-toto/in-toto-golang/in_toto"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/secure-systems-lab/go-securesystemslib/dsse"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// PayloadType is the DSSE payload type of every envelope kiln signs (links and
// statements alike), as in-toto specifies.
const PayloadType = in_toto.PayloadType

// SignEnvelope signs payload as a DSSE envelope with one signature by s and returns the
// envelope's JSON. ed25519 is deterministic, so equal payloads and keys give equal bytes.
func SignEnvelope(ctx context.Context, s *keys.Signer, payload []byte) ([]byte, error) {
	es, err := dsse.NewEnvelopeSigner(s)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "dsse: %v", err)
	}
	env, err := es.SignPayload(ctx, PayloadType, payload)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "dsse sign: %v", err)
	}
	b, err := json.Marshal(env)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "dsse: %v", err)
	}
	return b, nil
}

// ParseEnvelope decodes a DSSE envelope and checks its payload type.
func ParseEnvelope(b []byte) (*dsse.Envelope, error) {
	env, ok := parseCompactEnvelope(b)
	if !ok {
		var err error
		if env, err = decodeEnvelope(b); err != nil {
			return nil, err
		}
	}
	if env.PayloadType != PayloadType {
		return nil, status.Errorf(codes.InvalidArgument, "envelope payload type %q, want %q", env.PayloadType, PayloadType)
	}
	if len(env.Signatures) == 0 {
		return nil, status.Error(codes.InvalidArgument, "envelope has no signatures")
	}
	return env, nil
}

// decodeEnvelope decodes any JSON form of a DSSE envelope (unknown fields refused).
func decodeEnvelope(b []byte) (*dsse.Envelope, error) {
	var env dsse.Envelope
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&env); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "not a DSSE envelope: %v", err)
	}
	return &env, nil
}

// parseCompactEnvelope reads the one form kiln writes (json.Marshal of a dsse.Envelope:
// {"payloadType":S,"payload":S,"signatures":[{"keyid":S,"sig":S},...]}, no spaces)
// without encoding/json, whose byte-at-a-time scan of the base64 payload is most of
// the cost of reading an envelope. It accepts only strings of printable ASCII without
// escapes, whose JSON value is their bytes, so whatever it accepts decodeEnvelope
// decodes to the same envelope; anything else (ok false) goes to decodeEnvelope.
func parseCompactEnvelope(b []byte) (*dsse.Envelope, bool) {
	var env dsse.Envelope
	rest, ok := bytes.CutPrefix(b, []byte(`{"payloadType":`))
	if !ok {
		return nil, false
	}
	if env.PayloadType, rest, ok = compactString(rest); !ok {
		return nil, false
	}
	if rest, ok = bytes.CutPrefix(rest, []byte(`,"payload":`)); !ok {
		return nil, false
	}
	if env.Payload, rest, ok = compactString(rest); !ok {
		return nil, false
	}
	if rest, ok = bytes.CutPrefix(rest, []byte(`,"signatures":[`)); !ok {
		return nil, false
	}
	for {
		var sig dsse.Signature
		if rest, ok = bytes.CutPrefix(rest, []byte(`{"keyid":`)); !ok {
			return nil, false
		}
		if sig.KeyID, rest, ok = compactString(rest); !ok {
			return nil, false
		}
		if rest, ok = bytes.CutPrefix(rest, []byte(`,"sig":`)); !ok {
			return nil, false
		}
		if sig.Sig, rest, ok = compactString(rest); !ok {
			return nil, false
		}
		if rest, ok = bytes.CutPrefix(rest, []byte(`}`)); !ok {
			return nil, false
		}
		env.Signatures = append(env.Signatures, sig)
		if rest, ok = bytes.CutPrefix(rest, []byte(`,`)); !ok {
			break
		}
	}
	if !bytes.Equal(rest, []byte(`]}`)) {
		return nil, false
	}
	return &env, true
}

// compactString reads a JSON string at the start of b made of printable ASCII other
// than '"' and '\\' (no escapes: its value is its bytes), and returns it and what follows.
func compactString(b []byte) (string, []byte, bool) {
	if len(b) == 0 || b[0] != '"' {
		return "", nil, false
	}
	end := bytes.IndexByte(b[1:], '"')
	if end < 0 {
		return "", nil, false
	}
	s := b[1 : 1+end]
	for _, c := range s {
		if c < 0x20 || c > 0x7e || c == '\\' {
			return "", nil, false
		}
	}
	return string(s), b[2+end:], true
}

// VerifyEnvelope checks that env carries a valid signature by one of the trusted keys and
// returns that key and the payload.
func VerifyEnvelope(ctx context.Context, env *dsse.Envelope, trust keys.Trust) (keys.PublicKey, []byte, error) {
	if len(trust.Keys) == 0 {
		return keys.PublicKey{}, nil, status.Error(codes.FailedPrecondition, "no trusted keys")
	}
	vs := make([]dsse.Verifier, 0, len(trust.Keys))
	for _, k := range trust.Keys {
		vs = append(vs, keys.NewVerifier(k))
	}
	ev, err := dsse.NewEnvelopeVerifier(vs...)
	if err != nil {
		return keys.PublicKey{}, nil, status.Errorf(codes.Internal, "dsse: %v", err)
	}
	accepted, payload, err := ev.VerifyAndDecode(ctx, env)
	if err != nil || len(accepted) == 0 {
		ids := make([]string, 0, len(env.Signatures))
		for _, s := range env.Signatures {
			ids = append(ids, short(s.KeyID))
		}
		return keys.PublicKey{}, nil, status.Errorf(codes.PermissionDenied, "no valid signature by a trusted key (signed by %s)", strings.Join(ids, ", "))
	}
	k, _ := trust.Key(accepted[0].KeyID)
	return k, payload, nil
}

// DecodeLink parses a link payload the way in-toto-golang does (unknown fields refused).
//
// The payload is decoded once: by decodeLinkFast if it is of the plain form kiln
// writes, else by encoding/json; only a payload that fails to decode, has another
// _type or trailing data is read again, by decodeLinkSlow, for its error.
func DecodeLink(payload []byte) (in_toto.Link, error) {
	if l, ok := decodeLinkFast(payload); ok {
		return l, nil
	}
	if l, ok := decodeLinkJSON(payload); ok {
		return l, nil
	}
	return decodeLinkSlow(payload)
}

// decodeLinkJSON decodes a link payload with encoding/json (unknown fields refused,
// numbers kept as their literals); ok is false for anything but one link object.
func decodeLinkJSON(payload []byte) (in_toto.Link, bool) {
	var l in_toto.Link
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.DisallowUnknownFields()
	dec.UseNumber()
	err := dec.Decode(&l)
	return l, err == nil && l.Type == "link" && len(bytes.TrimLeft(payload[dec.InputOffset():], " \t\r\n")) == 0
}

// decodeLinkSlow checks that the payload is JSON, then its _type, then decodes it: the
// errors say which of these failed.
func decodeLinkSlow(payload []byte) (in_toto.Link, error) {
	var probe struct {
		Type string `json:"_type"`
	}
	if err := json.Unmarshal(payload, &probe); err != nil {
		return in_toto.Link{}, status.Errorf(codes.InvalidArgument, "payload is not JSON: %v", err)
	}
	if probe.Type != "link" {
		return in_toto.Link{}, status.Errorf(codes.InvalidArgument, "payload _type %q, want \"link\"", probe.Type)
	}
	var l in_toto.Link
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.DisallowUnknownFields()
	dec.UseNumber()
	if err := dec.Decode(&l); err != nil {
		return in_toto.Link{}, status.Errorf(codes.InvalidArgument, "link payload: %v", err)
	}
	return l, nil
}

// LinkLogEntry is the transparency-log entry for a link envelope: "link:" followed by
// the envelope digest "HASH/SIZE". The log holds digests, not envelopes, so entries stay
// small (tlog-tiles caps an entry at 64 KiB; a link with many inputs is larger).
func LinkLogEntry(env cache.Digest) []byte {
	return []byte("link:" + env.Hash + "/" + strconv.FormatInt(env.Size, 10))
}

// ParseLinkLogEntry is the inverse of LinkLogEntry.
func ParseLinkLogEntry(b []byte) (cache.Digest, bool) {
	s, ok := strings.CutPrefix(string(b), "link:")
	if !ok {
		return cache.Digest{}, false
	}
	d, err := cache.ParseDigest(s)
	return d, err == nil
}

func short(id string) string {
	if len(id) > 16 {
		return id[:16]
	}
	if id == "" {
		return "<no keyid>"
	}
	return id
}
