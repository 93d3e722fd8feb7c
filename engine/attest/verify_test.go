package attest

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/engine/attest/tlog"
	"google.golang.org/protobuf/types/known/structpb"
)

// fixture is a data dir holding a two-action chain: compile (sources -> out/hello.o)
// and link (out/hello.o -> out/hello), signed and logged, with the signer closed (a
// checkpoint covers both links).
type fixture struct {
	data           string
	trust          keys.Trust
	compile, link  Linked
	subject        Subject
	compileA, binA Action
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	ctx := context.Background()
	f := &fixture{data: t.TempDir()}
	s := openSigner(t, f.data, Options{})
	f.compileA = sampleAction()
	var err error
	if f.compile, err = s.Link(ctx, f.compileA); err != nil {
		t.Fatal(err)
	}
	f.binA = linkAction(f.compileA.Outputs[0])
	if f.link, err = s.Link(ctx, f.binA); err != nil {
		t.Fatal(err)
	}
	exp, err := s.Keyring().Export()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(exp)
	if f.trust, err = keys.ParseTrust(b); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	f.subject = Subject{Name: "out/hello", SHA256: f.binA.Outputs[0].Digest.Hash}
	return f
}

func (f *fixture) store(t *testing.T) *Store {
	return NewStore(PathsFor(f.data), openCAS(t, f.data))
}

func (f *fixture) verifier(t *testing.T, trust keys.Trust) (*Verifier, error) {
	t.Helper()
	lv, err := f.trust.Log.Verifier()
	if err != nil {
		t.Fatal(err)
	}
	return NewVerifier(context.Background(), f.store(t), VerifierOptions{Trust: trust, LogVerifier: lv})
}

