package test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/internal/testpki"
	"github.com/kilnbuild/kiln/test/harness"
)

// gateEnv is a busybox-built chain (step 1 sorts a source and reads a file of an
// external repository, step 2 transforms its output into the subject) with everything a
// promotion gate looks at: provenance and SBOM, the builder's keys, a bundle, summaries
// of rebuilds by two verifiers (and a second one by the first, and one by the builder),
// a lockfile and the production policy allowing the busybox toolchain.
type gateEnv struct {
	dir                              string
	data, bb, subject                string
	prov, sbom, bundle, lock, policy string
	builderKeys, v1Keys, v2Keys      string
	vsa1, vsa2, vsa1b, vsaBuilder    string
	logAfterStep1                    string
	step2Out                         string
}

func writeFile(t *testing.T, path, content string) string {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func mustRun(t *testing.T, args ...string) harness.Result {
	t.Helper()
	r := harness.Run(t, args...)
	if r.Code != 0 {
		t.Fatalf("kiln %s: exit %d\n%s%s", strings.Join(args, " "), r.Code, r.Stdout, r.Stderr)
	}
	return r
}

func pubkeys(t *testing.T, data, out string) string {
	t.Helper()
	return writeFile(t, out, mustRun(t, "attest", "pubkey", "--data", data, "--all", "--json").Stdout)
}

func newGateEnv(t *testing.T) *gateEnv {
	t.Helper()
	if testing.Short() {
		t.Skip("e2e")
	}
	e := &gateEnv{dir: t.TempDir(), data: t.TempDir()}
	e.bb = harness.RecipeToolchain(t, e.data, "busybox")
	src := t.TempDir()
	os.MkdirAll(filepath.Join(src, "external", "zlib"), 0o755)
	writeFile(t, filepath.Join(src, "words"), "pear\napple\nfig\n")
	writeFile(t, filepath.Join(src, "external", "zlib", "zlib.h"), "#define ZLIB_VERSION \"1.3.1\"\n")
	out1 := filepath.Join(e.dir, "step1")
	kilnExec(t, e.data, e.bb, src, out1, "gen.txt", "cat external/zlib/zlib.h > /dev/null && sort words > gen.txt")
	e.logAfterStep1 = filepath.Join(e.dir, "log-after-step1")
	if err := harness.CopyTree(filepath.Join(e.data, "log"), e.logAfterStep1); err != nil {
		t.Fatal(err)
	}
	e.step2Out = filepath.Join(e.dir, "step2")
	kilnExec(t, e.data, e.bb, out1, e.step2Out, "final.txt", "tr a-z A-Z < gen.txt > final.txt")
	e.subject = filepath.Join(e.step2Out, "final.txt")
	e.prov, e.sbom = filepath.Join(e.dir, "final.intoto.json"), filepath.Join(e.dir, "final.cdx.json")
	mustRun(t, "attest", "provenance", "--data", e.data, "--subject", e.subject, "--out", e.prov, "--sbom", e.sbom)
	e.builderKeys = pubkeys(t, e.data, filepath.Join(e.dir, "builder-keys.json"))
	e.bundle = filepath.Join(e.dir, "bundle")
	mustRun(t, "export", "--data", e.data, "--subject", e.subject, "--out", e.bundle)

	v1, v2 := t.TempDir(), t.TempDir()
	rebuildTo := func(data, out string, bundle bool) string {
		args := []string{"rebuild", e.prov, "--key", e.builderKeys, "--data", data, "--out", out}
		if bundle {
			args = append(args, "--bundle", e.bundle)
		}
		mustRun(t, args...)
		return out
	}
	e.vsa1 = rebuildTo(v1, filepath.Join(e.dir, "v1.vsa.json"), true)
	e.vsa2 = rebuildTo(v2, filepath.Join(e.dir, "v2.vsa.json"), true)
	e.vsa1b = rebuildTo(v1, filepath.Join(e.dir, "v1-again.vsa.json"), true)
	e.vsaBuilder = rebuildTo(e.data, filepath.Join(e.dir, "builder.vsa.json"), false)
	e.v1Keys = pubkeys(t, v1, filepath.Join(e.dir, "v1-keys.json"))
	e.v2Keys = pubkeys(t, v2, filepath.Join(e.dir, "v2-keys.json"))

	e.lock = writeFile(t, filepath.Join(e.dir, "kiln.lock"), `{"version": 1, "toolchains": {"busybox": {"digest": "`+e.bb+`"}},
  "dependencies": {"zlib": {"urls": ["https://zlib.net/zlib-1.3.1.tar.gz"], "sha256": "9a93b2b7dfdac77ceba5a558a580e74667dd6fede4585b91eefb60f03b72df23"}}}`)
	e.policy = e.policyWith(t, "production.yaml", nil)
	return e
}

// policyWith writes the shipped production policy with the busybox toolchain allowed,
// edited by edit.
func (e *gateEnv) policyWith(t *testing.T, name string, edit func(string) string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(harness.RepoRoot(), "examples", "gate", "production.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	s := strings.Replace(string(b), "  toolchains: []", `  toolchains: ["`+strings.TrimPrefix(e.bb, "sha256:")+`"]`, 1)
	if edit != nil {
		s = edit(s)
	}
	return writeFile(t, filepath.Join(e.dir, name), s)
}

// gateCase is one question to the gate: the server-side set-up (policy, trust, where
// links and the quarantine list are) and the request's documents.
type gateCase struct {
	name     string
	server   []string // --policy, --keys, --log-key, --data, --bundle
	subject  string
	prov     string
	sbom     string
	lock     string
	vsas     []string
	wantCode int
	want     []string // rules that must fail (the decision lists them all)
}

func (c gateCase) cliArgs() []string {
	args := append([]string{"gate", "--stage", "production", "--json", "--subject", c.subject}, c.server...)
	for _, p := range []struct{ flag, v string }{{"--provenance", c.prov}, {"--sbom", c.sbom}, {"--lockfile", c.lock}} {
		if p.v != "" {
			args = append(args, p.flag, p.v)
		}
	}
	for _, v := range c.vsas {
		args = append(args, "--vsa", v)
	}
	return args
}

type gateDecision struct {
	Allow      bool `json:"allow"`
	Violations []struct {
		Rule        string `json:"rule"`
		Attestation string `json:"attestation"`
		Reason      string `json:"reason"`
	} `json:"violations"`
}

func (d gateDecision) rules() []string {
	var rs []string
	for _, v := range d.Violations {
		rs = append(rs, v.Rule)
	}
	return rs
}

// TestGate: the production policy allows the fully attested artifact, and denies each
// defect on its own with the rule, the attestation and the reason; kiln gate serve
// answers every case exactly as the CLI does.
func TestGate(t *testing.T) {
	e := newGateEnv(t)
	trusted := []string{"--keys", e.builderKeys, "--keys", e.v1Keys, "--keys", e.v2Keys}
	onData := append([]string{"--policy", e.policy, "--data", e.data}, trusted...)
	base := gateCase{server: onData, subject: e.subject, prov: e.prov, sbom: e.sbom, lock: e.lock, vsas: []string{e.vsa1, e.vsa2}}
	with := func(name string, want []string, edit func(*gateCase)) gateCase {
		c := base
		c.name, c.want, c.wantCode = name, want, 1
		c.vsas = append([]string(nil), base.vsas...)
		c.server = append([]string(nil), base.server...)
		if edit != nil {
			edit(&c)
		}
		return c
	}

	// An unrelated executor's keys instead of the builder's (the log key stays trusted).
	other := t.TempDir()
	mustRun(t, "attest", "pubkey", "--data", other)
	otherKeys := pubkeys(t, other, filepath.Join(e.dir, "other-keys.json"))
	var bk struct {
		Log struct {
			VKey string `json:"vkey"`
		} `json:"log"`
	}
	b, _ := os.ReadFile(e.builderKeys)
	json.Unmarshal(b, &bk)

	// A copy of the builder's data dir keeps signing with the key the builder retired.
	stolen, rotated := filepath.Join(e.dir, "stolen"), filepath.Join(e.dir, "rotated")
	for _, d := range []string{stolen, rotated} {
		if out, err := exec.Command("cp", "-a", e.data, d).CombinedOutput(); err != nil { // keeps the keyring's modes
			t.Fatalf("cp: %v %s", err, out)
		}
	}
	mustRun(t, "attest", "key", "rotate", "--data", rotated)
	time.Sleep(1100 * time.Millisecond) // validity is recorded to the second: sign in a later one
	rotatedKeys := pubkeys(t, rotated, filepath.Join(e.dir, "rotated-keys.json"))
	step3 := filepath.Join(e.dir, "step3")
	kilnExec(t, stolen, e.bb, e.step2Out, step3, "final3.txt", "cat final.txt final.txt > final3.txt")
	prov3, sbom3 := filepath.Join(e.dir, "final3.intoto.json"), filepath.Join(e.dir, "final3.cdx.json")
	mustRun(t, "attest", "provenance", "--data", stolen, "--subject", filepath.Join(step3, "final3.txt"), "--out", prov3, "--sbom", sbom3)

	// The bundle with the log as it was before step 2's link was appended.
	oldLog := filepath.Join(e.dir, "bundle-old-log")
	if err := harness.CopyTree(e.bundle, oldLog); err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(filepath.Join(oldLog, "log"))
	if err := harness.CopyTree(e.logAfterStep1, filepath.Join(oldLog, "log")); err != nil {
		t.Fatal(err)
	}

	quarantined := t.TempDir()
	mustRun(t, "quarantine", "add", "--data", quarantined, "sha256:"+fileSHA256(t, e.subject), "--reason", "test: suspected")

	tampered := filepath.Join(e.dir, "v2-tampered.vsa.json")
	vb, _ := os.ReadFile(e.vsa2)
	writeFile(t, tampered, string(flipInPayload(vb)))
	emptyLock := writeFile(t, filepath.Join(e.dir, "empty.lock"), `{"version": 1, "toolchains": {}, "dependencies": {}}`)

	cases := []gateCase{
		{name: "allow", server: base.server, subject: base.subject, prov: base.prov, sbom: base.sbom, lock: base.lock, vsas: base.vsas},
		with("untrusted key", []string{"provenance-verified", "chain-verified"}, func(c *gateCase) {
			c.server = []string{"--policy", e.policy, "--data", e.data, "--keys", otherKeys, "--keys", e.v1Keys, "--keys", e.v2Keys, "--log-key", bk.Log.VKey}
		}),
		// (No rebuild can vouch for this one: its links do not verify.)
		with("key expired at signing time", []string{"provenance-key-valid", "chain-verified", "link-key-valid", "independent-rebuilds"}, func(c *gateCase) {
			c.server = []string{"--policy", e.policy, "--data", stolen, "--keys", rotatedKeys, "--keys", e.v1Keys, "--keys", e.v2Keys}
			c.subject, c.prov, c.sbom, c.vsas = filepath.Join(step3, "final3.txt"), prov3, sbom3, nil
		}),
		with("link missing from the log", []string{"chain-verified", "link-logged"}, func(c *gateCase) {
			c.server = append(c.server, "--bundle", oldLog)
		}),
		with("unpinned dependency", []string{"dependency-pinned"}, func(c *gateCase) { c.lock = emptyLock }),
		with("toolchain off the allowlist", []string{"toolchain-allowed"}, func(c *gateCase) {
			c.server[1] = e.policyWith(t, "other-toolchain.yaml", func(s string) string {
				return strings.Replace(s, strings.TrimPrefix(e.bb, "sha256:"), strings.Repeat("0", 64), 1)
			})
		}),
		with("one VSA where two are required", []string{"independent-rebuilds"}, func(c *gateCase) { c.vsas = []string{e.vsa1} }),
		with("two VSAs by one key", []string{"independent-rebuilds"}, func(c *gateCase) { c.vsas = []string{e.vsa1, e.vsa1b} }),
		with("a VSA signed by the builder", []string{"vsa-not-by-builder", "independent-rebuilds"}, func(c *gateCase) { c.vsas = []string{e.vsa1, e.vsaBuilder} }),
		with("quarantined subject", []string{"not-quarantined"}, func(c *gateCase) {
			c.server = append([]string{"--policy", e.policy, "--data", quarantined, "--bundle", e.bundle}, trusted...)
		}),
		with("provenance too old", []string{"provenance-fresh"}, func(c *gateCase) {
			c.server[1] = e.policyWith(t, "one-second.yaml", func(s string) string {
				return strings.Replace(s, "max_provenance_age_seconds: 2592000", "max_provenance_age_seconds: 1", 1)
			})
		}),
		with("tampered VSA", []string{"vsa-verified", "independent-rebuilds"}, func(c *gateCase) { c.vsas = []string{e.vsa1, tampered} }),
	}
	time.Sleep(time.Until(fileTime(t, e.prov).Add(2 * time.Second))) // "too old" is > 1 s
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := harness.Run(t, c.cliArgs()...)
			if r.Code != c.wantCode {
				t.Fatalf("exit %d, want %d\n%s%s", r.Code, c.wantCode, r.Stdout, r.Stderr)
			}
			var d gateDecision
			if err := json.Unmarshal([]byte(r.Stdout), &d); err != nil {
				t.Fatalf("--json: %v\n%s", err, r.Stdout)
			}
			got := d.rules()
			for _, w := range c.want {
				if !contains(got, w) {
					t.Errorf("rule %s did not fail; violations %+v", w, d.Violations)
				}
			}
			if c.wantCode == 1 {
				if len(got) != len(c.want) {
					t.Errorf("violations %v, want exactly %v: %+v", got, c.want, d.Violations)
				}
				for _, v := range d.Violations {
					if v.Reason == "" || v.Rule == "" {
						t.Errorf("violation without rule or reason: %+v", v)
					}
				}
			}
			// The same question over HTTP.
			srv := startGateServer(t, c.server...)
			hd := srv.decide(t, c)
			// (Ages in reasons move on between the two asks: numbers are not compared.)
			if hd.Allow != d.Allow || digits.ReplaceAllString(fmt.Sprint(hd.Violations), "N") != digits.ReplaceAllString(fmt.Sprint(d.Violations), "N") {
				t.Errorf("HTTP: allow %v %+v\nCLI: allow %v %+v", hd.Allow, hd.Violations, d.Allow, d.Violations)
			}
			// Asked again, the server answers from its verification cache: the same.
			if hd2 := srv.decide(t, c); hd2.Allow != hd.Allow || digits.ReplaceAllString(fmt.Sprint(hd2.Violations), "N") != digits.ReplaceAllString(fmt.Sprint(hd.Violations), "N") {
				t.Errorf("HTTP, asked again: allow %v %+v\nfirst: allow %v %+v", hd2.Allow, hd2.Violations, hd.Allow, hd.Violations)
			}
		})
	}

	// The decision is signed with the data dir's key and names what it considered.
	t.Run("signed decision", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "decision.json")
		mustRun(t, append(base.cliArgs(), "--out", out)...)
		gk := pubkeys(t, e.data, filepath.Join(t.TempDir(), "gate-keys.json"))
		r := harness.Run(t, "attest", "verify-summary", out, "--key", gk)
		if r.Code == 0 || !strings.Contains(r.Stderr, "predicate type") {
			t.Fatalf("a decision passed as a summary: %s%s", r.Stdout, r.Stderr)
		}
		b, _ := os.ReadFile(out)
		if !bytes.Contains(b, []byte(`"payloadType":"application/vnd.in-toto+json"`)) {
			t.Fatalf("decision is not a DSSE envelope: %s", b)
		}
	})
}

