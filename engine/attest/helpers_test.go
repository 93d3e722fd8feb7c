package attest

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"os"
	"path/filepath"
	"testing"

	"github.com/in-toto/in-toto-golang/in_toto"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/disk"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/engine/attest/tlog"
	"github.com/secure-systems-lab/go-securesystemslib/dsse"
)

// blob returns the digest of some content, as if the engine had stored it.
func blob(s string) cache.Digest { return cache.DigestOf([]byte(s)) }

func file(path, content string) File { return File{Path: path, Digest: blob(content)} }

// sampleAction is a compile-like action: two sources and a header in, an object out,
// a multi-line shell script in argv.
func sampleAction() Action {
	return Action{
		ActionDigest:  blob("action: compile hello"),
		CommandDigest: blob("command: cc -c hello.c"),
		Toolchain:     "sha256:" + blob("debian-gcc manifest").Hash,
		Inputs: []File{
			file("src/hello.c", "int main(){return 0;}\n"),
			file("src/hello.h", "#pragma once\n"),
			{Path: "src/link.h", SymlinkTarget: "hello.h"},
		},
		Outputs:      []File{file("out/hello.o", "ELF hello.o")},
		Argv:         []string{"/bin/sh", "-c", "cc -c src/hello.c -o out/hello.o\necho \"done\" <&>"},
		ExitCode:     0,
		Stdout:       blob("done\n"),
		Stderr:       cache.EmptyDigest,
		PolicyDigest: blob("policy: seccomp default, no network"),
		Platform:     []Property{{"container-image", "docker://debian-gcc@sha256:" + blob("debian-gcc manifest").Hash}, {"OSFamily", "linux"}},
		KilnVersion:  "0.1.0-test",
	}
}

// linkAction is an action that consumes obj (produced by sampleAction) and produces bin.
func linkAction(obj File) Action {
	return Action{
		ActionDigest:  blob("action: link hello"),
		CommandDigest: blob("command: cc -o hello"),
		Toolchain:     "sha256:" + blob("debian-gcc manifest").Hash,
		Inputs:        []File{obj},
		Outputs:       []File{file("out/hello", "ELF hello executable")},
		Argv:          []string{"cc", "-o", "out/hello", "out/hello.o"},
		Stdout:        cache.EmptyDigest,
		Stderr:        cache.EmptyDigest,
		KilnVersion:   "0.1.0-test",
	}
}

func openCAS(t testing.TB, dataDir string) *disk.Store {
	t.Helper()
	cas, err := disk.Open(context.Background(), PathsFor(dataDir).CAS, disk.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cas.Close() })
	return cas
}

func openSigner(t testing.TB, dataDir string, opts Options) *Signer {
	t.Helper()
	opts.DataDir = dataDir
	if opts.CAS == nil {
		opts.CAS = openCAS(t, dataDir)
	}
	if opts.Log.CheckpointInterval == 0 {
		opts.Log.CheckpointInterval = 100 * 1e6 // 100ms: tests wait for checkpoints on Close
	}
	s, err := Open(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			s.Close(context.Background())
		}
	})
	return s
}

func init() { tlog.RouteLibraryLogs(nil) }

// payloadOf decodes an envelope's payload without verifying it.
func payloadOf(t testing.TB, env []byte) []byte {
	t.Helper()
	e, err := ParseEnvelope(env)
	if err != nil {
		t.Fatal(err)
	}
	p, err := base64.StdEncoding.DecodeString(e.Payload)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// ownerKey makes an in-toto layout owner key pair with in-toto-golang's own loader.
func ownerKey(t testing.TB) (priv, pub in_toto.Key) {
	t.Helper()
	pk, sk, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	der, _ := x509.MarshalPKCS8PrivateKey(sk)
	pubDer, _ := x509.MarshalPKIXPublicKey(pk)
	os.WriteFile(filepath.Join(dir, "owner"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
	os.WriteFile(filepath.Join(dir, "owner.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDer}), 0o600)
	if err := priv.LoadKeyDefaults(filepath.Join(dir, "owner")); err != nil {
		t.Fatal(err)
	}
	if err := pub.LoadKeyDefaults(filepath.Join(dir, "owner.pub")); err != nil {
		t.Fatal(err)
	}
	return priv, pub
}

// resign replaces env's payload and signs it with key (an attacker's re-signing, or a
// tamper without re-signing when key is nil).
func resign(t testing.TB, env []byte, payload []byte, s dsse.Signer) []byte {
	t.Helper()
	e, err := ParseEnvelope(env)
	if err != nil {
		t.Fatal(err)
	}
	if s == nil {
		e.Payload = base64.StdEncoding.EncodeToString(payload)
		b, err := json.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	es, err := dsse.NewEnvelopeSigner(s)
	if err != nil {
		t.Fatal(err)
	}
	ne, err := es.SignPayload(context.Background(), PayloadType, payload)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(ne)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustKey(t testing.TB) ed25519.PrivateKey {
	t.Helper()
	_, k, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func openCASForHelper(dataDir string) *disk.Store {
	cas, err := disk.Open(context.Background(), PathsFor(dataDir).CAS, disk.Options{})
	if err != nil {
		panic(err)
	}
	return cas
}

// activeTrust trusts every key of a data dir's keyring, and its log key.
func activeTrust(t testing.TB, data string) keys.Trust {
	t.Helper()
	kr, err := keys.Open(context.Background(), PathsFor(data).Keys, keys.Options{})
	if err != nil {
		t.Fatal(err)
	}
	exp, err := kr.Export()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(exp)
	tr, err := keys.ParseTrust(b)
	if err != nil {
		t.Fatal(err)
	}
	return tr
}
