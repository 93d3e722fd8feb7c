package attest

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnbuild/kiln/engine/attest/keys"
)

// TestRotationKeepsOldLinksVerifiable: a link signed before a rotation verifies after
// it (with the exported keyring, and with only the old PEM key); a link signed with the
// retired key after the rotation is refused.
func TestRotationKeepsOldLinksVerifiable(t *testing.T) {
	ctx := context.Background()
	data := t.TempDir()
	s := openSigner(t, data, Options{})
	a := sampleAction()
	before, err := s.Link(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	old, cur, err := s.Keyring().Rotate(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if old.KeyID != before.KeyID || cur.KeyID == old.KeyID || old.Active() || !cur.Active() {
		t.Fatalf("rotation: old %+v cur %+v", old, cur)
	}
	if old.NotAfterLogSize == nil || *old.NotAfterLogSize != 1 {
		t.Fatalf("retired key's log bound %v, want 1", old.NotAfterLogSize)
	}
	b := linkAction(a.Outputs[0])
	after, err := s.Link(ctx, b)
	if err != nil {
		t.Fatal(err)
	}
	if after.KeyID != cur.KeyID {
		t.Fatalf("signed after rotation with %s, want %s", after.KeyID, cur.KeyID)
	}

	// The retired key, stolen, signs another link after its retirement.
	oldSigner, err := keys.LoadPrivateKeyFile(filepath.Join(PathsFor(data).Keys, "executor-"+old.KeyID+".pem"))
	if err != nil {
		t.Fatal(err)
	}
	c := sampleAction()
	c.ActionDigest = blob("late action")
	c.Outputs = []File{file("out/late", "late")}
	p, _ := c.Payload()
	env, err := SignEnvelope(ctx, oldSigner, p)
	if err != nil {
		t.Fatal(err)
	}
	d, err := s.Store().PutEnvelope(ctx, env)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := s.log.Append(ctx, LinkLogEntry(d))
	if err != nil {
		t.Fatal(err)
	}
	s.Store().SetLogIndex(d, idx)
	s.Store().AddProduct(AlgSHA256, c.Outputs[0].Digest.Hash, d)
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}

	exp, err := s.Keyring().Export()
	if err != nil {
		t.Fatal(err)
	}
	jb, _ := json.Marshal(exp)
	trust, err := keys.ParseTrust(jb)
	if err != nil {
		t.Fatal(err)
	}
	lv, _ := trust.Log.Verifier()
	v, err := NewVerifier(ctx, NewStore(PathsFor(data), openCAS(t, data)), VerifierOptions{Trust: trust, LogVerifier: lv})
	if err != nil {
		t.Fatal(err)
	}
	ch, err := v.Chain(ctx, Subject{Name: "out/hello", SHA256: b.Outputs[0].Digest.Hash})
	if err != nil {
		t.Fatal(err)
	}
	if !ch.OK() || len(ch.Links) != 2 {
		t.Fatalf("chain across a rotation: %v (%d links)", ch.Failures, len(ch.Links))
	}
	keysUsed := map[string]bool{}
	for _, l := range ch.Links {
		keysUsed[l.KeyID] = true
	}
	if !keysUsed[old.KeyID] || !keysUsed[cur.KeyID] {
		t.Fatalf("links signed by %v", keysUsed)
	}
	ch, _ = v.Chain(ctx, Subject{Name: "out/late", SHA256: c.Outputs[0].Digest.Hash})
	wantFailure(t, ch, d.String(), "retired at log size 1, but logged at index ")

	// The old public key alone (PEM, no validity) still verifies the old link.
	pemOnly, err := keys.ParseTrust([]byte(old.PEM))
	if err != nil {
		t.Fatal(err)
	}
	v2, err := NewVerifier(ctx, NewStore(PathsFor(data), openCAS(t, data)), VerifierOptions{Trust: pemOnly, LogVerifier: lv})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v2.Link(ctx, before.Digest); err != nil {
		t.Fatalf("old link with the old PEM key: %v", err)
	}
	if _, err := v2.Link(ctx, after.Digest); err == nil {
		t.Fatal("the old key verified a link signed by the new key")
	}
}

func TestKeyringFilesAndPermissions(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "keys")
	kr, err := keys.Open(ctx, dir, keys.Options{})
	if err != nil {
		t.Fatal(err)
	}
	k, err := kr.Active()
	if err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(dir)
	if fi.Mode().Perm() != 0o700 {
		t.Errorf("keyring dir mode %04o", fi.Mode().Perm())
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		fi, _ := e.Info()
		if fi.Mode().Perm()&0o077 != 0 {
			t.Errorf("%s has mode %04o", e.Name(), fi.Mode().Perm())
		}
	}
	// Reopening finds the same key; a second process-like open too.
	kr2, err := keys.Open(ctx, dir, keys.Options{})
	if err != nil {
		t.Fatal(err)
	}
	k2, _ := kr2.Active()
	if k2.ID() != k.ID() {
		t.Fatal("reopening the keyring changed the active key")
	}
	// A rotation in one handle is seen by the other.
	if _, _, err := kr2.Rotate(ctx, ""); err != nil {
		t.Fatal(err)
	}
	k3, _ := kr.Active()
	if k3.ID() == k.ID() {
		t.Fatal("a rotation by another handle was not picked up")
	}
	// Group- or world-readable keyrings are refused.
	os.Chmod(dir, 0o755)
	if _, err := keys.Open(ctx, dir, keys.Options{}); err == nil || !strings.Contains(err.Error(), "must not be accessible") {
		t.Fatalf("open of a 0755 keyring: %v", err)
	}
	os.Chmod(dir, 0o700)
	os.Chmod(filepath.Join(dir, "log.key"), 0o644)
	if _, err := keys.LoadLogSigner(dir); err == nil {
		t.Fatal("read a world-readable log key")
	}
}

