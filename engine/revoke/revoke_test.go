package revoke

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/engine/audit"
	"github.com/kilnbuild/kiln/engine/quarantine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestRevokeIdentity: a revocation written by one List (kiln revoke) is seen at the next
// check by another on the same data dir (a running kiln serve), matches by pattern,
// and is lifted by undo; bad patterns, missing reasons and duplicates are refused; an
// unreadable list refuses everyone.
func TestRevokeIdentity(t *testing.T) {
	data := t.TempDir()
	server, cli := Open(data), Open(data)
	const (
		app     = "oidc:https://token.actions.example#repo:acme/app:ref:refs/heads/main"
		appPR   = "oidc:https://token.actions.example#repo:acme/app:pull_request"
		release = "oidc:https://token.actions.example#repo:acme/release:ref:refs/heads/main"
		svid    = "spiffe://example.org/ci/runner-7"
	)
	for _, id := range []string{app, appPR, release, svid, "cert:ci-runner"} {
		if err := server.CheckIdentity(id); err != nil {
			t.Fatalf("%s before any revocation: %v", id, err)
		}
	}
	e, err := cli.RevokeIdentity("oidc:https://token.actions.example#repo:acme/app:*", "runner compromised", "kiln revoke")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.RevokeIdentity(svid, "lost", "kiln revoke"); err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string]bool{app: true, appPR: true, release: false, svid: true, "spiffe://example.org/ci/runner-77": false, "cert:ci-runner": false} {
		err := server.CheckIdentity(id)
		if got := err != nil; got != want {
			t.Errorf("%s: revoked=%v (%v), want %v", id, got, err, want)
		}
		if err != nil && (status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "runner compromised") && !strings.Contains(err.Error(), "lost")) {
			t.Errorf("%s: %v, want UNAUTHENTICATED with the reason", id, err)
		}
	}
	if _, err := cli.RevokeIdentity(e.Identity, "again", "kiln revoke"); status.Code(err) != codes.AlreadyExists {
		t.Errorf("revoking twice: %v, want ALREADY_EXISTS", err)
	}
	for name, pat := range map[string]string{"bare name": "ci-runner", "star": "*", "empty": ""} {
		if _, err := cli.RevokeIdentity(pat, "x", "kiln revoke"); status.Code(err) != codes.InvalidArgument {
			t.Errorf("pattern %s: %v, want INVALID_ARGUMENT", name, err)
		}
	}
	if _, err := cli.RevokeIdentity("cert:x", " ", "kiln revoke"); status.Code(err) != codes.InvalidArgument {
		t.Errorf("no reason: %v, want INVALID_ARGUMENT", err)
	}
	if _, _, err := cli.Undo(e.ID, "rotated the runner", "kiln revoke undo", nil); err != nil {
		t.Fatal(err)
	}
	if err := server.CheckIdentity(app); err != nil {
		t.Fatalf("after undo: %v", err)
	}
	if err := server.CheckIdentity(svid); err == nil {
		t.Fatal("undoing one revocation lifted another")
	}
	if _, _, err := cli.Undo(svid, "found", "kiln revoke undo", nil); err != nil {
		t.Fatalf("undo by pattern: %v", err)
	}
	if _, _, err := cli.Undo("rv-00000000", "x", "kiln revoke undo", nil); status.Code(err) != codes.NotFound {
		t.Errorf("undo of an unknown revocation: %v, want NOT_FOUND", err)
	}
	rs, err := audit.Open(data).Records(audit.EventRevoke, audit.EventUnrevoke)
	if err != nil || len(rs) != 4 || rs[0].Identity != e.Identity || rs[2].Event != audit.EventUnrevoke || rs[2].Reason != "rotated the runner" {
		t.Fatalf("audit log: %+v %v", rs, err)
	}
	// A list someone broke by hand refuses everyone rather than no one.
	os.WriteFile(server.Path(), []byte("{not json"), 0o644)
	if err := server.CheckIdentity(release); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("unreadable list: %v, want UNAUTHENTICATED", err)
	}
	if _, err := cli.RevokeIdentity("cert:x", "x", "kiln revoke"); status.Code(err) != codes.DataLoss {
		t.Fatalf("revoking into an unreadable list: %v, want DATA_LOSS", err)
	}
}

func file(path, content string) attest.File {
	return attest.File{Path: path, Digest: cache.DigestOf([]byte(content))}
}

func action(name string, outs ...attest.File) attest.Action {
	return attest.Action{
		ActionDigest: cache.DigestOf([]byte("action " + name)), CommandDigest: cache.DigestOf([]byte("command " + name)),
		Inputs: []attest.File{file("src/"+name+".c", "source of "+name)}, Outputs: outs,
		Argv: []string{"cc", name}, Stdout: cache.EmptyDigest, Stderr: cache.EmptyDigest, KilnVersion: "test",
	}
}

