package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/in-toto/in-toto-golang/in_toto"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/disk"
	"github.com/kilnbuild/kiln/engine/attest"
)

// runKiln runs the kiln command line in-process and returns stdout, stderr and the exit
// code main would use.
func runKiln(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	root := newRootCmd()
	var out, errb bytes.Buffer
	root.SetArgs(args)
	root.SetOut(&out)
	root.SetErr(&errb)
	err := root.ExecuteContext(context.Background())
	code := 0
	if err != nil {
		var ee *exitError
		if errors.As(err, &ee) {
			code = ee.code
			errb.WriteString("kiln: " + ee.msg + "\n")
		} else {
			code = 2
			errb.WriteString("kiln: " + err.Error() + "\n")
		}
	}
	return out.String(), errb.String(), code
}

// buildWithLinks attests a two-action build (compile then link) in a fresh data dir, as
// the engine would, and writes the final binary to a file. It returns the data dir and
// the binary's path.
func buildWithLinks(t *testing.T) (string, string) {
	t.Helper()
	ctx := context.Background()
	data := t.TempDir()
	cas, err := disk.Open(ctx, attest.PathsFor(data).CAS, disk.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer cas.Close()
	s, err := attest.Open(ctx, attest.Options{DataDir: data, CAS: cas})
	if err != nil {
		t.Fatal(err)
	}
	d := func(s string) cache.Digest { return cache.DigestOf([]byte(s)) }
	tc := "sha256:" + d("debian-gcc manifest").Hash
	obj := attest.File{Path: "bazel-out/k8-fastbuild/bin/_objs/hello/hello.o", Digest: d("hello.o")}
	binContent := "ELF hello binary"
	compile := attest.Action{
		ActionDigest: d("compile"), CommandDigest: d("compile cmd"), Toolchain: tc,
		Inputs:  []attest.File{{Path: "main/hello.c", Digest: d("int main(){}")}, {Path: "main/hello.h", Digest: d("#pragma once")}},
		Outputs: []attest.File{obj},
		Argv:    []string{"/usr/bin/gcc", "-c", "main/hello.c", "-o", obj.Path},
		Stdout:  cache.EmptyDigest, Stderr: cache.EmptyDigest, KilnVersion: "test",
	}
	link := attest.Action{
		ActionDigest: d("link"), CommandDigest: d("link cmd"), Toolchain: tc,
		Inputs:  []attest.File{obj},
		Outputs: []attest.File{{Path: "bazel-out/k8-fastbuild/bin/main/hello", Digest: d(binContent)}},
		Argv:    []string{"/usr/bin/gcc", "-o", "bazel-out/k8-fastbuild/bin/main/hello", obj.Path},
		Stdout:  cache.EmptyDigest, Stderr: cache.EmptyDigest, KilnVersion: "test",
	}
	for _, a := range []attest.Action{compile, link} {
		if _, err := s.Link(ctx, a); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "hello")
	os.WriteFile(bin, []byte(binContent), 0o755)
	return data, bin
}

func TestAttestCommands(t *testing.T) {
	data, bin := buildWithLinks(t)
	work := t.TempDir()

	out, errs, code := runKiln(t, "attest", "pubkey", "--data", data)
	if code != 0 || !strings.Contains(out, "BEGIN PUBLIC KEY") || !strings.Contains(out, "# keyid ") {
		t.Fatalf("pubkey: %d %q %q", code, out, errs)
	}
	pubPEM := filepath.Join(work, "executor.pub")
	os.WriteFile(pubPEM, []byte(out[strings.Index(out, "-----BEGIN"):]), 0o644)
	out, _, _ = runKiln(t, "attest", "pubkey", "--all", "--json", "--data", data)
	exportFile := filepath.Join(work, "keys.json")
	os.WriteFile(exportFile, []byte(out), 0o644)
	var exp struct {
		Active string                `json:"active_keyid"`
		Log    struct{ VKey string } `json:"log"`
	}
	if err := json.Unmarshal([]byte(out), &exp); err != nil || exp.Active == "" || exp.Log.VKey == "" {
		t.Fatalf("pubkey --json: %v %q", err, out)
	}

	prov, sbom := filepath.Join(work, "hello.intoto.json"), filepath.Join(work, "hello.cdx.json")
	out, errs, code = runKiln(t, "attest", "provenance", "--subject", bin, "--out", prov, "--sbom", sbom, "--data", data)
	if code != 0 || !strings.Contains(out, "2 link(s), 2 source(s), 1 toolchain(s)") {
		t.Fatalf("provenance: %d %q %q", code, out, errs)
	}

	// Verify with the PEM key, with the JSON export, with provenance and SBOM.
	for _, args := range [][]string{
		{"--key", pubPEM},
		{"--key", exportFile, "--provenance", prov, "--sbom", sbom},
	} {
		out, errs, code = runKiln(t, append([]string{"attest", "verify", "--subject", bin, "--data", data}, args...)...)
		if code != 0 || !strings.HasPrefix(out, "OK ") {
			t.Fatalf("verify %v: %d %q %q", args, code, out, errs)
		}
	}

	// A layout (steps named by action digest) checked by in-toto's InTotoVerify.
	layout, layoutKey := writeLayout(t, work, exp.Active, exportFile)
	out, errs, code = runKiln(t, "attest", "verify", "--subject", bin, "--key", pubPEM, "--layout", layout, "--layout-key", layoutKey, "--data", data, "--json")
	if code != 0 || !strings.Contains(out, `"ok": true`) {
		t.Fatalf("verify --layout: %d %q %q", code, out, errs)
	}

	// Failures: a tampered subject, an untrusted key; each exits 1 and names the problem.
	os.WriteFile(bin, []byte("EVIL"), 0o755)
	out, errs, code = runKiln(t, "attest", "verify", "--subject", bin, "--key", pubPEM, "--data", data)
	if code != 1 || !strings.Contains(out, "no verified link produced it") || strings.Count(errs, "\n") != 1 {
		t.Fatalf("tampered subject: %d %q %q", code, out, errs)
	}
	other := filepath.Join(work, "other.pub")
	pk, _, _ := ed25519.GenerateKey(rand.Reader)
	der, _ := x509.MarshalPKIXPublicKey(pk)
	os.WriteFile(other, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o644)
	out, _, code = runKiln(t, "attest", "verify", "--subject", "sha256:"+cache.DigestOf([]byte("ELF hello binary")).Hash, "--key", other, "--data", data)
	if code != 1 || !strings.Contains(out, "no valid signature by a trusted key") {
		t.Fatalf("untrusted key: %d %q", code, out)
	}
	if _, errs, code = runKiln(t, "attest", "verify", "--subject", bin, "--data", data); code != 2 {
		t.Fatalf("verify without --key: %d %q", code, errs)
	}
}

func mustRead(t *testing.T, p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// writeLayout writes a layout signed by a fresh owner key whose one step is the link
// action (named by its action digest hash), produced by the executor key.
func writeLayout(t *testing.T, dir, execKeyID, exportFile string) (layoutPath, ownerPubPath string) {
	t.Helper()
	var exp struct {
		Keys []struct {
			KeyID string `json:"keyid"`
			PEM   string `json:"public_key_pem"`
		} `json:"keys"`
	}
	json.Unmarshal([]byte(mustRead(t, exportFile)), &exp)
	execPub := filepath.Join(dir, "exec-for-layout.pub")
	os.WriteFile(execPub, []byte(exp.Keys[0].PEM), 0o644)
	var execKey in_toto.Key
	if err := execKey.LoadKeyDefaults(execPub); err != nil {
		t.Fatal(err)
	}
	pk, sk, _ := ed25519.GenerateKey(rand.Reader)
	skDer, _ := x509.MarshalPKCS8PrivateKey(sk)
	pkDer, _ := x509.MarshalPKIXPublicKey(pk)
	ownerPriv, ownerPubPath := filepath.Join(dir, "owner"), filepath.Join(dir, "owner.pub")
	os.WriteFile(ownerPriv, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: skDer}), 0o600)
	os.WriteFile(ownerPubPath, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pkDer}), 0o644)
	var owner in_toto.Key
	if err := owner.LoadKeyDefaults(ownerPriv); err != nil {
		t.Fatal(err)
	}
	linkName := cache.DigestOf([]byte("link")).Hash
	compileName := cache.DigestOf([]byte("compile")).Hash
	step := func(name string, products [][]string) in_toto.Step {
		return in_toto.Step{Type: "step", PubKeys: []string{execKey.KeyID}, Threshold: 1,
			SupplyChainItem: in_toto.SupplyChainItem{Name: name, ExpectedMaterials: [][]string{{"ALLOW", "*"}}, ExpectedProducts: products}}
	}
	mb := in_toto.Metablock{Signed: in_toto.Layout{
		Type:    "layout",
		Expires: time.Now().Add(time.Hour).UTC().Format("2006-01-02T15:04:05Z"),
		Keys:    map[string]in_toto.Key{execKey.KeyID: execKey},
		Steps: []in_toto.Step{
			step(compileName, [][]string{{"CREATE", "bazel-out/*.o"}, {"DISALLOW", "*"}}),
			step(linkName, [][]string{{"CREATE", "bazel-out/k8-fastbuild/bin/main/hello"}, {"DISALLOW", "*"}}),
		},
		Inspect: []in_toto.Inspection{},
	}}
	if err := mb.Sign(owner); err != nil {
		t.Fatal(err)
	}
	layoutPath = filepath.Join(dir, "root.layout")
	if err := mb.Dump(layoutPath); err != nil {
		t.Fatal(err)
	}
	if execKey.KeyID != execKeyID {
		t.Fatalf("in-toto key id %s, kiln's %s", execKey.KeyID, execKeyID)
	}
	return layoutPath, ownerPubPath
}

