// Package ui is kiln serve's read-only web UI: server-rendered HTML (html/template,
// which escapes every value) with one embedded stylesheet and no script, plots and the
// provenance graph drawn as SVG on the server. Links are verified by the server
// (signature, key validity, log inclusion) before a page says they are. docs/ui.md
// describes the pages and why they are built this way.
package ui

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"html/template"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/engine/attest/tlog"
	"github.com/kilnbuild/kiln/engine/history"
	"github.com/kilnbuild/kiln/engine/quarantine"
	"github.com/kilnbuild/kiln/toolchains"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

//go:embed templates/*.html static/*
var files embed.FS

// Config is what the UI reads: the data dir's parts, opened by kiln serve.
type Config struct {
	CAS    cache.BlobStore
	Attest *attest.Store
	Keys   *keys.Keyring // trusted executor keys (all of the data dir's) and the log key
	// Cluster, when set, returns a kiln cluster's trust set: its workers' keys are
	// trusted too, and its log key (the sequencer's) replaces the data dir's; Attest
	// then reads that log (from the bucket when the data dir does not hold it).
	Cluster    func(ctx context.Context) (keys.Trust, error)
	Quarantine *quarantine.List
	Toolchains *toolchains.Store // nil: the page says there are none
	History    *history.Index
	Metrics    *Sampler // nil: the overview has no plots
	Version    string
	Logger     *slog.Logger
}

// UI serves the pages.
type UI struct {
	cfg   Config
	log   *slog.Logger
	pages map[string]*template.Template
	mux   *http.ServeMux
}

// New returns the UI's handler.
func New(cfg Config) (*UI, error) {
	u := &UI{cfg: cfg, log: cfg.Logger, pages: map[string]*template.Template{}, mux: http.NewServeMux()}
	if u.log == nil {
		u.log = slog.New(slog.DiscardHandler)
	}
	base, err := template.New("layout.html").Funcs(funcs).ParseFS(files, "templates/layout.html")
	if err != nil {
		return nil, err
	}
	names, _ := files.ReadDir("templates")
	for _, n := range names {
		if n.Name() == "layout.html" {
			continue
		}
		t, err := template.Must(base.Clone()).ParseFS(files, "templates/"+n.Name())
		if err != nil {
			return nil, err
		}
		u.pages[strings.TrimSuffix(n.Name(), ".html")] = t
	}
	m := u.mux
	m.HandleFunc("GET /{$}", u.overview)
	m.HandleFunc("GET /actions", u.actions)
	m.HandleFunc("GET /action/{hash}/{size}", u.action)
	m.HandleFunc("GET /action/{hash}/{size}/tree/{path...}", u.tree)
	m.HandleFunc("GET /artifact/{hash}", u.artifact)
	m.HandleFunc("GET /artifact/{hash}/sbom.json", u.sbom)
	m.HandleFunc("GET /blob/{hash}/{size}/{name}", u.blob)
	m.HandleFunc("GET /toolchains", u.toolchainsPage)
	m.HandleFunc("GET /quarantine", u.quarantinePage)
	m.HandleFunc("GET /log", u.logPage)
	m.HandleFunc("GET /static/{file}", u.static)
	return u, nil
}

// ContentSecurityPolicy is sent with every response: no script at all (the UI has
// none), styles and images from the UI itself, forms only to itself, no framing.
const ContentSecurityPolicy = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"

// ServeHTTP serves a page with the security headers every response carries.
func (u *UI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Content-Security-Policy", ContentSecurityPolicy)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("Cache-Control", "no-store")
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		h.Set("Allow", "GET, HEAD")
		http.Error(w, "the web UI is read-only", http.StatusMethodNotAllowed)
		return
	}
	u.mux.ServeHTTP(w, r)
}

// ActionPath is the path of an action's page, for URLs in reports and errors.
func ActionPath(d cache.Digest) string {
	return "/action/" + d.Hash + "/" + strconv.FormatInt(d.Size, 10)
}

// ArtifactPath is the path of an artifact's page.
func ArtifactPath(sha string) string { return "/artifact/" + sha }