// TestRevokeKey: revoking an executor key quarantines exactly the artifacts of links it
// signed since the given time: not those of the next key, not those of a link forged
// to name it, not older ones, not the empty file; it stops the key from signing; undo
// releases what it quarantined and only that.
func TestRevokeKey(t *testing.T) {
	ctx := context.Background()
	data := t.TempDir()
	cas := cache.NewMemoryStore()
	s, err := attest.Open(ctx, attest.Options{DataDir: data, CAS: cas, SyncLog: true})
	if err != nil {
		t.Fatal(err)
	}
	q, err := quarantine.Open(data)
	if err != nil {
		t.Fatal(err)
	}
	// Key 1 signs an old link, then three more; then the key is rotated and key 2 signs.
	old, err := s.Link(ctx, action("old", file("out/old", "old artifact")))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Flush(ctx); err != nil { // the envelope is in the durable store
		t.Fatal(err)
	}
	hour := time.Now().Add(-2 * time.Hour)
	if err := os.Chtimes(filepath.Join(data, "attest", "envelopes", old.Digest.Hash[:2], old.Digest.Hash), hour, hour); err != nil {
		t.Fatal(err) // the store's layout changed: signing times are read from these files
	}
	k1 := old.KeyID
	for _, a := range []attest.Action{
		action("a", file("out/a", "artifact a"), file("out/empty", "")),
		action("b", file("out/b", "artifact b"), attest.File{Path: "out/link", SymlinkTarget: "b"}),
		action("pre", file("out/pre", "quarantined before")),
	} {
		if l, err := s.Link(ctx, a); err != nil || l.KeyID != k1 {
			t.Fatalf("link %v by %s: %v", a.Argv, l.KeyID, err)
		}
	}
	if _, err := q.Add("sha256:"+cache.DigestOf([]byte("quarantined before")).Hash, "out/pre", "a failed rebuild", "kiln rebuild"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Keyring().Rotate(ctx, ""); err != nil {
		t.Fatal(err)
	}
	l2, err := s.Link(ctx, action("c", file("out/c", "artifact c")))
	if err != nil || l2.KeyID == k1 {
		t.Fatalf("link after rotation: %v %v", l2.KeyID, err)
	}
	// An envelope that names key 1 but is signed by another key, in the store.
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	p, _ := action("forged", file("out/forged", "forged artifact")).Payload()
	env, err := attest.SignEnvelope(ctx, keys.NewSigner(priv), p)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	json.Unmarshal(env, &m)
	m["signatures"].([]any)[0].(map[string]any)["keyid"] = k1
	env, _ = json.Marshal(m)
	if _, err := s.Store().PutEnvelope(ctx, env); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}

	ks, err := s.Keyring().Keys()
	if err != nil {
		t.Fatal(err)
	}
	key, err := ResolveKey(ks, k1[:12])
	if err != nil || key.KeyID != k1 {
		t.Fatalf("resolve a key id prefix: %v %v", key.KeyID, err)
	}
	if _, err := ResolveKey(ks, "0000000000"); status.Code(err) != codes.NotFound {
		t.Fatalf("unknown key: %v", err)
	}
	l := Open(data)
	res, err := l.RevokeKey(ctx, key, time.Now().Add(-time.Hour), "key leaked", "kiln revoke", q)
	if err != nil {
		t.Fatal(err)
	}
	sha := func(s string) string { return "sha256:" + cache.DigestOf([]byte(s)).Hash }
	want := []string{sha("artifact a"), sha("artifact b")}
	slices.Sort(want)
	if !slices.Equal(res.Quarantined, want) || res.Links != 3 || !slices.Equal(res.AlreadyQuarantined, []string{sha("quarantined before")}) {
		t.Fatalf("revocation: quarantined %v (want %v), already %v, links %d (want 3)", res.Quarantined, want, res.AlreadyQuarantined, res.Links)
	}
	for content, wantQ := range map[string]bool{"artifact a": true, "artifact b": true, "quarantined before": true,
		"old artifact": false, "artifact c": false, "forged artifact": false, "": false} {
		if got := q.Quarantined(cache.DigestOf([]byte(content)).Hash); got != wantQ {
			t.Errorf("%q: quarantined=%v, want %v", content, got, wantQ)
		}
	}
	if err := l.CheckKey(k1); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("revoked key may sign: %v", err)
	}
	if err := l.CheckKey(l2.KeyID); err != nil {
		t.Errorf("the current key: %v", err)
	}
	// Running it again (an interrupted revocation) finds nothing new and keeps the list.
	again, err := l.RevokeKey(ctx, key, time.Now().Add(-time.Hour), "key leaked", "kiln revoke", q)
	if err != nil || len(again.Quarantined) != 0 || !slices.Equal(again.Entry.Quarantined, want) || again.Entry.ID != res.Entry.ID {
		t.Fatalf("revoking again: %+v %v", again, err)
	}

	e, released, err := l.Undo(res.Entry.ID, "false alarm", "kiln revoke undo", q)
	if err != nil || e.Key != k1 || !slices.Equal(released, want) {
		t.Fatalf("undo: %+v released %v %v", e, released, err)
	}
	if q.Quarantined(cache.DigestOf([]byte("artifact a")).Hash) || !q.Quarantined(cache.DigestOf([]byte("quarantined before")).Hash) {
		t.Fatal("undo released the wrong artifacts")
	}
	if err := l.CheckKey(k1); err != nil {
		t.Fatalf("after undo: %v", err)
	}
	rs, _ := audit.Open(data).Records()
	var events []string
	for _, r := range rs {
		events = append(events, r.Event)
	}
	if got := strings.Join(events, " "); got != "quarantine revoke quarantine quarantine release release unrevoke" {
		t.Fatalf("audit events: %s", got)
	}
}