func TestLogCommands(t *testing.T) {
	data, _ := buildWithLinks(t)
	out, errs, code := runKiln(t, "log", "checkpoint", "--data", data)
	if code != 0 || !strings.HasPrefix(out, "kiln-log/") || !strings.Contains(out, "\n2\n") {
		t.Fatalf("checkpoint: %d %q %q", code, out, errs)
	}
	oldCP := filepath.Join(t.TempDir(), "cp")
	os.WriteFile(oldCP, []byte(out), 0o644)

	// The envelope digests are in the attest index; take one from the log itself.
	out, _, _ = runKiln(t, "log", "checkpoint", "--data", data, "--json")
	var cp struct{ Size uint64 }
	json.Unmarshal([]byte(out), &cp)
	env := firstEnvelope(t, data)
	out, errs, code = runKiln(t, "log", "prove", env.String(), "--data", data, "--json")
	if code != 0 || !strings.Contains(out, `"verified": true`) {
		t.Fatalf("prove: %d %q %q", code, out, errs)
	}
	out, errs, code = runKiln(t, "log", "prove", env.Hash, "--data", data)
	if code != 0 || !strings.Contains(out, "(verified)") {
		t.Fatalf("prove by hash: %d %q %q", code, out, errs)
	}
	if _, errs, code = runKiln(t, "log", "prove", strings.Repeat("ab", 32), "--data", data); code != 1 || !strings.Contains(errs, "not in the log") {
		t.Fatalf("prove of an unknown digest: %d %q", code, errs)
	}
	out, errs, code = runKiln(t, "log", "consistency", "--from", "1", "--data", data)
	if code != 0 || !strings.Contains(out, "tree 1") || !strings.Contains(out, "verified") {
		t.Fatalf("consistency: %d %q %q", code, out, errs)
	}
	out, errs, code = runKiln(t, "log", "consistency", "--old", oldCP, "--data", data, "--json")
	if code != 0 || !strings.Contains(out, `"verified": true`) {
		t.Fatalf("consistency --old: %d %q %q", code, out, errs)
	}
	if _, _, code = runKiln(t, "log", "consistency", "--from", "5", "--data", data); code != 2 {
		t.Fatalf("consistency beyond the log: exit %d", code)
	}
}