var funcs = template.FuncMap{
	"short": func(s string) string {
		s = strings.TrimPrefix(s, "sha256:")
		if len(s) > 12 {
			return s[:12]
		}
		return s
	},
	"digest": func(d cache.Digest) string {
		if d == (cache.Digest{}) {
			return ""
		}
		return d.String()
	},
	"actionURL":   ActionPath,
	"artifactURL": ArtifactPath,
	"blobURL":     blobPath,
	"fileURL": func(hash string, size int64, name string) string {
		return blobPath(cache.Digest{Hash: hash, Size: size}, name)
	},
	"when": func(t time.Time) string {
		if t.IsZero() {
			return ""
		}
		return t.Local().Format("2006-01-02 15:04:05")
	},
	"hex":   func(s string) string { return strings.TrimPrefix(s, "sha256:") },
	"secs":  fmtSecs,
	"bytes": fmtBytes,
	"join":  strings.Join,
	"hasSuffix": func(s, suffix string) bool {
		return strings.HasSuffix(s, suffix)
	},
}

// blobPath is the download path of blob d under the file name name's last element.
func blobPath(d cache.Digest, name string) string {
	if name == "" {
		name = d.Hash
	}
	return "/blob/" + d.Hash + "/" + strconv.FormatInt(d.Size, 10) + "/" + url.PathEscape(safeName(name))
}

func fmtSecs(s float64) string {
	switch {
	case s >= 60:
		return (time.Duration(s) * time.Second).Round(time.Second).String()
	case s >= 1:
		return fmt.Sprintf("%.2f s", s)
	case s >= 0.001:
		return fmt.Sprintf("%.1f ms", s*1000)
	}
	return fmt.Sprintf("%.0f µs", s*1e6)
}

func fmtBytes(n int64) string {
	const u = 1024
	if n < u {
		return fmt.Sprintf("%d B", n)
	}
	f, i := float64(n), 0
	for f >= u && i < 4 {
		f /= u
		i++
	}
	return fmt.Sprintf("%.1f %ciB", f, "KMGT"[i-1])
}

// page is what every template gets: the page's title and its data.
type page struct {
	Title   string
	Nav     string
	Version string
	Data    any
}

