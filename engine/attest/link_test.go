package attest

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/in-toto/in-toto-golang/in_toto"
)

// TestLinkVerifiesWithInTotoGolang checks a link with in-toto-golang's own loaders and
// verifiers only (not kiln's verify path), against the exported public key, including
// InTotoVerify with a small layout.
func TestLinkVerifiesWithInTotoGolang(t *testing.T) {
	ctx := context.Background()
	data := t.TempDir()
	s := openSigner(t, data, Options{})
	a := sampleAction()
	res, err := s.Link(ctx, a)
	if err != nil {
		t.Fatal(err)
	}

	// The public key as `kiln attest pubkey` exports it, loaded by in-toto-golang.
	exp, err := s.Keyring().Export()
	if err != nil {
		t.Fatal(err)
	}
	pubFile := filepath.Join(t.TempDir(), "executor.pub")
	os.WriteFile(pubFile, []byte(exp.Keys[0].PEM), 0o644)
	var execKey in_toto.Key
	if err := execKey.LoadKeyDefaults(pubFile); err != nil {
		t.Fatal(err)
	}
	if execKey.KeyID != res.KeyID {
		t.Fatalf("in-toto computes key id %s, kiln signed with %s", execKey.KeyID, res.KeyID)
	}

	linkDir := t.TempDir()
	name := a.ActionDigest.Hash
	linkFile := filepath.Join(linkDir, name+"."+res.KeyID[:8]+".link")
	os.WriteFile(linkFile, res.Envelope, 0o644)
	md, err := in_toto.LoadMetadata(linkFile)
	if err != nil {
		t.Fatalf("in-toto cannot load the envelope: %v", err)
	}
	if err := md.VerifySignature(execKey); err != nil {
		t.Fatalf("in-toto rejects the signature: %v", err)
	}
	link, ok := md.GetPayload().(in_toto.Link)
	if !ok {
		t.Fatalf("payload is %T", md.GetPayload())
	}
	if link.Name != name || link.Command[2] != a.Argv[2] {
		t.Errorf("link name %q command %q", link.Name, link.Command)
	}
	for p, want := range map[string]string{
		"src/hello.c":     a.Inputs[0].Digest.Hash,
		MaterialAction:    a.ActionDigest.Hash,
		MaterialCommand:   a.CommandDigest.Hash,
		MaterialToolchain: strings.TrimPrefix(a.Toolchain, "sha256:"),
	} {
		if got := link.Materials[p]["sha256"]; got != want {
			t.Errorf("material %s = %q, want %q", p, got, want)
		}
	}
	if got := link.Products["out/hello.o"]["sha256"]; got != a.Outputs[0].Digest.Hash {
		t.Errorf("product = %q", got)
	}

	// InTotoVerify with a layout signed by an owner key.
	ownerPriv, ownerPub := ownerKey(t)
	layout := func(products [][]string) *in_toto.Metablock {
		mb := &in_toto.Metablock{Signed: in_toto.Layout{
			Type:    "layout",
			Expires: time.Now().Add(time.Hour).UTC().Format("2006-01-02T15:04:05Z"),
			Keys:    map[string]in_toto.Key{execKey.KeyID: execKey},
			Steps: []in_toto.Step{{
				Type:            "step",
				PubKeys:         []string{execKey.KeyID},
				ExpectedCommand: a.Argv,
				Threshold:       1,
				SupplyChainItem: in_toto.SupplyChainItem{
					Name:              name,
					ExpectedMaterials: [][]string{{"ALLOW", "src/*"}, {"REQUIRE", MaterialToolchain}, {"ALLOW", "kiln:*"}, {"DISALLOW", "*"}},
					ExpectedProducts:  products,
				},
			}},
			Inspect: []in_toto.Inspection{},
		}}
		if err := mb.Sign(ownerPriv); err != nil {
			t.Fatal(err)
		}
		return mb
	}
	owner := map[string]in_toto.Key{ownerPub.KeyID: ownerPub}
	if _, err := in_toto.InTotoVerify(layout([][]string{{"CREATE", "out/hello.o"}, {"DISALLOW", "*"}}), owner, linkDir, "", nil, nil, false); err != nil {
		t.Fatalf("InTotoVerify: %v", err)
	}
	// The same layout demanding a product the action did not make must fail.
	if _, err := in_toto.InTotoVerify(layout([][]string{{"REQUIRE", "out/other.o"}, {"ALLOW", "*"}}), owner, linkDir, "", nil, nil, false); err == nil {
		t.Fatal("InTotoVerify accepted a layout requiring a product the link lacks")
	}
}