// TestGateMalformedPolicy: a policy that does not parse or compile exits 2 naming the
// file and line; so does one that reads a field the input does not have.
func TestGateMalformedPolicy(t *testing.T) {
	dir := t.TempDir()
	cases := []struct{ name, policy, want string }{
		{"yaml", "stage: production\nrules:\n  - name: a\n    require: [\n", "bad.yaml:4"},
		{"cel syntax", "stage: production\nrules:\n  - name: a\n    require: input.provenance.verified &&\n", "bad.yaml:4:"},
		{"cel in a block", "stage: production\nrules:\n  - name: a\n    require: >-\n      input.provenance.verified &&\n      input.chain.verified ++ 1\n", "bad.yaml:6:"},
		{"unknown field", "stage: production\nrules:\n  - name: a\n    require: input.provenance.verifed\n", "bad.yaml:3"},
		{"unknown key", "stage: production\nrules:\n  - name: a\n    requires: 'true'\n", "bad.yaml:4:5"},
		{"not bool", "stage: production\nrules:\n  - name: a\n    require: '1 + 2'\n", "bad.yaml:4:"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := writeFile(t, filepath.Join(dir, "bad.yaml"), c.policy)
			r := harness.Run(t, "gate", "--policy", p, "--keys", p, "--subject", "sha256:"+strings.Repeat("a", 64), "--data", t.TempDir())
			if r.Code != 2 || !strings.Contains(r.Stderr, c.want) || strings.Count(strings.TrimSpace(r.Stderr), "\n") != 0 {
				t.Fatalf("exit %d, stderr %q; want exit 2 naming %s on one line", r.Code, r.Stderr, c.want)
			}
		})
	}
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