func firstEnvelope(t *testing.T, data string) cache.Digest {
	t.Helper()
	var found cache.Digest
	filepath.WalkDir(filepath.Join(attest.PathsFor(data).Attest, "envelopes"), func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && !strings.HasPrefix(d.Name(), ".") {
			b, _ := os.ReadFile(p)
			found = cache.DigestOf(b)
			return filepath.SkipAll
		}
		return nil
	})
	if found.Hash == "" {
		t.Fatal("no envelope stored")
	}
	return found
}

func TestAttestKeyRotate(t *testing.T) {
	data, bin := buildWithLinks(t)
	out, errs, code := runKiln(t, "attest", "key", "rotate", "--data", data, "--json")
	if code != 0 || !strings.Contains(out, `"not_after_log_size": 2`) {
		t.Fatalf("rotate: %d %q %q", code, out, errs)
	}
	out, _, _ = runKiln(t, "attest", "pubkey", "--all", "--json", "--data", data)
	f := filepath.Join(t.TempDir(), "keys.json")
	os.WriteFile(f, []byte(out), 0o644)
	if strings.Count(out, `"keyid"`) != 2 {
		t.Fatalf("pubkey --all after rotation: %q", out)
	}
	out, errs, code = runKiln(t, "attest", "verify", "--subject", bin, "--key", f, "--data", data)
	if code != 0 {
		t.Fatalf("verify after rotation: %d %q %q", code, out, errs)
	}
}