// TestPayloadIdenticalAcrossExecutors: the same Action in two fresh data dirs with
// different keys gives byte-identical payloads and different signatures.
func TestPayloadIdenticalAcrossExecutors(t *testing.T) {
	ctx := context.Background()
	a := sampleAction()
	r1, err := openSigner(t, t.TempDir(), Options{}).Link(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	b := sampleAction()
	// Same action described in another order: inputs, outputs and platform reversed.
	for i, j := 0, len(b.Inputs)-1; i < j; i, j = i+1, j-1 {
		b.Inputs[i], b.Inputs[j] = b.Inputs[j], b.Inputs[i]
	}
	b.Platform[0], b.Platform[1] = b.Platform[1], b.Platform[0]
	r2, err := openSigner(t, t.TempDir(), Options{}).Link(ctx, b)
	if err != nil {
		t.Fatal(err)
	}
	p1, p2 := payloadOf(t, r1.Envelope), payloadOf(t, r2.Envelope)
	if !bytes.Equal(p1, p2) {
		t.Fatalf("payloads differ:\n%s\n%s", p1, p2)
	}
	if r1.KeyID == r2.KeyID || bytes.Equal(r1.Envelope, r2.Envelope) {
		t.Fatal("two data dirs signed with the same key")
	}
	if bytes.Contains(p1, []byte(r1.KeyID)) {
		t.Fatal("payload names the executor key")
	}
	// And nothing in it depends on the clock or the host.
	for _, bad := range []string{time.Now().UTC().Format("2006-01-02"), mustHostname(t)} {
		if bad != "" && bytes.Contains(p1, []byte(bad)) {
			t.Errorf("payload contains %q", bad)
		}
	}
}

func mustHostname(t *testing.T) string {
	h, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// TestLinkIdempotent: linking the same action twice with one key logs it once.
func TestLinkIdempotent(t *testing.T) {
	ctx := context.Background()
	s := openSigner(t, t.TempDir(), Options{})
	r1, err := s.Link(ctx, sampleAction())
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	r2, err := s.Link(ctx, sampleAction())
	if err != nil {
		t.Fatal(err)
	}
	if r1.Digest != r2.Digest || !r2.Logged || r2.LogIndex != 0 {
		t.Fatalf("relinking changed the envelope or log entry: %+v vs %+v", r1, r2)
	}
	n, err := s.log.Size(ctx)
	if err != nil || n != 1 {
		t.Fatalf("log size %d (%v), want 1", n, err)
	}
	got, _ := s.Store().Producers(AlgSHA256, sampleAction().Outputs[0].Digest.Hash)
	if len(got) != 1 || got[0] != r1.Digest {
		t.Fatalf("producers %v", got)
	}
}

func TestLinkRejectsBadActions(t *testing.T) {
	for name, mut := range map[string]func(*Action){
		"unclean input":     func(a *Action) { a.Inputs[0].Path = "src/../etc/passwd" },
		"absolute output":   func(a *Action) { a.Outputs[0].Path = "/etc/passwd" },
		"duplicate input":   func(a *Action) { a.Inputs = append(a.Inputs, a.Inputs[0]) },
		"reserved name":     func(a *Action) { a.Inputs[0].Path = MaterialToolchain },
		"bad toolchain":     func(a *Action) { a.Toolchain = "debian-gcc:latest" },
		"no action digest":  func(a *Action) { a.ActionDigest.Hash = "" },
		"bad output digest": func(a *Action) { a.Outputs[0].Digest.Hash = "XYZ" },
		"invalid utf-8":     func(a *Action) { a.Argv = append(a.Argv, "\xff") },
	} {
		a := sampleAction()
		mut(&a)
		if _, err := a.Payload(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// TestPayloadFastPathMatchesCanonicalJSON: the direct encoder gives the same bytes as
// canonicalizing the in-toto Link struct through encoding/json.
func TestPayloadFastPathMatchesCanonicalJSON(t *testing.T) {
	for _, a := range []Action{sampleAction(), linkAction(sampleAction().Outputs[0]), benchAction(7, 50)} {
		fast, err := a.Payload()
		if err != nil {
			t.Fatal(err)
		}
		l, _ := a.Link()
		slow, err := CanonicalJSON(l)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(fast, slow) {
			t.Fatalf("fast and generic canonical JSON differ:\n%s\n%s", fast, slow)
		}
	}
}

func TestCanonicalJSON(t *testing.T) {
	for _, c := range []struct {
		in   any
		want string
	}{
		{map[string]any{"b": 1, "a": []any{"x\ny", "<&>", "é", "\u2028", "\x01"}}, `{"a":["x\ny","<&>","é","` + "\u2028" + `","\u0001"],"b":1}`},
		// RFC 8785 sorts by UTF-16 code units: U+1F600 (surrogates D83D..) before U+FB01.
		{map[string]any{"\uFB01": 1, "\U0001F600": 2}, `{"` + "\U0001F600" + `":2,"` + "\uFB01" + `":1}`},
	} {
		got, err := CanonicalJSON(c.in)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != c.want {
			t.Errorf("CanonicalJSON(%v) = %s, want %s", c.in, got, c.want)
		}
	}
	if _, err := CanonicalJSON(map[string]any{"f": 1.5}); err == nil {
		t.Error("a non-integer number was accepted")
	}
}
