package gate

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	intoto "github.com/in-toto/attestation/go/v1"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/disk"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/engine/attest/tlog"
	"github.com/kilnbuild/kiln/engine/quarantine"
	"github.com/kilnbuild/kiln/engine/rebuild"
	"google.golang.org/protobuf/types/known/structpb"
)

func init() { tlog.RouteLibraryLogs(nil) }

func slogDiscard() *slog.Logger { return slog.New(slog.DiscardHandler) }

// toolchain is the toolchain digest every fixture action runs in.
var toolchain = cache.DigestOf([]byte("fixture toolchain manifest")).Hash

// fixture is a builder data dir with a chain of n actions (each consumes the previous
// one's product; the first reads a source and a file of external/zlib), signed with
// real keys and logged, its provenance, and two verifier data dirs' keys.
type fixture struct {
	data       string
	subject    attest.Subject
	provenance []byte
	builder    keys.Trust
	verifiers  []*keys.Signer
	trust      keys.Trust // builder and verifiers
}

func newFixture(t testing.TB, n int) *fixture {
	t.Helper()
	ctx := context.Background()
	f := &fixture{data: t.TempDir()}
	cas, err := disk.Open(ctx, attest.PathsFor(f.data).CAS, disk.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer cas.Close()
	s, err := attest.Open(ctx, attest.Options{DataDir: f.data, CAS: cas, Log: tlog.Options{CheckpointInterval: 100 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	prev := attest.File{Path: "src/words", Digest: cache.DigestOf([]byte("pear\napple\n"))}
	for i := 0; i < n; i++ {
		out := attest.File{Path: fmt.Sprintf("out/step%d", i), Digest: cache.DigestOf([]byte(fmt.Sprintf("product %d", i)))}
		inputs := []attest.File{prev}
		if i == 0 {
			inputs = append(inputs, attest.File{Path: "external/zlib/zlib.h", Digest: cache.DigestOf([]byte("zlib header"))})
		}
		a := attest.Action{
			ActionDigest:  cache.DigestOf([]byte(fmt.Sprintf("action %d", i))),
			CommandDigest: cache.DigestOf([]byte(fmt.Sprintf("command %d", i))),
			Toolchain:     "sha256:" + toolchain,
			Inputs:        inputs,
			Outputs:       []attest.File{out},
			Argv:          []string{"step", fmt.Sprint(i)},
			Stdout:        cache.EmptyDigest,
			Stderr:        cache.EmptyDigest,
			KilnVersion:   "test",
		}
		if _, err := s.Link(ctx, a); err != nil {
			t.Fatal(err)
		}
		prev = out
	}
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	f.subject = attest.Subject{Name: "final", SHA256: prev.Digest.Hash}
	kr, err := keys.Open(ctx, attest.PathsFor(f.data).Keys, keys.Options{})
	if err != nil {
		t.Fatal(err)
	}
	cas2, _ := disk.Open(ctx, attest.PathsFor(f.data).CAS, disk.Options{})
	defer cas2.Close()
	if _, f.provenance, _, err = attest.BuildProvenance(ctx, attest.NewStore(attest.PathsFor(f.data), cas2), kr, f.subject, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	f.builder = exportTrust(t, kr)
	f.trust = f.builder
	for range 2 {
		vk, err := keys.Open(ctx, filepath.Join(t.TempDir(), "keys"), keys.Options{})
		if err != nil {
			t.Fatal(err)
		}
		sk, err := vk.Active()
		if err != nil {
			t.Fatal(err)
		}
		f.verifiers = append(f.verifiers, sk)
		f.trust.Add(keys.Trust{Keys: exportTrust(t, vk).Keys})
	}
	return f
}

func exportTrust(t testing.TB, kr *keys.Keyring) keys.Trust {
	t.Helper()
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

// vsa signs a SLSA verification summary about the fixture's subject and provenance, as
// kiln rebuild writes it.
func (f *fixture) vsa(t testing.TB, by *keys.Signer, result string) []byte {
	t.Helper()
	sum := cache.DigestOf(f.provenance).Hash
	pred, err := structpb.NewStruct(map[string]any{
		"verifier":           map[string]any{"id": rebuild.VerifierID},
		"timeVerified":       time.Now().UTC().Format(time.RFC3339Nano),
		"resourceUri":        f.subject.Name,
		"policy":             map[string]any{"uri": rebuild.PolicyURI},
		"inputAttestations":  []any{map[string]any{"uri": "provenance.json", "digest": map[string]any{"sha256": sum}}},
		"verificationResult": result,
		"verifiedLevels":     []any{},
		"slsaVersion":        "1.0",
	})
	if err != nil {
		t.Fatal(err)
	}
	st := &intoto.Statement{Type: intoto.StatementTypeUri, PredicateType: rebuild.VSAType, Predicate: pred,
		Subject: []*intoto.ResourceDescriptor{{Name: f.subject.Name, Digest: map[string]string{"sha256": f.subject.SHA256}}}}
	env, err := attest.SignStatement(context.Background(), by, st)
	if err != nil {
		t.Fatal(err)
	}
	return env
}

// policy is the shipped production policy with the fixture's toolchain allowed.
func policy(t testing.TB, edit func(string) string) *Policy {
	t.Helper()
	b, err := os.ReadFile("../../examples/gate/production.yaml")
	if err != nil {
		t.Fatal(err)
	}
	s := strings.Replace(string(b), "  toolchains: []", `  toolchains: ["`+toolchain+`"]`, 1)
	if edit != nil {
		s = edit(s)
	}
	p, err := ParsePolicy("production.yaml", []byte(s))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func (f *fixture) gate(t testing.TB, p *Policy, trust keys.Trust, q *quarantine.List) *Gate {
	t.Helper()
	cas, err := disk.Open(context.Background(), attest.PathsFor(f.data).CAS, disk.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cas.Close() })
	now := time.Now() // one clock reading: equal requests give equal decisions, ages included
	g, err := New(Options{Policy: p, Trust: trust, Store: attest.NewStore(attest.PathsFor(f.data), cas), Quarantine: q, Version: "test",
		Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	return g
}

func (f *fixture) request(vsas ...[]byte) Request {
	req := Request{Stage: "production", Subject: f.subject, Provenance: &Doc{Name: "provenance.json", Data: f.provenance},
		Lockfile: &Doc{Name: "kiln.lock", Data: []byte(`{"version": 1, "toolchains": {}, "dependencies": {"zlib": {"urls": ["https://zlib.example/zlib.tar.gz"], "sha256": "` + cache.DigestOf([]byte("zlib")).Hash + `"}}}`)}}
	for i, v := range vsas {
		req.VSAs = append(req.VSAs, Doc{Name: fmt.Sprintf("vsa-%d.json", i), Data: v})
	}
	return req
}

func rules(vs []Violation) string {
	var rs []string
	for _, v := range vs {
		rs = append(rs, v.Rule)
	}
	return strings.Join(rs, ",")
}

// TestDecide: the allow path, and denials each for one reason, decided the same way
// through Decide and through the HTTP handler (JSON in and out).
func TestDecide(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, 3)
	pass1, pass2 := f.vsa(t, f.verifiers[0], "PASSED"), f.vsa(t, f.verifiers[1], "PASSED")
	builderKey, err := keys.LoadPrivateKeyFile(filepath.Join(attest.PathsFor(f.data).Keys, "executor-"+f.builder.Keys[0].KeyID+".pem"))
	if err != nil {
		t.Fatal(err)
	}
	tampered := bytes.Replace(pass2, []byte(`"payload":"`), []byte(`"payload":"e`), 1)
	q, err := quarantine.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name  string
		req   Request
		trust keys.Trust
		edit  func(string) string
		q     bool
		want  string // failed rules, in policy order; "" allows
	}{
		{name: "allow", req: f.request(pass1, pass2)},
		{name: "one VSA where two are required", req: f.request(pass1), want: "independent-rebuilds"},
		{name: "two VSAs by one key", req: f.request(pass1, f.vsa(t, f.verifiers[0], "PASSED")), want: "independent-rebuilds"},
		{name: "a VSA signed by the builder", req: f.request(pass1, f.vsa(t, builderKey, "PASSED")), want: "vsa-not-by-builder,independent-rebuilds"},
		{name: "a FAILED rebuild", req: f.request(pass1, pass2, f.vsa(t, f.verifiers[1], "FAILED")), want: "vsa-not-failed"},
		{name: "a tampered VSA", req: f.request(pass1, tampered), want: "vsa-verified,independent-rebuilds"},
		{name: "untrusted builder key", req: f.request(pass1, pass2), trust: keys.Trust{Keys: f.trust.Keys[1:], Log: f.trust.Log},
			want: "provenance-verified,chain-verified"},
		{name: "toolchain off the allowlist", req: f.request(pass1, pass2), edit: func(s string) string {
			return strings.Replace(s, toolchain, strings.Repeat("0", 64), 1)
		}, want: "toolchain-allowed"},
		{name: "unpinned dependency", req: func() Request { r := f.request(pass1, pass2); r.Lockfile = nil; return r }(), want: "dependency-pinned"},
		{name: "quarantined", req: f.request(pass1, pass2), q: true, want: "not-quarantined"},
		{name: "provenance too old", req: f.request(pass1, pass2), edit: func(s string) string {
			return strings.Replace(s, "max_provenance_age_seconds: 2592000", "max_provenance_age_seconds: -1", 1)
		}, want: "provenance-fresh"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			trust := tc.trust
			if trust.Keys == nil {
				trust = f.trust
			}
			var ql *quarantine.List
			if tc.q {
				ql = q
				if _, err := q.Add("sha256:"+f.subject.SHA256, "final", "test", "test"); err != nil {
					t.Fatal(err)
				}
				defer q.Release("sha256:"+f.subject.SHA256, "test over", "test")
			}
			g := f.gate(t, policy(t, func(s string) string {
				s = noSBOM(s)
				if tc.edit != nil {
					s = tc.edit(s)
				}
				return s
			}), trust, ql)
			d, err := g.Decide(ctx, tc.req)
			if err != nil {
				t.Fatal(err)
			}
			if got := rules(d.Violations); got != tc.want || d.Allow != (tc.want == "") {
				t.Fatalf("allow %v, violations %s; want %q\n%+v", d.Allow, got, tc.want, d.Violations)
			}
			// The same request over HTTP: the same decision.
			srv := httptest.NewServer(g.Handler(slogDiscard()))
			defer srv.Close()
			hr := HTTPRequest{Subject: "sha256:" + tc.req.Subject.SHA256, SubjectName: tc.req.Subject.Name, Stage: tc.req.Stage,
				Provenance: &HTTPDoc{Name: tc.req.Provenance.Name, Data: tc.req.Provenance.Data}}
			if l := tc.req.Lockfile; l != nil {
				hr.Lockfile = &HTTPDoc{Name: l.Name, Data: l.Data}
			}
			for _, v := range tc.req.VSAs {
				hr.VSAs = append(hr.VSAs, HTTPDoc(v))
			}
			body, _ := json.Marshal(hr)
			resp, err := http.Post(srv.URL+"/v1/decide", "application/json", bytes.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var got struct {
				Allow      bool        `json:"allow"`
				Violations []Violation `json:"violations"`
			}
			if err := json.NewDecoder(resp.Body).Decode(&got); err != nil || resp.StatusCode != 200 {
				t.Fatalf("HTTP %d: %v", resp.StatusCode, err)
			}
			if got.Allow != d.Allow || fmt.Sprint(got.Violations) != fmt.Sprint(d.Violations) {
				t.Fatalf("HTTP decided %v %v; Decide %v %v", got.Allow, got.Violations, d.Allow, d.Violations)
			}
		})
	}
}

// TestHTTPRefusals: what the gate cannot decide is 400 with a reason, never a decision.
func TestHTTPRefusals(t *testing.T) {
	f := newFixture(t, 1)
	srv := httptest.NewServer(f.gate(t, policy(t, nil), f.trust, nil).Handler(slogDiscard()))
	defer srv.Close()
	sha := "sha256:" + f.subject.SHA256
	for _, c := range []struct{ name, body, want string }{
		{"not JSON", `{"subject":`, "request:"},
		{"unknown field", `{"subject": "` + sha + `", "keys": ["attacker"]}`, `unknown field "keys"`},
		{"a path, not a digest", `{"subject": "/etc/passwd"}`, "neither a file nor a sha256 digest"},
		{"another stage", `{"subject": "` + sha + `", "stage": "staging"}`, `is for stage "production", not "staging"`},
		{"malformed lockfile", `{"subject": "` + sha + `", "lockfile": {"name": "kiln.lock", "data": "e30="}}`, "lockfile:"},
	} {
		resp, err := http.Post(srv.URL+"/v1/decide", "application/json", strings.NewReader(c.body))
		if err != nil {
			t.Fatal(err)
		}
		var e HTTPError
		json.NewDecoder(resp.Body).Decode(&e)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(e.Error, c.want) {
			t.Errorf("%s: HTTP %d %q; want 400 containing %q", c.name, resp.StatusCode, e.Error, c.want)
		}
	}
	resp, err := http.Get(srv.URL + "/healthz")
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("healthz: %v", err)
	}
	resp.Body.Close()
}