func (f *fixture) mustVerifier(t *testing.T) *Verifier {
	t.Helper()
	v, err := f.verifier(t, f.trust)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// wantFailure asserts that ch failed, with a failure for link naming reason.
func wantFailure(t *testing.T, ch *Chain, link, reason string) {
	t.Helper()
	if ch.OK() {
		t.Fatalf("chain verified; want failure %q for link %q", reason, link)
	}
	for _, f := range ch.Failures {
		if strings.HasPrefix(f.Link, link) && strings.Contains(f.Reason, reason) {
			return
		}
	}
	t.Fatalf("failures %v; want one for link %q containing %q", ch.Failures, link, reason)
}

func TestChainProvenanceAndSBOM(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	v := f.mustVerifier(t)
	ch, err := v.Chain(ctx, f.subject)
	if err != nil {
		t.Fatal(err)
	}
	if !ch.OK() {
		t.Fatalf("chain failed: %v", ch.Failures)
	}
	if len(ch.Top) != 1 || ch.Top[0].Envelope != f.link.Digest || len(ch.Links) != 2 {
		t.Fatalf("top %d links %d", len(ch.Top), len(ch.Links))
	}
	var paths []string
	for _, s := range ch.Sources {
		paths = append(paths, s.Path)
	}
	if got := strings.Join(paths, ","); got != "src/hello.c,src/hello.h,src/link.h" {
		t.Fatalf("sources %s", got)
	}
	if len(ch.Toolchains) != 1 || "sha256:"+ch.Toolchains[0] != f.compileA.Toolchain {
		t.Fatalf("toolchains %v", ch.Toolchains)
	}

	st, err := ch.Statement(f.trust.Log.Origin)
	if err != nil {
		t.Fatal(err)
	}
	sk := activeSigner(t, f.data)
	env, err := SignStatement(ctx, sk, st)
	if err != nil {
		t.Fatal(err)
	}
	// Deterministic: a second run over a fresh verifier gives the same bytes.
	ch2, _ := f.mustVerifier(t).Chain(ctx, f.subject)
	st2, _ := ch2.Statement(f.trust.Log.Origin)
	env2, _ := SignStatement(ctx, sk, st2)
	if !bytes.Equal(env, env2) {
		t.Fatal("provenance is not deterministic")
	}
	payload := payloadOf(t, env)
	for _, want := range []string{SLSAProvenanceType, BuildType, "src/hello.c", f.compileA.Inputs[0].Digest.Hash, strings.TrimPrefix(f.compileA.Toolchain, "sha256:"), f.compile.Digest.Hash, f.binA.ActionDigest.String()} {
		if !bytes.Contains(payload, []byte(want)) {
			t.Errorf("provenance lacks %s", want)
		}
	}

	p, err := ParseProvenance(ctx, env, f.trust)
	if err != nil {
		t.Fatal(err)
	}
	pch := f.mustVerifier(t).CheckProvenance(ctx, p, f.subject)
	if !pch.OK() {
		t.Fatalf("provenance check failed: %v", pch.Failures)
	}
	// Log indexes recorded for each link.
	for _, b := range p.Predicate.GetRunDetails().GetByproducts() {
		if _, ok := b.GetAnnotations().GetFields()["logIndex"]; !ok {
			t.Errorf("byproduct %s has no log index", b.GetName())
		}
	}
	checkLogHints(t, f, p, pch)
	// The scan for links finds exactly what decoding finds.
	sp, err := VerifyProvenanceSignature(ctx, env, f.trust)
	if err != nil {
		t.Fatal(err)
	}
	if links, hints := sp.LinkHints(); !reflect.DeepEqual(links, p.Links) || !reflect.DeepEqual(hints, p.LogIndexes) {
		t.Errorf("scanned links %v %v, decoded %v %v", links, hints, p.Links, p.LogIndexes)
	}

	sbom, err := EncodeSBOM(ch.SBOM("test"))
	if err != nil {
		t.Fatal(err)
	}
	if fails := ch.CheckSBOM(sbom); len(fails) != 0 {
		t.Fatalf("sbom check: %v", fails)
	}
	for _, want := range []string{"src/hello.c", f.compileA.Inputs[0].Digest.Hash, "container", "SHA-256"} {
		if !bytes.Contains(sbom, []byte(want)) {
			t.Errorf("sbom lacks %s", want)
		}
	}
	bad := bytes.Replace(sbom, []byte(`"content": "`+f.compileA.Inputs[0].Digest.Hash), []byte(`"content": "`+strings.Repeat("0", 64)), 1)
	if bytes.Equal(bad, sbom) {
		t.Fatal("test did not change the SBOM")
	}
	if fails := ch.CheckSBOM(bad); len(fails) == 0 {
		t.Fatal("an SBOM with a changed source hash passed")
	}
}

// checkLogHints: the provenance's log indexes are where its links are logged; with the
// store's log index records gone, the verifier finds entries at the hinted indexes
// (and only at an index that holds the envelope's entry: a wrong hint is not taken),
// and the provenance still verifies, wrong hints or none.
func checkLogHints(t *testing.T, f *fixture, p *Provenance, pch *Chain) {
	t.Helper()
	ctx := context.Background()
	if len(p.LogIndexes) != len(p.Links) || len(pch.Links) != len(p.Links) {
		t.Fatalf("log indexes %v for links %v", p.LogIndexes, p.Links)
	}
	for _, l := range pch.Links {
		if i, ok := p.LogIndexes[l.Envelope]; !ok || i != l.LogIndex {
			t.Errorf("link %s logged at %d, provenance says %d (%v)", l.Link.Name, l.LogIndex, i, ok)
		}
	}
	if err := os.RemoveAll(filepath.Join(PathsFor(f.data).Attest, "logidx")); err != nil {
		t.Fatal(err)
	}
	v := f.mustVerifier(t)
	wrong := map[cache.Digest]uint64{}
	for i, d := range p.Links {
		wrong[d] = p.LogIndexes[p.Links[(i+1)%len(p.Links)]]
	}
	cp := v.Checkpoint()
	pv, err := v.log.Prover(ctx, cp.Size)
	if err != nil {
		t.Fatal(err)
	}
	for _, hints := range []map[cache.Digest]uint64{nil, wrong, p.LogIndexes} {
		v := f.mustVerifier(t)
		v.HintLogIndexes(hints)
		for _, d := range p.Links {
			i, ok := v.logHint(ctx, d, LinkLogEntry(d), cp, pv)
			if want := hints[d] == p.LogIndexes[d] && hints != nil; ok != want || (ok && i != p.LogIndexes[d]) {
				t.Errorf("hints %v: link %s found at %d (%v), want %d (%v)", hints, d, i, ok, p.LogIndexes[d], want)
			}
		}
		if ch := v.CheckProvenance(ctx, &Provenance{Statement: p.Statement, Links: p.Links, LogIndexes: hints, Sources: p.Sources, Toolchains: p.Toolchains}, f.subject); !ch.OK() {
			t.Errorf("hints %v: %v", hints, ch.Failures)
		}
	}
}

func activeSigner(t *testing.T, data string) *keys.Signer {
	t.Helper()
	kr, err := keys.Open(context.Background(), PathsFor(data).Keys, keys.Options{})
	if err != nil {
		t.Fatal(err)
	}
	k, err := kr.Active()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// replaceLink makes the store point at envelope env instead of the link old: it is
// stored, and the product and action indexes list it in place of old.
func replaceLink(t *testing.T, st *Store, old cache.Digest, env []byte, products []File, action string) cache.Digest {
	t.Helper()
	d, err := st.PutEnvelope(context.Background(), env)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range products {
		alg, h := artifactHash(p)
		path := st.productPath(alg, h)
		os.Remove(path)
		if err := st.AddProduct(alg, h, d); err != nil {
			t.Fatal(err)
		}
	}
	os.Remove(st.actionPath(action))
	st.AddAction(action, d)
	return d
}

func TestTamperPayloadByte(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	st := f.store(t)
	p := payloadOf(t, f.link.Envelope)
	p = bytes.Replace(p, []byte(`"cc"`), []byte(`"CC"`), 1) // one byte of argv
	env := resign(t, f.link.Envelope, p, nil)
	replaceLink(t, st, f.link.Digest, env, f.binA.Outputs, f.binA.ActionDigest.Hash)
	v := f.mustVerifier(t)
	if _, err := v.LinkBytes(ctx, env); err == nil || !strings.Contains(err.Error(), "no valid signature") {
		t.Fatalf("tampered payload: %v", err)
	}
	ch, err := v.Chain(ctx, f.subject)
	if err != nil {
		t.Fatal(err)
	}
	wantFailure(t, ch, cache.DigestOf(env).String(), "no valid signature by a trusted key")
	wantFailure(t, ch, "", "no verified link produced it")
}

func TestTamperSwappedProduct(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	st := f.store(t)
	// The attacker claims the link produced a different binary.
	evil := file("out/hello", "EVIL hello executable")
	p := bytes.Replace(payloadOf(t, f.link.Envelope), []byte(f.binA.Outputs[0].Digest.Hash), []byte(evil.Digest.Hash), 1)
	env := resign(t, f.link.Envelope, p, nil)
	replaceLink(t, st, f.link.Digest, env, []File{evil}, f.binA.ActionDigest.Hash)
	ch, err := f.mustVerifier(t).Chain(ctx, Subject{Name: "out/hello", SHA256: evil.Digest.Hash})
	if err != nil {
		t.Fatal(err)
	}
	wantFailure(t, ch, cache.DigestOf(env).String(), "no valid signature")
	// And the honest link does not vouch for a swapped artifact either.
	os.Remove(st.productPath(AlgSHA256, evil.Digest.Hash))
	st.AddProduct(AlgSHA256, evil.Digest.Hash, f.link.Digest) // the index lies
	ch, _ = f.mustVerifier(t).Chain(ctx, Subject{Name: "out/hello", SHA256: evil.Digest.Hash})
	wantFailure(t, ch, f.binA.ActionDigest.Hash, "signed products do not include it")
}

func TestTamperMaterialMissingFromChain(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	// A provenance (signed by the trusted key) that omits the compile link and does not
	// declare out/hello.o a source: the link's material is unexplained.
	ch, _ := f.mustVerifier(t).Chain(ctx, f.subject)
	st, err := ch.Statement(f.trust.Log.Origin)
	if err != nil {
		t.Fatal(err)
	}
	rd := st.Predicate.Fields["runDetails"].GetStructValue().Fields["byproducts"].GetListValue()
	var kept []*structpb.Value
	for _, b := range rd.Values {
		if !strings.Contains(b.GetStructValue().Fields["name"].GetStringValue(), f.compileA.ActionDigest.Hash) {
			kept = append(kept, b)
		}
	}
	rd.Values = kept
	env, err := SignStatement(ctx, activeSigner(t, f.data), st)
	if err != nil {
		t.Fatal(err)
	}
	p, err := ParseProvenance(ctx, env, f.trust)
	if err != nil {
		t.Fatal(err)
	}
	pch := f.mustVerifier(t).CheckProvenance(ctx, p, f.subject)
	wantFailure(t, pch, f.binA.ActionDigest.Hash, "material out/hello.o (sha256 "+f.compileA.Outputs[0].Digest.Hash+") is neither a declared source nor a product of another listed link")

	// The compile link's envelope lost from the store while the index still names it.
	s := f.store(t)
	os.Remove(s.envelopePath(f.compile.Digest.Hash))
	os.Remove(filepath.Join(PathsFor(f.data).CAS, "cas", f.compile.Digest.Hash[:2], f.compile.Digest.Hash))
	ch, err = f.mustVerifier(t).Chain(ctx, f.subject)
	if err != nil {
		t.Fatal(err)
	}
	wantFailure(t, ch, f.binA.ActionDigest.Hash, "material out/hello.o")
}

func TestTamperUntrustedKey(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	// Verify with another executor's key only.
	other := newFixture(t)
	v, err := f.verifier(t, other.trust)
	if err != nil {
		t.Fatal(err)
	}
	ch, err := v.Chain(ctx, f.subject)
	if err != nil {
		t.Fatal(err)
	}
	wantFailure(t, ch, f.link.Digest.String(), "no valid signature by a trusted key")
	// An attacker re-signs a modified link with their own key and logs it.
	attacker := keys.NewSigner(mustKey(t))
	p := bytes.Replace(payloadOf(t, f.link.Envelope), []byte(`"cc"`), []byte(`"CC"`), 1)
	env := resign(t, f.link.Envelope, p, attacker)
	st := f.store(t)
	d := replaceLink(t, st, f.link.Digest, env, f.binA.Outputs, f.binA.ActionDigest.Hash)
	appendToLog(t, f, d)
	ch, _ = f.mustVerifier(t).Chain(ctx, f.subject)
	wantFailure(t, ch, d.String(), "no valid signature by a trusted key (signed by "+attacker.ID()[:16])
}

// appendToLog appends the entry for envelope d to f's log with f's own log key.
func appendToLog(t *testing.T, f *fixture, d cache.Digest) uint64 {
	t.Helper()
	ctx := context.Background()
	ls, err := keys.LoadLogSigner(PathsFor(f.data).Keys)
	if err != nil {
		t.Fatal(err)
	}
	l, err := tlog.Open(ctx, PathsFor(f.data).Log, ls, tlog.Options{CheckpointInterval: 100e6})
	if err != nil {
		t.Fatal(err)
	}
	i, err := l.Append(ctx, LinkLogEntry(d))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Close(ctx); err != nil {
		t.Fatal(err)
	}
	return i
}

func TestTamperEntryMissingFromLog(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	// A link signed by a trusted key (another data dir's, trusted too) but logged only
	// there: copied into this store and index, it is not in this log.
	g := newFixture(t)
	trust := f.trust
	trust.Add(keys.Trust{Keys: g.trust.Keys})
	st := f.store(t)
	// g's link for the same action: same payload, g's key.
	d := replaceLink(t, st, f.link.Digest, g.link.Envelope, f.binA.Outputs, f.binA.ActionDigest.Hash)
	v, err := f.verifier(t, trust)
	if err != nil {
		t.Fatal(err)
	}
	ch, err := v.Chain(ctx, f.subject)
	if err != nil {
		t.Fatal(err)
	}
	wantFailure(t, ch, d.String(), "not in the transparency log")
	// A forged log-index hint does not help: the entry there is another one.
	st.SetLogIndex(d, 0)
	v, _ = f.verifier(t, trust)
	ch, _ = v.Chain(ctx, f.subject)
	wantFailure(t, ch, d.String(), "not in the transparency log")
}

func TestTamperRewrittenCheckpoint(t *testing.T) {
	f := newFixture(t)
	cpPath := filepath.Join(PathsFor(f.data).Log, "checkpoint")
	raw, err := os.ReadFile(cpPath)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitN(string(raw), "\n", 4)
	lines[2] = strings.Repeat("A", 43) + "=" // another root hash, same signature
	os.WriteFile(cpPath, []byte(strings.Join(lines, "\n")), 0o644)
	if _, err := f.verifier(t, f.trust); err == nil || !strings.Contains(err.Error(), "checkpoint does not verify") {
		t.Fatalf("rewritten checkpoint: %v", err)
	}
	os.WriteFile(cpPath, raw, 0o644)

	// A log rewritten by someone holding the log key: a pinned earlier checkpoint
	// exposes it. g shares f's keyring but has a different history.
	lv, _ := f.trust.Log.Verifier()
	pinned, err := tlog.ParseCheckpoint(raw, lv)
	if err != nil {
		t.Fatal(err)
	}
	g := t.TempDir()
	copyDir(t, PathsFor(f.data).Keys, PathsFor(g).Keys)
	s := openSigner(t, g, Options{})
	other := sampleAction()
	other.Argv = []string{"true"}
	for i := 0; i < 3; i++ {
		other.ExitCode = i
		if _, err := s.Link(context.Background(), other); err != nil {
			t.Fatal(err)
		}
	}
	s.Close(context.Background())
	_, err = NewVerifier(context.Background(), NewStore(PathsFor(g), openCAS(t, g)), VerifierOptions{Trust: f.trust, LogVerifier: lv, Pinned: pinned})
	if err == nil || !strings.Contains(err.Error(), "not consistent with the pinned checkpoint") {
		t.Fatalf("forked log: %v", err)
	}
	// The honest log is consistent with its own pinned checkpoint.
	if _, err := NewVerifier(context.Background(), f.store(t), VerifierOptions{Trust: f.trust, LogVerifier: lv, Pinned: pinned}); err != nil {
		t.Fatal(err)
	}
}

func copyDir(t *testing.T, from, to string) {
	t.Helper()
	if err := os.MkdirAll(to, 0o700); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, e.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}