func (u *UI) render(w http.ResponseWriter, r *http.Request, name, title string, data any) {
	t := u.pages[name]
	var b strings.Builder
	if err := t.ExecuteTemplate(&b, "layout.html", page{Title: title, Nav: name, Version: u.cfg.Version, Data: data}); err != nil {
		u.log.Error("web UI: rendering a page", "page", name, "err", err)
		http.Error(w, "internal error rendering the page", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	io.WriteString(w, b.String())
}

// fail answers an error page: the gRPC code decides the HTTP status.
func (u *UI) fail(w http.ResponseWriter, r *http.Request, err error) {
	code := http.StatusInternalServerError
	switch status.Code(err) {
	case codes.InvalidArgument:
		code = http.StatusBadRequest
	case codes.NotFound:
		code = http.StatusNotFound
	case codes.PermissionDenied, codes.FailedPrecondition:
		code = http.StatusForbidden
	}
	if code == http.StatusInternalServerError {
		u.log.Warn("web UI", "path", r.URL.Path, "err", err)
	}
	w.WriteHeader(code)
	u.render(w, r, "error", http.StatusText(code), status.Convert(err).Message())
}

// parseDigest reads a {hash}/{size} pair of path values.
func parseDigest(r *http.Request) (cache.Digest, error) {
	size, err := strconv.ParseInt(r.PathValue("size"), 10, 64)
	if err != nil {
		return cache.Digest{}, status.Errorf(codes.InvalidArgument, "bad size %q", r.PathValue("size"))
	}
	d, err := cache.NewDigest(r.PathValue("hash"), size)
	if err != nil {
		return cache.Digest{}, status.Errorf(codes.InvalidArgument, "bad digest: %v", status.Convert(err).Message())
	}
	return d, nil
}

func parseHash(s string) (string, error) {
	s = strings.TrimPrefix(s, "sha256:")
	if _, err := cache.NewDigest(s, 0); err != nil {
		return "", status.Errorf(codes.InvalidArgument, "bad sha256 %q", s)
	}
	return s, nil
}

// verifier checks links against every key of the data dir's keyring and its log.
func (u *UI) verifier(ctx context.Context) (*attest.Verifier, *keys.Trust, error) {
	ks, err := u.cfg.Keys.Keys()
	if err != nil {
		return nil, nil, err
	}
	lk := u.cfg.Keys.Log()
	trust := &keys.Trust{Keys: ks, Log: &lk}
	if u.cfg.Cluster != nil {
		ct, err := u.cfg.Cluster(ctx)
		if err != nil {
			return nil, nil, err
		}
		if ct.Log != nil {
			trust.Log = ct.Log
		}
		trust.Add(ct)
	}
	lv, err := trust.Log.Verifier()
	if err != nil {
		return nil, nil, err
	}
	v, err := attest.NewVerifier(ctx, u.cfg.Attest, attest.VerifierOptions{Trust: *trust, LogVerifier: lv})
	return v, trust, err
}

// logReader reads the log the store reads (the data dir's, or a cluster's), checking
// checkpoints with its key.
func (u *UI) logReader(ctx context.Context) (*tlog.Reader, error) {
	lk := u.cfg.Keys.Log()
	if u.cfg.Cluster != nil {
		ct, err := u.cfg.Cluster(ctx)
		if err != nil {
			return nil, err
		}
		if ct.Log != nil {
			lk = *ct.Log
		}
	}
	lv, err := lk.Verifier()
	if err != nil {
		return nil, err
	}
	return u.cfg.Attest.LogReader(lv), nil
}

// readText reads up to limit bytes of a blob for display; truncated says whether
// there was more.
func (u *UI) readText(ctx context.Context, d cache.Digest, limit int64) (text string, truncated bool, err error) {
	if d == (cache.Digest{}) || d.Size == 0 {
		return "", false, nil
	}
	rc, err := u.cfg.CAS.Get(ctx, d, 0)
	if err != nil {
		return "", false, err
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, limit))
	if err != nil {
		return "", false, err
	}
	return strings.ToValidUTF8(string(b), "\uFFFD"), d.Size > limit, nil
}

// static serves the embedded stylesheet.
func (u *UI) static(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("file")
	b, err := files.ReadFile("static/" + name)
	if err != nil {
		http.NotFound(w, r)
		return
	}
	ct := mime.TypeByExtension(name[strings.LastIndexByte(name, '.'):])
	if ct == "" {
		ct = "application/octet-stream"
	}
	w.Header().Set("Content-Type", ct)
	w.Header().Set("Cache-Control", "max-age=3600")
	w.Write(b)
}

// safeName keeps a download's file name to its last path element, without control
// characters.
func safeName(name string) string {
	if i := strings.LastIndexByte(name, '/'); i >= 0 {
		name = name[i+1:]
	}
	name = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f || r == '"' || r == '\\' {
			return '_'
		}
		return r
	}, name)
	if name == "" || name == "." || name == ".." {
		name = "blob"
	}
	return name
}

// blob downloads a blob from the CAS as an attachment: application/octet-stream with
// nosniff, never rendered by the browser, whatever its bytes are. Quarantined
// artifacts are not handed out.
func (u *UI) blob(w http.ResponseWriter, r *http.Request) {
	d, err := parseDigest(r)
	if err != nil {
		u.fail(w, r, err)
		return
	}
	if u.cfg.Quarantine != nil && u.cfg.Quarantine.Quarantined(d.Hash) {
		u.fail(w, r, status.Errorf(codes.PermissionDenied, "sha256:%s is quarantined; kiln does not hand it out (see the quarantine page)", d.Hash))
		return
	}
	rc, err := u.cfg.CAS.Get(r.Context(), d, 0)
	if err != nil {
		u.fail(w, r, err)
		return
	}
	defer rc.Close()
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	cd := mime.FormatMediaType("attachment", map[string]string{"filename": safeName(r.PathValue("name"))})
	if cd == "" {
		cd = "attachment"
	}
	h.Set("Content-Disposition", cd)
	h.Set("Content-Length", strconv.FormatInt(d.Size, 10))
	if r.Method == http.MethodHead {
		return
	}
	if _, err := io.Copy(w, rc); err != nil && !errors.Is(err, context.Canceled) {
		u.log.Warn("web UI: download ended early", "blob", d.String(), "err", err)
	}
}
