package ui

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest/keys"
)

func TestPagesAndHeaders(t *testing.T) {
	f := newFixture(t, 30)
	a := f.actions[9]
	pages := map[string]string{
		"/":                               "executions",
		"/actions":                        "cc -c src/28.c",
		"/actions?path=7.o":               "out/7.o",
		"/actions?client=ci-1&outcome=ok": "ci-1",
		"/actions?outcome=failures":       "failed",
		ActionPath(a):                     "Link verified by the server",
		ActionPath(a) + "/tree/out":       "8.o",
		ArtifactPath(f.apps[9]):           "Provenance verified by the server",
		"/toolchains":                     "No toolchain imported",
		"/quarantine":                     "Nothing is quarantined",
		"/log":                            "Latest checkpoint (signature verified)",
	}
	for url, want := range pages {
		res, body := f.get(t, url)
		if res.StatusCode != 200 || !strings.Contains(body, want) {
			t.Errorf("%s: HTTP %d, want %q in:\n%s", url, res.StatusCode, want, body)
		}
		if csp := res.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'none'") || strings.Contains(csp, "script-src") {
			t.Errorf("%s: CSP %q", url, csp)
		}
		if res.Header.Get("X-Content-Type-Options") != "nosniff" || res.Header.Get("Content-Type") != "text/html; charset=utf-8" {
			t.Errorf("%s: headers %v", url, res.Header)
		}
		if strings.Contains(body, "<script") {
			t.Errorf("%s: the page has a script element", url)
		}
	}
	for url, code := range map[string]int{
		"/action/zz/1": 400,
		ActionPath(cache.DigestOf([]byte("never"))): 404,
		"/actions?outcome=bogus":                    400,
		"/artifact/123":                             400,
		ActionPath(a) + "/tree/nosuch":              200, // says so on the page
	} {
		if res, body := f.get(t, url); res.StatusCode != code {
			t.Errorf("%s: HTTP %d, want %d\n%s", url, res.StatusCode, code, body)
		}
	}
	rec := httptest.NewRecorder()
	f.ui.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/actions", strings.NewReader("x")))
	if rec.Code != http.StatusMethodNotAllowed {
		t.Errorf("POST: HTTP %d, want 405 (read-only)", rec.Code)
	}
}

// TestHostileStringsEscaped: argv, output path and stdout with markup show as text.
func TestHostileStringsEscaped(t *testing.T) {
	f := newFixture(t, 10)
	for _, url := range []string{ActionPath(f.actions[0]), "/actions", "/actions?path=out", ArtifactPath(f.apps[9])} {
		_, body := f.get(t, url)
		for _, bad := range []string{"<script", "<img", `"'>`} {
			if strings.Contains(body, bad) {
				t.Errorf("%s: unescaped %q in the page", url, bad)
			}
		}
	}
	_, body := f.get(t, ActionPath(f.actions[0]))
	for _, want := range []string{"&lt;script&gt;alert(&#34;argv&#34;)&lt;/script&gt;", "&lt;/pre&gt;&lt;script&gt;alert(&#39;stdout&#39;)&lt;/script&gt;", "out/&#34;&#39;&gt;&lt;img src=x onerror=alert(1)&gt;.o"} {
		if !strings.Contains(body, want) {
			t.Errorf("action page lacks the escaped text %q", want)
		}
	}
}

// TestDownloads: blobs are attachments of type application/octet-stream with
// nosniff, whatever they hold; a quarantined artifact is not handed out.
func TestDownloads(t *testing.T) {
	f := newFixture(t, 10)
	d := cache.DigestOf([]byte(hostileStdout + "\n"))
	res, body := f.get(t, fmt.Sprintf("/blob/%s/%d/%s", d.Hash, d.Size, `a"b<c>.html`))
	if res.StatusCode != 200 || body != hostileStdout+"\n" || res.Header.Get("Content-Type") != "application/octet-stream" ||
		res.Header.Get("X-Content-Type-Options") != "nosniff" || res.Header.Get("Content-Disposition") != `attachment; filename="a_b<c>.html"` {
		t.Fatalf("download: %d %v %q", res.StatusCode, res.Header, body)
	}
	// The action page's output links download (the file name is the path's last element).
	_, page := f.get(t, ActionPath(f.actions[3]))
	od := cache.Digest{Hash: f.objects[3], Size: int64(len("object 3"))}
	if link := fmt.Sprintf(`href="/blob/%s/%d/3.o"`, od.Hash, od.Size); !strings.Contains(page, link) {
		t.Fatalf("action page lacks the download %s", link)
	}
	if res, body := f.get(t, fmt.Sprintf("/blob/%s/%d/3.o", od.Hash, od.Size)); res.StatusCode != 200 || body != "object 3" {
		t.Fatalf("output download: %d %q", res.StatusCode, body)
	}
	app := f.apps[9]
	if _, err := f.q.Add("sha256:"+app, "bin/app9", "test", "ui test"); err != nil {
		t.Fatal(err)
	}
	size := int64(len("app 9"))
	if res, _ := f.get(t, fmt.Sprintf("/blob/%s/%d/app", app, size)); res.StatusCode != http.StatusForbidden {
		t.Fatalf("download of a quarantined artifact: HTTP %d", res.StatusCode)
	}
	if _, body := f.get(t, ArtifactPath(app)); !strings.Contains(body, `id="quarantine-state">QUARANTINED`) || !strings.Contains(body, "ui test") {
		t.Fatalf("artifact page of a quarantined artifact:\n%s", body)
	}
	if _, body := f.get(t, "/quarantine"); !strings.Contains(body, app) {
		t.Fatalf("quarantine page lacks %s", app)
	}
}

