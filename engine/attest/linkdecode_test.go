package attest

import (
	"reflect"
	"strings"
	"testing"
)

// linkPayloads are kiln link payloads of every shape Action.Link makes: symlinks,
// platform properties, escapes and non-ASCII in argv, reproducibility and requester
// byproducts, no toolchain, no inputs.
func linkPayloads(t testing.TB) [][]byte {
	t.Helper()
	odd := sampleAction()
	odd.Argv = []string{"sh", "-c", "printf 'é\\t\"ok\"\\n' \u2028 \x01 </>&", ""}
	odd.Reproducibility = "nondeterministic: out/a.o differs"
	odd.RequestedBy = "spiffe://example.org/ci"
	odd.ExitCode = -3
	bare := linkAction(file("out/hello.o", "ELF hello.o"))
	bare.Toolchain, bare.Inputs, bare.Argv = "", nil, nil
	var out [][]byte
	for _, a := range []Action{sampleAction(), linkAction(file("out/hello.o", "ELF hello.o")), odd, bare} {
		p, err := a.Payload()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, p)
	}
	return out
}

// TestDecodeLinkFastAgrees: kiln's own payloads take the fast path and decode to what
// encoding/json gives; other forms encoding/json reads differently or refuses
// (duplicates, keys matched case-insensitively, nulls, surrogate escapes, invalid
// UTF-8, unknown fields, another _type, trailing data, bad numbers) are left to it.
func TestDecodeLinkFastAgrees(t *testing.T) {
	payloads := linkPayloads(t)
	for _, p := range payloads {
		got, ok := decodeLinkFast(p)
		if !ok {
			t.Fatalf("kiln's payload does not take the fast path: %.300s", p)
		}
		want, ok := decodeLinkJSON(p)
		if !ok || !reflect.DeepEqual(got, want) {
			t.Errorf("fast %#v\nencoding/json %#v", got, want)
		}
	}
	p := string(payloads[0])
	fast := []string{
		" \n" + strings.ReplaceAll(p, ",", " ,\t") + "\r\n",
		`{"_type":"l\u0069nk","name":"\ud7ff\u00e9\/\b\f\r","command":[],"byproducts":{"a":[1,-0.5e+3,2E-1,true,false,null,{},[],{"b":"c"}]},"environment":{},"materials":{},"products":{"x":{}}}`,
		`{"_type":"link"}`,
	}
	for _, in := range fast {
		got, ok := decodeLinkFast([]byte(in))
		if !ok {
			t.Errorf("fast path refused %.200s", in)
			continue
		}
		want, ok := decodeLinkJSON([]byte(in))
		if !ok || !reflect.DeepEqual(got, want) {
			t.Errorf("%.100s: fast %#v\nencoding/json %#v", in, got, want)
		}
	}
	slow := []string{
		strings.Replace(p, `"_type":"link"`, `"_type":"link","name":"again"`, 1),
		strings.Replace(p, `"_type":"link"`, `"_type":"link","bogus":1`, 1),
		strings.Replace(p, `"_type":"link"`, `"_type":"layout"`, 1),
		`{"_type":"link","Name":"x"}`,
		`{"_type":"link","name":"x","NAME":"y"}`,
		strings.Replace(p, `"command":[`, `"command":[null,`, 1),
		strings.Replace(p, `"kiln:version":"`, `"kiln:version":"\ud83d\ude00`, 1),
		strings.Replace(p, `"kiln:version":"`, `"kiln:version":"\ud800`, 1),
		strings.Replace(p, `"kiln:version":"`, `"kiln:version":"\x`, 1),
		strings.Replace(p, `"kiln:version":"`, "\"kiln:version\":\"\xff", 1),
		strings.Replace(p, `"kiln:version":"`, "\"kiln:version\":\"\x7f\t", 1),
		strings.Replace(p, `"return-value":0`, `"return-value":01`, 1),
		strings.Replace(p, `"return-value":0`, `"return-value":1.`, 1),
		strings.Replace(p, `"return-value":0`, `"return-value":0,"return-value":1`, 1),
		strings.Replace(p, `"return-value":0`, `"return-value":nul`, 1),
		`{"_type":"link","materials":null}`,
		`{"_type":"link","command":null}`,
		`{"_type":"link","materials":{"a":{"sha256":1}}}`,
		`{"_type":"link","materials":{"a":{"sha256":"x","sha256":"y"}}}`,
		`{"_type":"link","materials":{"a":{},"a":{}}}`,
		`{"_type":"link","environment":{"a":` + strings.Repeat("[", 100) + strings.Repeat("]", 100) + `}}`,
		`{"_type":"link",}`,
		`{}`,
		`null`,
		p + `{}`,
		p[:len(p)-1],
	}
	for _, in := range slow {
		if got, ok := decodeLinkFast([]byte(in)); ok {
			t.Errorf("fast path accepted %.200s as %#v", in, got)
		}
	}
}

// FuzzDecodeLinkFast: whatever the fast link decoder accepts, encoding/json decodes to
// the same link (the fast path can never accept a document differently).
//
//	go test ./engine/attest -run '^$' -fuzz DecodeLinkFast -fuzztime 2m
func FuzzDecodeLinkFast(f *testing.F) {
	for _, p := range linkPayloads(f) {
		f.Add(p)
	}
	f.Add([]byte(`{"_type":"link","name":"\u00e9\/","command":[],"byproducts":{"a":[1,-0.5e+3,true,null,{},[]]},"environment":{},"materials":{},"products":{"x":{}}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		got, ok := decodeLinkFast(b)
		if !ok {
			return
		}
		want, ok := decodeLinkJSON(b)
		if !ok {
			t.Fatalf("fast path accepted what encoding/json refuses: %q", b)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("%q: fast %#v\nencoding/json %#v", b, got, want)
		}
		if l, err := DecodeLink(b); err != nil || !reflect.DeepEqual(l, want) {
			t.Fatalf("DecodeLink %#v, %v", l, err)
		}
	})
}