func fileTime(t *testing.T, p string) time.Time {
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.ModTime()
}

// gateServer is a running `kiln gate serve`.
type gateServer struct{ addr string }

var digits = regexp.MustCompile(`[0-9]+`)

var gateAddrRe = regexp.MustCompile(`msg="kiln gate serving" addr=(\S+)`)

func startGateServer(t *testing.T, args ...string) *gateServer {
	t.Helper()
	cmd := exec.Command(harness.KilnBin(t), append([]string{"gate", "serve", "--listen", "127.0.0.1:0"}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			t.Errorf("kiln gate serve did not stop on SIGTERM")
		}
	})
	ready := make(chan string, 1)
	var log strings.Builder
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			log.WriteString(sc.Text() + "\n")
			if m := gateAddrRe.FindStringSubmatch(sc.Text()); m != nil {
				ready <- m[1]
			}
		}
	}()
	select {
	case a := <-ready:
		return &gateServer{addr: a}
	case <-exited:
		t.Fatalf("kiln gate serve exited before serving")
	case <-time.After(30 * time.Second):
		t.Fatalf("kiln gate serve did not start")
	}
	return nil
}

func (s *gateServer) decide(t *testing.T, c gateCase) gateDecision {
	t.Helper()
	doc := func(p string) map[string]any {
		if p == "" {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return map[string]any{"name": filepath.Base(p), "data": b}
	}
	req := map[string]any{"subject": "sha256:" + fileSHA256(t, c.subject), "subject_name": c.subject, "stage": "production"}
	for k, p := range map[string]string{"provenance": c.prov, "sbom": c.sbom, "lockfile": c.lock} {
		if d := doc(p); d != nil {
			req[k] = d
		}
	}
	var vsas []any
	for _, v := range c.vsas {
		vsas = append(vsas, doc(v))
	}
	req["vsas"] = vsas
	body, _ := json.Marshal(req)
	resp, err := http.Post("http://"+s.addr+"/v1/decide", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var d gateDecision
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("HTTP %d", resp.StatusCode)
	}
	if err := json.NewDecoder(resp.Body).Decode(&d); err != nil {
		t.Fatal(err)
	}
	return d
}

// TestGateServeMTLS: kiln gate serve with a client CA answers only clients holding a
// certificate that CA signed, over TLS; others fail the handshake.
func TestGateServeMTLS(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	data := t.TempDir()
	keys := pubkeys(t, data, filepath.Join(t.TempDir(), "keys.json"))
	ca, other := testpki.NewCA(t, "gate-ca"), testpki.NewCA(t, "other-ca")
	cert, key := ca.Server(t, "gate")
	srv := startGateServer(t, "--policy", filepath.Join(harness.RepoRoot(), "examples", "gate", "staging.yaml"), "--keys", keys,
		"--data", data, "--tls-cert", cert, "--tls-key", key, "--tls-client-ca", ca.Cert)
	client := func(c *testpki.CA, name string) *http.Client {
		pool := x509.NewCertPool()
		pem, _ := os.ReadFile(ca.Cert)
		pool.AppendCertsFromPEM(pem)
		cfg := &tls.Config{RootCAs: pool}
		if c != nil {
			cc, ck := c.Client(t, name)
			pair, err := tls.LoadX509KeyPair(cc, ck)
			if err != nil {
				t.Fatal(err)
			}
			cfg.Certificates = []tls.Certificate{pair}
		}
		return &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}, Timeout: 10 * time.Second}
	}
	body := `{"subject": "sha256:` + strings.Repeat("a", 64) + `", "stage": "staging"}`
	for _, c := range []struct {
		name   string
		client *http.Client
		ok     bool
	}{
		{"no client certificate", client(nil, ""), false},
		{"certificate from another CA", client(other, "intruder"), false},
		{"certificate from the client CA", client(ca, "deployer"), true},
	} {
		resp, err := c.client.Post("https://"+srv.addr+"/v1/decide", "application/json", strings.NewReader(body))
		if !c.ok {
			if err == nil {
				resp.Body.Close()
				t.Errorf("%s: answered %d", c.name, resp.StatusCode)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		var d gateDecision
		json.NewDecoder(resp.Body).Decode(&d)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || d.Allow || !contains(d.rules(), "provenance-verified") {
			t.Fatalf("%s: HTTP %d, decision %+v", c.name, resp.StatusCode, d)
		}
	}
	if resp, err := http.Get("http://" + srv.addr + "/healthz"); err == nil && resp.StatusCode == http.StatusOK {
		t.Fatal("plain HTTP answered on the TLS listener")
	}
}