// TestUntrustedLinkNotVerified: with another data dir's keys, the same links are shown
// as not verified, with the reason.
func TestUntrustedLinkNotVerified(t *testing.T) {
	f := newFixture(t, 10)
	dir := filepath.Join(t.TempDir(), "keys")
	os.Mkdir(dir, 0o700)
	other, err := keys.Open(context.Background(), dir, keys.Options{})
	if err != nil {
		t.Fatal(err)
	}
	cfg := f.ui.cfg
	cfg.Keys = other
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	u.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, ActionPath(f.actions[3]), nil))
	if body := rec.Body.String(); !strings.Contains(body, "Link NOT verified") || strings.Contains(body, "Link verified by the server") {
		t.Fatalf("a link by an untrusted key:\n%s", body)
	}
}

// TestProvenanceGraph: the artifact's graph has its link action, the compiles, the
// objects and the sources, each once, and edges from materials to actions to products.
func TestProvenanceGraph(t *testing.T) {
	f := newFixture(t, 20)
	_, body := f.get(t, ArtifactPath(f.apps[19]))
	for _, want := range []string{`class="node subject"`, `data-id="a:` + f.objects[12] + `"`, `class="node source"`, `class="node toolchain"`, "ld ", "src/15.c"} {
		if !strings.Contains(body, want) {
			t.Errorf("graph lacks %q", want)
		}
	}
	if n := strings.Count(body, `class="node action"`); n != 10 {
		t.Errorf("%d action nodes, want 10 (9 compiles and the link)", n)
	}
	// An object's page: its compile, and the link that consumed it.
	_, body = f.get(t, ArtifactPath(f.objects[12]))
	if !strings.Contains(body, `class="node consumer"`) || !strings.Contains(body, "Consumed by") {
		t.Errorf("object page lacks its consumer:\n%s", body)
	}
}

// TestLayoutLayers: a node sits right of everything it depends on.
func TestLayoutLayers(t *testing.T) {
	g := &Graph{}
	for _, id := range []string{"src", "tc", "cc", "o", "ld", "bin"} {
		g.Add(&Node{ID: id, Label: id})
	}
	for _, e := range [][2]string{{"src", "cc"}, {"tc", "cc"}, {"tc", "ld"}, {"cc", "o"}, {"o", "ld"}, {"ld", "bin"}} {
		g.Link(e[0], e[1])
	}
	g.layout()
	for _, e := range g.Edges {
		if g.byID[e.From].layer >= g.byID[e.To].layer {
			t.Errorf("edge %s -> %s goes from layer %d to %d", e.From, e.To, g.byID[e.From].layer, g.byID[e.To].layer)
		}
	}
	if l := g.byID["bin"].layer; l != 4 {
		t.Errorf("bin in layer %d, want 4", l)
	}
	if svg := string(g.SVG(`a "title" <x>`)); !strings.Contains(svg, `aria-label="a &#34;title&#34; &lt;x&gt;"`) || strings.Count(svg, "<g class=\"node") != 6 {
		t.Errorf("svg:\n%s", svg)
	}
}

var (
	benchOnce sync.Once
	benchFix  *fixture
)

// BenchmarkPages measures the server's time per page with 10,000 actions in the
// store (go test -bench Pages ./engine/ui/); each sub-benchmark reports its median.
func BenchmarkPages(b *testing.B) {
	benchOnce.Do(func() { benchFix = newFixture(b, 10000) })
	f := benchFix
	mid := f.actions[5003]
	pages := []struct{ name, url string }{
		{"overview", "/"},
		{"actions", "/actions"},
		{"search-path", "/actions?path=out/4242.o"},
		{"search-client", "/actions?client=ci-2&outcome=ok"},
		{"search-failures", "/actions?outcome=failures"},
		{"action", ActionPath(mid)},
		{"tree", ActionPath(f.actions[5009]) + "/tree/out"},
		{"artifact", ArtifactPath(f.apps[5009])},
		{"toolchains", "/toolchains"},
		{"quarantine", "/quarantine"},
		{"log", "/log"},
	}
	for _, p := range pages {
		b.Run(p.name, func(b *testing.B) {
			var lat []time.Duration
			for b.Loop() {
				start := time.Now()
				res, _ := f.get(b, p.url)
				lat = append(lat, time.Since(start))
				if res.StatusCode != 200 {
					b.Fatalf("%s: HTTP %d", p.url, res.StatusCode)
				}
			}
			sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "ms/median")
		})
	}
}
