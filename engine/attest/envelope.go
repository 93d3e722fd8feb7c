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
	var env dsse.Envelope
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&env); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "not a DSSE envelope: %v", err)
	}
	if env.PayloadType != PayloadType {
		return nil, status.Errorf(codes.InvalidArgument, "envelope payload type %q, want %q", env.PayloadType, PayloadType)
	}
	if len(env.Signatures) == 0 {
		return nil, status.Error(codes.InvalidArgument, "envelope has no signatures")
	}
	return &env, nil
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
func DecodeLink(payload []byte) (in_toto.Link, error) {
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
