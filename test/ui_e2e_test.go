package test

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bazelbuild/remote-apis-sdks/go/pkg/digest"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/uploadinfo"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/chromedp/chromedp"
	"github.com/kilnbuild/kiln/internal/testpki"
	"github.com/kilnbuild/kiln/test/harness"
	"google.golang.org/protobuf/proto"
)

// Hostile strings an action puts in its command line, output path and stdout: each
// would run script or break out of an attribute if the UI did not escape it.
const (
	xssArgv   = `<script>document.title="pwned-argv"</script>`
	xssPath   = `out/"'><img src=x id=pwned-path onerror=document.title='pwned-path'>.txt`
	xssStdout = `</pre><script>document.title="pwned-stdout"</script><img src=x id=pwned-stdout onerror=document.title='pwned-stdout'>`
)

// TestWebUI: after a real Bazel build through kiln, the web UI in headless Chromium
// shows the executions, finds an action by its output path, says its link verified,
// draws the artifact's provenance graph, shows a quarantined artifact as such, escapes
// hostile strings, and refuses a client without the read permission.
func TestWebUI(t *testing.T) {
	r := newRemoteBuild(t)
	out, err := r.build(t, "//...")
	if err != nil {
		t.Fatalf("build: %v\n%s\n%s", err, out, r.srv.Log())
	}
	p := harness.Processes(out)
	ran := p["total"] - p["internal"]
	hostile := runHostileAction(t, r)
	base := "http://" + r.srv.HTTP
	var shotNames []string
	b := harness.Browser(t)
	ctx, cancel := context.WithTimeout(b, 4*time.Minute)
	defer cancel()
	eval := func(expr string) string {
		t.Helper()
		s, err := chromedp.Run(ctx, chromedp.Evaluate[string](expr))
		if err != nil {
			t.Fatalf("evaluate %s: %v", expr, err)
		}
		return s
	}
	shots := os.Getenv("KILN_UI_SCREENSHOTS") // a directory: save a picture of each page
	visit := func(url string) {
		t.Helper()
		resp, err := chromedp.Run(ctx, chromedp.NavigateResponse(url))
		if err != nil {
			t.Fatalf("navigate %s: %v", url, err)
		}
		if resp.Status != 200 {
			t.Fatalf("%s: HTTP %d", url, resp.Status)
		}
		if shots != "" {
			png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
			if err == nil {
				name := strings.NewReplacer("/", "_", "?", "_", "&", "_").Replace(strings.TrimPrefix(url, base))
				os.WriteFile(filepath.Join(shots, fmt.Sprintf("%02d%s.png", len(shotNames), name[:min(len(name), 40)])), png, 0o644)
				shotNames = append(shotNames, name)
			}
		}
	}

	// Overview: the executions, once the log's links are indexed.
	deadline := time.Now().Add(30 * time.Second)
	for {
		visit(base + "/")
		n := eval(`document.querySelector("#executions").textContent`)
		if n == fmt.Sprint(ran+1) { // Bazel's actions and the hostile one
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("overview shows %s executions, want %d", n, ran+1)
		}
		time.Sleep(300 * time.Millisecond)
	}
	if n := eval(`String(document.querySelectorAll("svg.chart").length)`); n != "4" {
		t.Fatalf("overview has %s charts, want 4", n)
	}
	if s := eval(`document.querySelector("section.charts").textContent`); !strings.Contains(s, "sandbox") {
		t.Fatalf("time per phase shows no sandbox phase: %q", s)
	}

	// Search by output path through the form, then follow the result to its action.
	visit(base + "/actions")
	if err := chromedp.Do(ctx,
		chromedp.SendKeys(chromedp.CSS(`form.filters input[name="path"]`), "app/hello"),
		chromedp.Submit(chromedp.CSS(`form.filters input[name="path"]`)),
	); err != nil {
		t.Fatalf("search: %v", err)
	}
	// The form's navigation: wait until the results page has loaded (evaluations fail
	// while the old page goes away).
	for start := time.Now(); ; time.Sleep(100 * time.Millisecond) {
		ok, err := chromedp.Run(ctx, chromedp.Evaluate[bool](`location.search.includes("path=app%2Fhello") && document.readyState === "complete" && document.querySelector("table.runs") !== null`))
		if err == nil && ok {
			break
		}
		if time.Since(start) > 30*time.Second {
			t.Fatalf("search results did not load: %v", err)
		}
	}
	rows := eval(`Array.from(document.querySelectorAll("table.runs tr.run")).map(r => r.textContent).join("\n")`)
	if !strings.Contains(rows, "bazel-out/k8-fastbuild/bin/app/hello") {
		t.Fatalf("searching app/hello found:\n%s", rows)
	}
	href := eval(`Array.from(document.querySelectorAll("table.runs tr.run")).find(r => Array.from(r.querySelectorAll("code.path")).some(c => c.textContent == "bazel-out/k8-fastbuild/bin/app/hello")).querySelector("a.action").href`)
	visit(href)
	if v := eval(`document.querySelector("#link-verdict").textContent`); !strings.HasPrefix(v, "Link verified by the server") {
		t.Fatalf("action page of the link action: %q", v)
	}
	if o := eval(`document.querySelector("#outcome").textContent`); o != "ok" {
		t.Fatalf("outcome %q", o)
	}

	// The binary's artifact page: a provenance graph with its actions, sources and
	// toolchain, and the chain verified.
	hello, err := os.ReadFile(filepath.Join(r.bz.Workspace, "bazel-bin/app/hello"))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(hello)
	helloSHA := hex.EncodeToString(sum[:])
	visit(base + "/artifact/" + helloSHA)
	if v := eval(`document.querySelector("#chain-verdict").textContent`); !strings.Contains(v, "Provenance verified by the server") {
		t.Fatalf("artifact page: %q", v)
	}
	nodes := eval(`Array.from(document.querySelectorAll("svg.graph g.node")).map(g => g.dataset.kind + ":" + g.querySelector("title").textContent.split("\n")[0]).join("\n")`)
	for _, want := range []string{"subject:bazel-out/k8-fastbuild/bin/app/hello", "source:app/main.c", "source:lib/greet.c", "artifact:bazel-out/k8-fastbuild/bin/lib/_objs/greet/greet.pic.o", "artifact:bazel-out/k8-fastbuild/bin/app/_objs/hello/main.pic.o", "toolchain:toolchain sha256:"} {
		if !strings.Contains(nodes, want) {
			t.Errorf("graph lacks node %q; it has:\n%s", want, nodes)
		}
	}
	if n := eval(`String(document.querySelectorAll("svg.graph g.node.action").length)`); n == "0" || n == "1" || n == "2" {
		t.Errorf("graph has %s action nodes, want the compiles, the archive and the link", n)
	}
	if q := eval(`document.querySelector("#quarantine-state").textContent`); q != "not quarantined" {
		t.Fatalf("quarantine state %q", q)
	}

	// Quarantine it with the CLI: the page says so, and the download is refused.
	if res := harness.Run(t, "quarantine", "add", "sha256:"+helloSHA, "--reason", "ui e2e: <b>bad</b> build", "--data", r.srv.Data); res.Code != 0 {
		t.Fatalf("quarantine add: %s", res.Stderr)
	}
	visit(base + "/artifact/" + helloSHA)
	if q := eval(`document.querySelector("#quarantine-state").textContent`); !strings.HasPrefix(q, "QUARANTINED") || !strings.Contains(q, "ui e2e: <b>bad</b> build") {
		t.Fatalf("quarantine state %q", q)
	}
	if a := eval(`document.querySelector("table.audit").textContent`); !strings.Contains(a, "quarantine") {
		t.Fatalf("audit entries: %q", a)
	}
	resp, err := http.Get(fmt.Sprintf("%s/blob/%s/%d/hello", base, helloSHA, len(hello)))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("download of a quarantined artifact: HTTP %d", resp.StatusCode)
	}

	// Hostile strings show literally, and nothing they carry ran.
	visit(base + hostile.page)
	checks := map[string]string{
		`document.title`: "Action " + hostile.action.Hash[:12] + " · kiln",
		`String(document.querySelectorAll("script").length)`:                                                    "0",
		`String(document.querySelectorAll("#pwned-path, #pwned-stdout").length)`:                                "0",
		`String(document.querySelector("#argv").textContent.includes(` + jsString(xssArgv) + `))`:               "true",
		`String(document.querySelector("#outputs").textContent.includes(` + jsString(xssPath) + `))`:            "true",
		`String(document.querySelector("pre.output").textContent.includes(` + jsString(xssStdout) + `))`:        "true",
		`String(document.querySelector("#outcome").textContent)`:                                                "failed",
		`String(document.querySelector("#link-verdict").textContent.startsWith("Link verified by the server"))`: "true",
	}
	for expr, want := range checks {
		if got := eval(expr); got != want {
			t.Errorf("hostile action page: %s = %q, want %q", expr, got, want)
		}
	}
	// The download of the hostile output is an attachment the browser does not render.
	resp, err = http.Get(base + hostile.download)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/octet-stream" || resp.Header.Get("X-Content-Type-Options") != "nosniff" ||
		!strings.HasPrefix(resp.Header.Get("Content-Disposition"), "attachment") || string(body) != xssStdout+"\n" {
		t.Fatalf("download: %d %v %q", resp.StatusCode, resp.Header, body)
	}

	// Without the read permission: 403, and nothing of the store.
	checkUIRefusals(t, r, b, helloSHA)
}

