package attest

import (
	"context"
	"reflect"
	"strings"
	"testing"
)

// TestCompactEnvelopeAgrees: what the fast envelope reader accepts, encoding/json
// decodes to the same envelope; kiln's own envelopes take the fast path; and every
// other form (spaces, escapes, other orders, extra fields, trailing data, non-ASCII)
// is left to encoding/json.
func TestCompactEnvelopeAgrees(t *testing.T) {
	ctx := context.Background()
	s := openSigner(t, t.TempDir(), Options{})
	l, err := s.Link(ctx, sampleAction())
	if err != nil {
		t.Fatal(err)
	}
	real := string(l.Envelope)
	if _, ok := parseCompactEnvelope(l.Envelope); !ok {
		t.Fatalf("kiln's envelope does not take the fast path: %.200s", real)
	}
	two := `{"payloadType":"application/vnd.in-toto+json","payload":"eyJ9","signatures":[{"keyid":"a","sig":"AA=="},{"keyid":"","sig":"Qg=="}]}`
	fast := []string{real, two}
	slow := []string{
		strings.Replace(real, `{"payloadType"`, `{ "payloadType"`, 1),
		strings.Replace(real, `"keyid":"`, `"keyid":"\u0041`, 1),
		strings.Replace(real, `"keyid":"`, `"keyid":"é`, 1),
		strings.Replace(real, `"keyid":"`, `"keyid":"\x7f`, 1),
		strings.Replace(real, `"payloadType"`, `"PayloadType"`, 1),
		strings.Replace(real, `"sig":`, `"extra":1,"sig":`, 1),
		real + ` `,
		real + `{}`,
		real[:len(real)-1],
		`{"payload":"eyJ9","payloadType":"application/vnd.in-toto+json","signatures":[{"keyid":"a","sig":"AA=="}]}`,
		`{"payloadType":"application/vnd.in-toto+json","payload":"eyJ9","signatures":[]}`,
		`{"payloadType":"application/vnd.in-toto+json","payload":"eyJ9","signatures":[{"keyid":"a","sig":"AA=="},]}`,
		`{"payloadType":"application/vnd.in-toto+json","payload":"eyJ9","signatures":null}`,
	}
	for _, in := range fast {
		got, ok := parseCompactEnvelope([]byte(in))
		if !ok {
			t.Errorf("fast path refused %.120s", in)
			continue
		}
		want, err := decodeEnvelope([]byte(in))
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("fast %+v, encoding/json %+v (%v)", got, want, err)
		}
	}
	for _, in := range slow {
		if got, ok := parseCompactEnvelope([]byte(in)); ok {
			t.Errorf("fast path accepted %.120s as %+v", in, got)
		}
	}
	// The checks after decoding hold on either path.
	if _, err := ParseEnvelope([]byte(strings.Replace(two, "application/vnd.in-toto+json", "text/plain", 1))); err == nil {
		t.Error("another payload type accepted")
	}
}

// TestDecodeLinkErrors: the one-pass link decoder refuses what the two-pass one did,
// with the same errors.
func TestDecodeLinkErrors(t *testing.T) {
	payload, err := sampleAction().Payload()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := DecodeLink(payload); err != nil {
		t.Fatal(err)
	}
	p := string(payload)
	for _, c := range []struct{ in, want string }{
		{p + " x", "payload is not JSON"},
		{p + " {}", "payload is not JSON"},
		{strings.Replace(p, `"_type":"link"`, `"_type":"layout"`, 1), `payload _type "layout"`},
		{strings.Replace(p, `"_type":"link"`, `"_type":"link","bogus":1`, 1), "link payload: json: unknown field"},
		{`[]`, "payload is not JSON"},
		{`null`, "payload _type"},
	} {
		_, err := DecodeLink([]byte(c.in))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%.60s: %v, want %q", c.in, err, c.want)
		}
		if _, slowErr := decodeLinkSlow([]byte(c.in)); slowErr == nil || slowErr.Error() != err.Error() {
			t.Errorf("%.60s: %v; two-pass decoder: %v", c.in, err, slowErr)
		}
	}
	if _, err := DecodeLink([]byte(p + " \n")); err != nil {
		t.Errorf("trailing space: %v", err)
	}
}