// TestOperatorKey: an operator-supplied PEM key becomes the active key (never copied
// into the keyring) and retires the generated one.
func TestOperatorKey(t *testing.T) {
	ctx := context.Background()
	data := t.TempDir()
	s := openSigner(t, data, Options{})
	first, err := s.Link(ctx, sampleAction())
	if err != nil {
		t.Fatal(err)
	}
	s.Close(ctx)

	priv := mustKey(t)
	der, _ := x509.MarshalPKCS8PrivateKey(priv)
	keyFile := filepath.Join(t.TempDir(), "operator.pem")
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
	s2 := openSigner(t, data, Options{ExecutorKeyFile: keyFile})
	r, err := s2.Link(ctx, linkAction(sampleAction().Outputs[0]))
	if err != nil {
		t.Fatal(err)
	}
	if r.KeyID != keys.NewSigner(priv).ID() || r.KeyID == first.KeyID {
		t.Fatalf("signed with %s", r.KeyID)
	}
	ks, _ := s2.Keyring().Keys()
	if len(ks) != 2 || ks[0].Active() || ks[0].NotAfterLogSize == nil || *ks[0].NotAfterLogSize != 1 || ks[1].Source != keys.SourceOperator {
		t.Fatalf("keyring after adopting the operator key: %+v", ks)
	}
	if _, err := os.Stat(filepath.Join(PathsFor(data).Keys, "executor-"+r.KeyID+".pem")); err == nil {
		t.Fatal("the operator's private key was copied into the keyring")
	}
	s2.Close(ctx)
	// Without the key file the operator key cannot sign, and says so.
	s3, err := Open(ctx, Options{DataDir: data, CAS: openCAS(t, data)})
	if err != nil {
		t.Fatal(err)
	}
	s3.Close(ctx)
	kr, _ := keys.Open(ctx, PathsFor(data).Keys, keys.Options{})
	if _, err := kr.Active(); err == nil || !strings.Contains(err.Error(), "operator-supplied") {
		t.Fatalf("active operator key without its file: %v", err)
	}
}