func jsString(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch r {
		case '"', '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('"')
	return b.String()
}

type hostileRun struct {
	action   digest.Digest
	page     string // the action's page path
	download string // the stdout blob's download path
}

// runHostileAction executes an action with hostile strings in its argv, output path
// and stdout, which fails (exit 3): its sandbox report names its page.
func runHostileAction(t *testing.T, r *remoteBuild) hostileRun {
	t.Helper()
	c := sdkClient(t, r.srv.Addr)
	ctx := harness.Context(t, 2*time.Minute)
	script := `mkdir -p out && printf '%s\n' "$1" && printf '%s\n' "$1" > "$2"; exit 3`
	cmd := &repb.Command{
		Arguments:   []string{"/bin/sh", "-c", script, xssArgv, xssStdout, xssPath},
		OutputFiles: []string{xssPath},
		Platform:    &repb.Platform{Properties: []*repb.Platform_Property{{Name: "container-image", Value: r.image}}},
	}
	// $0 = xssArgv, $1 = xssStdout, $2 = xssPath
	root := &repb.Directory{}
	cb, _ := proto.Marshal(cmd)
	rb, _ := proto.Marshal(root)
	cd, rd := digest.NewFromBlob(cb), digest.NewFromBlob(rb)
	act := &repb.Action{CommandDigest: cd.ToProto(), InputRootDigest: rd.ToProto()}
	ab, _ := proto.Marshal(act)
	ad := digest.NewFromBlob(ab)
	if _, _, err := c.UploadIfMissing(ctx, uploadinfo.EntryFromBlob(cb), uploadinfo.EntryFromBlob(rb), uploadinfo.EntryFromBlob(ab)); err != nil {
		t.Fatal(err)
	}
	op, err := c.ExecuteAndWait(ctx, &repb.ExecuteRequest{ActionDigest: ad.ToProto()})
	if err != nil {
		t.Fatal(err)
	}
	resp := &repb.ExecuteResponse{}
	if err := op.GetResponse().UnmarshalTo(resp); err != nil {
		t.Fatal(err)
	}
	if resp.GetResult().GetExitCode() != 3 {
		t.Fatalf("hostile action: %v", resp)
	}
	page := fmt.Sprintf("/action/%s/%d", ad.Hash, ad.Size)
	url := "http://" + r.srv.HTTP + page
	if !strings.Contains(resp.GetMessage(), url) {
		t.Errorf("failed action's message %q does not name its page %s", resp.GetMessage(), url)
	}
	ld := resp.GetServerLogs()["kiln-sandbox"].GetDigest()
	report, _, err := c.ReadBlob(ctx, digest.Digest{Hash: ld.GetHash(), Size: ld.GetSizeBytes()})
	if err != nil || !strings.Contains(string(report), "page        "+url+"\n") {
		t.Fatalf("sandbox report (err %v) does not name the action's page %s:\n%s", err, url, report)
	}
	sd := resp.GetResult().GetStdoutDigest()
	return hostileRun{action: ad, page: page, download: fmt.Sprintf("/blob/%s/%d/stdout.txt", sd.GetHash(), sd.GetSizeBytes())}
}

// checkUIRefusals restarts the server under an authorization policy: in Chromium,
// with no client certificate, every page is 403 with nothing of the store; over
// mTLS, a client the policy grants read sees the pages, one it does not gets 403.
func checkUIRefusals(t *testing.T, r *remoteBuild, browser context.Context, helloSHA string) {
	t.Helper()
	ca := testpki.NewCA(t, "kiln-ui-ca")
	sCert, sKey := ca.Server(t, "127.0.0.1")
	policy := filepath.Join(t.TempDir(), "authz.json")
	os.WriteFile(policy, []byte(`{"rules": [{"subject": "viewer-*", "allow": ["read"]}, {"subject": "builder-*", "allow": ["execute"]}]}`), 0o644)
	tlsArgs := []string{"--no-execution", "--tls-cert", sCert, "--tls-key", sKey, "--tls-client-ca", ca.Cert, "--authz", policy}
	r.srv.Stop(t)
	r.srv.Restart(t, tlsArgs...)
	ctx, cancel := context.WithTimeout(browser, time.Minute)
	defer cancel()
	for _, p := range []string{"/", "/actions?path=hello", "/artifact/" + helloSHA} {
		resp, err := chromedp.Run(ctx, chromedp.NavigateResponse("http://"+r.srv.HTTP+p))
		if err != nil {
			t.Fatalf("navigate %s: %v", p, err)
		}
		text, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`document.body.textContent`))
		if resp.Status != 403 || strings.Contains(text, "hello") && !strings.Contains(text, "no verified client certificate") || strings.Contains(text, helloSHA[:12]) {
			t.Fatalf("%s without a certificate under --authz: HTTP %d %q", p, resp.Status, text)
		}
	}

	r.srv.Stop(t)
	r.srv.Restart(t, append(tlsArgs, "--http-tls")...)
	pool := x509.NewCertPool()
	caPEM, _ := os.ReadFile(ca.Cert)
	pool.AppendCertsFromPEM(caPEM)
	get := func(cn, p string) (int, string) {
		t.Helper()
		cert, key := ca.Client(t, cn)
		kp, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			t.Fatal(err)
		}
		hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{kp}}}}
		resp, err := hc.Get("https://" + r.srv.HTTP + p)
		if err != nil {
			t.Fatalf("%s GET %s: %v", cn, p, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("viewer-ann", "/artifact/"+helloSHA); code != 200 || !strings.Contains(body, "QUARANTINED") {
		t.Fatalf("reader: HTTP %d\n%s", code, body)
	}
	for _, p := range []string{"/", "/artifact/" + helloSHA, "/actions?path=hello", "/log"} {
		code, body := get("builder-bob", p)
		if code != 403 || !strings.Contains(body, `client "cert:builder-bob" may not read`) || strings.Contains(body, helloSHA[:12]) || strings.Contains(body, "<") {
			t.Fatalf("client without read, %s: HTTP %d %q", p, code, body)
		}
	}
}

// TestCLIErrorsLinkActionPage: kiln exec and kiln verify on the data dir of a kiln serve
// with a web UI name the failing action's page in their one-line error, and that page
// shows the action; once the server is killed (-9, its record left behind), they name none.
func TestCLIErrorsLinkActionPage(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	harness.RequireRoot(t)
	data := t.TempDir()
	image := harness.RecipeToolchain(t, data, "busybox")
	srv := harness.StartServer(t, "--data", data)
	base := "http://" + srv.HTTP
	pageOf := func(t *testing.T, stderr string) string {
		t.Helper()
		lines := strings.Split(strings.TrimSpace(stderr), "\n")
		last := lines[len(lines)-1]
		i := strings.Index(last, "the action's page: ")
		if !strings.HasPrefix(last, "kiln: ") || i < 0 {
			t.Fatalf("no page in the last line of stderr:\n%s", stderr)
		}
		u := last[i+len("the action's page: "):]
		if !strings.HasPrefix(u, base+"/action/") {
			t.Fatalf("page %q is not under %s/action/", u, base)
		}
		return u
	}
	r := harness.Run(t, "exec", "--data", data, "--toolchain", image, "--", "/bin/sh", "-c", "echo broken-step >&2; exit 3")
	if r.Code != 3 {
		t.Fatalf("exit %d, want the action's 3: %s", r.Code, r.Stderr)
	}
	page := pageOf(t, r.Stderr)
	if !strings.Contains(r.Stdout, "action sha256:"+strings.TrimPrefix(page, base+"/action/")[:64]) {
		t.Fatalf("the page %s is not the action kiln exec printed:\n%s", page, r.Stdout)
	}
	resp, err := http.Get(page)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), "broken-step") {
		t.Fatalf("GET %s: %d\n%s", page, resp.StatusCode, body)
	}
	r = harness.Run(t, "exec", "--data", data, "--toolchain", image, "--json", "--", "/bin/sh", "-c", "exit 4")
	if r.Code != 4 || !strings.Contains(r.Stdout, `"page": "`+base+"/action/") {
		t.Fatalf("--json has no page (exit %d):\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
	r = harness.Run(t, "verify", "--data", data, "--toolchain", image, "--output", "out.txt", "--", "/bin/sh", "-c", "cat /proc/sys/kernel/random/uuid > out.txt")
	if r.Code != 1 {
		t.Fatalf("verify of a random output exited %d: %s%s", r.Code, r.Stdout, r.Stderr)
	}
	pageOf(t, r.Stderr)
	// --public-url names what clients see (a proxy in front of the server).
	r = harness.Run(t, "exec", "--data", data, "--toolchain", image, "--public-url", "https://kiln.example.com/", "--", "/bin/sh", "-c", "exit 5")
	if r.Code != 5 || !strings.Contains(r.Stderr, "the action's page: https://kiln.example.com/action/") {
		t.Fatalf("--public-url: exit %d: %s", r.Code, r.Stderr)
	}
	srv.Kill()
	r = harness.Run(t, "exec", "--data", data, "--toolchain", image, "--", "/bin/sh", "-c", "exit 6")
	if r.Code != 6 || strings.Contains(r.Stderr, "page") {
		t.Fatalf("with no server running: exit %d: %s", r.Code, r.Stderr)
	}
}
