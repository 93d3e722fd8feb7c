package ui

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"html/template"
	"maps"
	"net/http"
	"path"
	"slices"
	"strconv"
	"strings"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/in-toto/in-toto-golang/in_toto"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/engine/history"
	"github.com/kilnbuild/kiln/engine/quarantine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// maxShown bounds the bytes of stdout, stderr and reports shown on a page (the whole
// blob is a download).
const maxShown = 64 << 10

// ---- overview

type overviewData struct {
	Counts     history.Counts
	Executions int
	PerMin     template.HTML
	HitRate    template.HTML
	Queue      template.HTML
	Phases     template.HTML
	Failures   []*history.Run
	LogSize    uint64
	Indexed    uint64
	HasMetrics bool
}

func (u *UI) overview(w http.ResponseWriter, r *http.Request) {
	d := overviewData{Indexed: u.cfg.History.LogSize()}
	c, err := u.cfg.History.Count()
	if err != nil {
		u.fail(w, r, err)
		return
	}
	d.Counts = c
	for _, o := range []string{history.OK, history.Failed, history.Error, history.Cancelled} {
		d.Executions += c.ByOutcome[o]
	}
	if u.cfg.Metrics != nil {
		d.HasMetrics = true
		per, hit, q, ph := overviewCharts(u.cfg.Metrics.Samples())
		d.PerMin = lineChart("executions per minute", per, "per minute", 1)
		d.HitRate = lineChart("action cache hit rate", hit, "% hits", 100)
		d.Queue = lineChart("queue depth", q, "actions", 1)
		d.Phases = barChart("mean time per phase", ph, fmtSecs)
	}
	fails, err := u.cfg.History.Search(history.Query{Outcome: history.Failures, Limit: 10})
	if err != nil {
		u.fail(w, r, err)
		return
	}
	d.Failures = fails.Runs
	if lr, err := u.logReader(r.Context()); err == nil {
		if cp, err := lr.Checkpoint(r.Context()); err == nil {
			d.LogSize = cp.Size
		}
	}
	u.render(w, r, "overview", "Overview", d)
}

// ---- actions list

type actionsData struct {
	Q        history.Query
	Outcomes []string
	Runs     []*history.Run
	Next     string // query string of the next page
}

func (u *UI) actions(w http.ResponseWriter, r *http.Request) {
	v := r.URL.Query()
	q := history.Query{Action: v.Get("action"), Path: v.Get("path"), Client: v.Get("client"), Toolchain: v.Get("toolchain"), Outcome: v.Get("outcome")}
	if q.Outcome != "" && q.Outcome != history.Failures && !slices.Contains(history.Outcomes, q.Outcome) {
		u.fail(w, r, status.Errorf(codes.InvalidArgument, "unknown outcome %q", q.Outcome))
		return
	}
	if b := v.Get("before"); b != "" {
		n, err := strconv.ParseUint(b, 10, 64)
		if err != nil {
			u.fail(w, r, status.Errorf(codes.InvalidArgument, "bad page %q", b))
			return
		}
		q.Before = n
	}
	p, err := u.cfg.History.Search(q)
	if err != nil {
		u.fail(w, r, err)
		return
	}
	d := actionsData{Q: q, Outcomes: append([]string{history.Failures}, history.Outcomes...), Runs: p.Runs}
	if p.Next != 0 {
		v.Set("before", strconv.FormatUint(p.Next, 10))
		d.Next = v.Encode()
	}
	u.render(w, r, "actions", "Actions", d)
}

// ---- action page

// linkView is one link of an action, as the server verified it.
type linkView struct {
	Envelope  cache.Digest
	Verified  bool
	Problem   string // why it did not verify
	KeyID     string
	LogIndex  uint64
	LogSize   uint64 // the checkpoint its inclusion was proven against
	Link      in_toto.Link
	Materials int
	Products  []productView
	Byproduct []kv
	Payload   string // indented JSON
}

type productView struct {
	Path        string
	SHA256      string
	Symlink     bool
	Quarantined bool
}

type kv struct{ K, V string }

type actionData struct {
	Digest      cache.Digest
	Runs        []*history.Run
	Run         *history.Run
	Command     *repb.Command
	CommandErr  string
	Platform    []kv
	InputRoot   cache.Digest
	Timeout     string
	Tree        *treeData
	Links       []linkView
	Stdout      textBlob
	Stderr      textBlob
	Report      textBlob
	Phases      template.HTML
	Quarantined []string
	Verify      string // the verify outcome: the link's reproducibility record
}

type textBlob struct {
	Digest    cache.Digest
	Text      string
	Truncated bool
	Err       string
}

func (u *UI) text(ctx context.Context, d cache.Digest) textBlob {
	t := textBlob{Digest: d}
	if d == (cache.Digest{}) {
		return t
	}
	var err error
	t.Text, t.Truncated, err = u.readText(ctx, d, maxShown)
	if err != nil {
		t.Err = status.Convert(err).Message()
	}
	return t
}

func (u *UI) action(w http.ResponseWriter, r *http.Request) {
	dg, err := parseDigest(r)
	if err != nil {
		u.fail(w, r, err)
		return
	}
	ctx := r.Context()
	d := actionData{Digest: dg}
	if d.Runs, err = u.cfg.History.ByAction(dg.Hash); err != nil {
		u.fail(w, r, err)
		return
	}
	if s := r.URL.Query().Get("run"); s != "" {
		for _, run := range d.Runs {
			if strconv.FormatUint(run.Seq, 10) == s {
				d.Run = run
			}
		}
	}
	if d.Run == nil {
		for _, run := range d.Runs { // the newest execution, else the newest hit
			if run.Outcome != history.Cached {
				d.Run = run
				break
			}
		}
		if d.Run == nil && len(d.Runs) > 0 {
			d.Run = d.Runs[0]
		}
	}
	var act repb.Action
	actErr := cache.ReadProto(ctx, u.cfg.CAS, dg, &act, 4<<20)
	if actErr == nil {
		cd, _ := cache.FromProto(act.GetCommandDigest())
		d.InputRoot, _ = cache.FromProto(act.GetInputRootDigest())
		if t := act.GetTimeout(); t != nil {
			d.Timeout = t.AsDuration().String()
		}
		var cmd repb.Command
		if err := cache.ReadProto(ctx, u.cfg.CAS, cd, &cmd, 4<<20); err == nil {
			d.Command = &cmd
		} else {
			d.CommandErr = status.Convert(err).Message()
		}
		plat := act.GetPlatform()
		if plat == nil {
			plat = d.Command.GetPlatform()
		}
		for _, p := range plat.GetProperties() {
			d.Platform = append(d.Platform, kv{p.GetName(), p.GetValue()})
		}
		if d.InputRoot != (cache.Digest{}) {
			d.Tree = u.treeAt(ctx, dg, d.InputRoot, "")
		}
	} else {
		d.CommandErr = "the Action blob is not in the CAS (evicted?): " + status.Convert(actErr).Message()
	}
	if d.Runs == nil && actErr != nil {
		envs, _ := u.cfg.Attest.ActionLinks(dg.Hash)
		if len(envs) == 0 {
			u.fail(w, r, status.Errorf(codes.NotFound, "kiln knows no action %s: no run, no link, no Action blob", dg))
			return
		}
	}
	d.Links = u.verifyLinks(ctx, dg.Hash)
	if d.Run != nil {
		d.Stdout, d.Stderr, d.Report = u.text(ctx, d.Run.Stdout), u.text(ctx, d.Run.Stderr), u.text(ctx, d.Run.ServerLog)
		var bars []Bar
		for _, p := range d.Run.Phases {
			bars = append(bars, Bar{Label: p.Name, Value: p.Seconds})
		}
		if len(bars) > 0 {
			d.Phases = barChart("time by phase", bars, fmtSecs)
		}
		d.Verify = d.Run.Reproducibility
		for _, o := range d.Run.Outputs {
			if o.SHA256 != "" && u.cfg.Quarantine.Quarantined(o.SHA256) {
				d.Quarantined = append(d.Quarantined, o.Path)
			}
		}
	} else if len(d.Links) > 0 && d.Links[0].Verified {
		// Known from its link alone.
		by := d.Links[0].Link.ByProducts
		for _, k := range []struct {
			key string
			t   *textBlob
		}{{attest.ByproductStdout, &d.Stdout}, {attest.ByproductStderr, &d.Stderr}} {
			if s, ok := by[k.key].(string); ok {
				if dd, err := cache.ParseDigest(s); err == nil {
					*k.t = u.text(ctx, dd)
				}
			}
		}
	}
	if d.Verify == "" {
		for _, l := range d.Links {
			if s, ok := l.Link.ByProducts[attest.ByproductReproducibility].(string); ok && l.Verified {
				d.Verify = s
			}
		}
	}
	u.render(w, r, "action", "Action "+dg.Hash[:12], d)
}

// verifyLinks verifies every link recorded for the action with this hash.
func (u *UI) verifyLinks(ctx context.Context, hash string) []linkView {
	var v *attest.Verifier
	var verr error
	made := false
	if u.cfg.Attest.Remote() { // a cluster's log: the verifier first indexes its new links
		v, _, verr = u.verifier(ctx)
		made = true
	}
	envs, err := u.cfg.Attest.ActionLinks(hash)
	if err != nil || len(envs) == 0 {
		return nil
	}
	if !made {
		v, _, verr = u.verifier(ctx)
	}
	var out []linkView
	for _, e := range envs {
		lv := linkView{Envelope: e}
		raw, err := u.cfg.Attest.Envelope(ctx, e)
		if err == nil {
			if p, err := attest.EnvelopePayload(raw); err == nil {
				var buf bytes.Buffer
				if json.Indent(&buf, p, "", "  ") == nil {
					lv.Payload = buf.String()
				}
				lv.Link, _ = attest.DecodeLink(p)
			}
		}
		switch {
		case err != nil:
			lv.Problem = status.Convert(err).Message()
		case verr != nil:
			lv.Problem = "the log does not verify: " + status.Convert(verr).Message()
		default:
			vl, err := v.Link(ctx, e)
			if err != nil {
				lv.Problem = status.Convert(err).Message()
				break
			}
			lv.Verified, lv.KeyID, lv.LogIndex, lv.Link = true, vl.KeyID, vl.LogIndex, vl.Link
			lv.LogSize = v.Checkpoint().Size
		}
		lv.Materials = len(lv.Link.Materials)
		for _, p := range slices.Sorted(maps.Keys(lv.Link.Products)) {
			h := lv.Link.Products[p]
			pv := productView{Path: p, SHA256: h[attest.AlgSHA256], Symlink: h[attest.AlgSymlink] != ""}
			pv.Quarantined = pv.SHA256 != "" && u.cfg.Quarantine.Quarantined(pv.SHA256)
			lv.Products = append(lv.Products, pv)
		}
		for _, k := range slices.Sorted(maps.Keys(lv.Link.ByProducts)) {
			lv.Byproduct = append(lv.Byproduct, kv{k, fmt.Sprint(lv.Link.ByProducts[k])})
		}
		out = append(out, lv)
	}
	return out
}

// ---- input tree

type treeEntry struct {
	Name, Path string
	Digest     cache.Digest
	Dir        bool
	Exec       bool
	Target     string // symlink
}

type treeData struct {
	Action  cache.Digest
	Path    string
	Parents []kv // name, path
	Entries []treeEntry
	Err     string
}

// treeAt lists the input tree's directory at p ("" is the root).
func (u *UI) treeAt(ctx context.Context, action, root cache.Digest, p string) *treeData {
	t := &treeData{Action: action, Path: p}
	d := root
	var dir repb.Directory
	walked := ""
	t.Parents = append(t.Parents, kv{"(input root)", ""})
	read := func() bool {
		dir.Reset()
		if err := cache.ReadProto(ctx, u.cfg.CAS, d, &dir, 16<<20); err != nil {
			t.Err = fmt.Sprintf("directory %s: %s", path.Join("/", walked), status.Convert(err).Message())
			return false
		}
		return true
	}
	if !read() {
		return t
	}
	for _, name := range strings.Split(p, "/") {
		if name == "" {
			break
		}
		found := false
		for _, sd := range dir.GetDirectories() {
			if sd.GetName() == name {
				d, _ = cache.FromProto(sd.GetDigest())
				found = true
			}
		}
		if !found {
			t.Err = fmt.Sprintf("no directory %q in %s", name, path.Join("/", walked))
			return t
		}
		walked = path.Join(walked, name)
		t.Parents = append(t.Parents, kv{name, walked})
		if !read() {
			return t
		}
	}
	for _, sd := range dir.GetDirectories() {
		dd, _ := cache.FromProto(sd.GetDigest())
		t.Entries = append(t.Entries, treeEntry{Name: sd.GetName(), Path: path.Join(walked, sd.GetName()), Digest: dd, Dir: true})
	}
	for _, f := range dir.GetFiles() {
		fd, _ := cache.FromProto(f.GetDigest())
		t.Entries = append(t.Entries, treeEntry{Name: f.GetName(), Path: path.Join(walked, f.GetName()), Digest: fd, Exec: f.GetIsExecutable()})
	}
	for _, s := range dir.GetSymlinks() {
		t.Entries = append(t.Entries, treeEntry{Name: s.GetName(), Path: path.Join(walked, s.GetName()), Target: s.GetTarget()})
	}
	return t
}

func (u *UI) tree(w http.ResponseWriter, r *http.Request) {
	dg, err := parseDigest(r)
	if err != nil {
		u.fail(w, r, err)
		return
	}
	p := strings.Trim(r.PathValue("path"), "/")
	if p != "" && path.Clean(p) != p {
		u.fail(w, r, status.Errorf(codes.InvalidArgument, "bad path %q", p))
		return
	}
	var act repb.Action
	if err := cache.ReadProto(r.Context(), u.cfg.CAS, dg, &act, 4<<20); err != nil {
		u.fail(w, r, err)
		return
	}
	root, err := cache.FromProto(act.GetInputRootDigest())
	if err != nil {
		u.fail(w, r, err)
		return
	}
	u.render(w, r, "tree", "Inputs of "+dg.Hash[:12], u.treeAt(r.Context(), dg, root, p))
}

// ---- artifact page

type artifactData struct {
	SHA256      string
	Name        string
	Verified    bool
	Failures    []string
	Graph       template.HTML
	Producers   []*history.Run
	Consumers   []*history.Run
	Links       int
	Sources     int
	Toolchains  []string
	SBOM        string
	Summaries   []summaryView
	Quarantine  *quarantine.Entry
	Audit       []quarantine.AuditRecord
	LogSize     uint64
	Downloaded  bool
	Size        int64
	Quarantined bool
}

type summaryView struct {
	Envelope cache.Digest
	Verified bool
	Problem  string
	KeyID    string
	Result   string
	Verifier string
	Policy   string
	Time     string
}

// maxGraphSources bounds the source nodes drawn; the rest are counted in one node.
const maxGraphSources = 40

func (u *UI) artifact(w http.ResponseWriter, r *http.Request) {
	sha, err := parseHash(r.PathValue("hash"))
	if err != nil {
		u.fail(w, r, err)
		return
	}
	ctx := r.Context()
	d := artifactData{SHA256: sha, Name: "sha256:" + sha}
	d.Producers, _ = u.cfg.History.Producers(sha)
	d.Consumers, _ = u.cfg.History.Consumers(sha)
	for _, p := range d.Producers {
		for _, o := range p.Outputs {
			if o.SHA256 == sha {
				d.Name, d.Size = o.Path, o.Size
			}
		}
	}
	ch, chErr := u.chain(ctx, sha, d.Name)
	if chErr != nil {
		d.Failures = append(d.Failures, status.Convert(chErr).Message())
	}
	if ch != nil {
		d.Verified = ch.OK()
		for _, f := range ch.Failures {
			d.Failures = append(d.Failures, f.String())
		}
		d.Links, d.Sources, d.Toolchains = len(ch.Links), len(ch.Sources), ch.Toolchains
		if d.Verified {
			if b, err := attest.EncodeSBOM(ch.SBOM(u.cfg.Version)); err == nil {
				d.SBOM = string(b)
			}
		}
	}
	d.Graph = provenanceGraph(sha, d.Name, ch, d.Consumers).SVG("provenance of " + d.Name)
	d.Summaries = u.summaries(ctx, sha)
	d.Quarantined = u.cfg.Quarantine.Quarantined(sha)
	if list, err := u.cfg.Quarantine.List(); err == nil {
		for i := range list {
			if list[i].Digest == "sha256:"+sha {
				d.Quarantine = &list[i]
			}
		}
	}
	if recs, err := u.cfg.Quarantine.Audit(); err == nil {
		for i := len(recs) - 1; i >= 0; i-- {
			if recs[i].Digest == "sha256:"+sha {
				d.Audit = append(d.Audit, recs[i])
			}
		}
	}
	u.render(w, r, "artifact", "Artifact "+path.Base(d.Name), d)
}

// chain verifies the artifact's provenance chain (nil without any link).
func (u *UI) chain(ctx context.Context, sha, name string) (*attest.Chain, error) {
	envs, err := u.cfg.Attest.Producers(attest.AlgSHA256, sha)
	if err != nil || len(envs) == 0 {
		return nil, err
	}
	v, _, err := u.verifier(ctx)
	if err != nil {
		return nil, err
	}
	return v.Chain(ctx, attest.Subject{Name: name, SHA256: sha})
}

// provenanceGraph draws the chain: sources and toolchains into actions, actions into
// their products, up to the subject, and on to the actions that consumed it.
func provenanceGraph(sha, name string, ch *attest.Chain, consumers []*history.Run) *Graph {
	g := &Graph{}
	subj := g.Add(&Node{ID: "a:" + sha, Kind: NodeSubject, Label: path.Base(name), Title: name + "\nsha256:" + sha, Href: ArtifactPath(sha)})
	if ch != nil {
		produced := map[string]bool{}
		for _, l := range ch.Links {
			for _, h := range l.Link.Products {
				if s := h[attest.AlgSHA256]; s != "" {
					produced[s] = true
				}
			}
		}
		sources := 0
		for _, l := range ch.Links {
			ad, _ := cache.ParseDigest(fmt.Sprint(l.Link.ByProducts[attest.ByproductActionDigest]))
			argv := strings.Join(l.Link.Command, " ")
			label := "action " + l.Link.Name[:12]
			if len(l.Link.Command) > 0 {
				label = path.Base(l.Link.Command[0]) + " " + l.Link.Name[:8]
			}
			an := g.Add(&Node{ID: "x:" + l.Envelope.Hash, Kind: NodeAction, Label: label, Title: argv + "\naction " + ad.String(), Href: ActionPath(ad)})
			for p, h := range l.Link.Products {
				s := h[attest.AlgSHA256]
				if s == "" || (s != sha && !isMaterialOfChain(ch, s)) {
					continue // only what leads to the subject
				}
				kind := NodeArtifact
				if s == sha {
					kind = NodeSubject
				}
				n := g.Add(&Node{ID: "a:" + s, Kind: kind, Label: path.Base(p), Title: p + "\nsha256:" + s, Href: ArtifactPath(s)})
				g.Link(an.ID, n.ID)
			}
			for _, p := range slices.Sorted(maps.Keys(l.Link.Materials)) {
				h := l.Link.Materials[p]
				switch p {
				case attest.MaterialAction, attest.MaterialCommand:
					continue
				case attest.MaterialToolchain:
					t := g.Add(&Node{ID: "t:" + h[attest.AlgSHA256], Kind: NodeToolchain, Label: "toolchain " + h[attest.AlgSHA256][:12], Title: "toolchain sha256:" + h[attest.AlgSHA256], Href: "/toolchains"})
					g.Link(t.ID, an.ID)
					continue
				}
				s := h[attest.AlgSHA256]
				if s == "" {
					continue
				}
				if produced[s] {
					n := g.Add(&Node{ID: "a:" + s, Kind: NodeArtifact, Label: path.Base(p), Title: p + "\nsha256:" + s, Href: ArtifactPath(s)})
					g.Link(n.ID, an.ID)
					continue
				}
				if sources >= maxGraphSources {
					more := g.Add(&Node{ID: "more:" + l.Envelope.Hash, Kind: NodeMore, Label: "more sources", Title: "sources left out of the picture; the SBOM lists them all"})
					g.Link(more.ID, an.ID)
					continue
				}
				if g.byID["s:"+s+":"+p] == nil {
					sources++
				}
				n := g.Add(&Node{ID: "s:" + s + ":" + p, Kind: NodeSource, Label: path.Base(p), Title: p + "\nsha256:" + s, Href: ArtifactPath(s)})
				g.Link(n.ID, an.ID)
			}
		}
	}
	for _, c := range consumers {
		label := "action " + c.Action.Hash[:8]
		if len(c.Argv) > 0 {
			label = path.Base(c.Argv[0]) + " " + c.Action.Hash[:8]
		}
		n := g.Add(&Node{ID: "c:" + c.Action.Hash, Kind: NodeConsumer, Label: label, Title: strings.Join(c.Argv, " ") + "\naction " + c.Action.String(), Href: ActionPath(c.Action)})
		g.Link(subj.ID, n.ID)
	}
	return g
}

// isMaterialOfChain reports whether some link of the chain took the file as an input.
func isMaterialOfChain(ch *attest.Chain, sha string) bool {
	for _, l := range ch.Links {
		for _, h := range l.Link.Materials {
			if h[attest.AlgSHA256] == sha {
				return true
			}
		}
	}
	return false
}

// summaries verifies and decodes the verification summaries kept for the artifact.
func (u *UI) summaries(ctx context.Context, sha string) []summaryView {
	envs, err := u.cfg.Attest.Summaries(sha)
	if err != nil || len(envs) == 0 {
		return nil
	}
	ks, _ := u.cfg.Keys.Keys()
	lk := u.cfg.Keys.Log()
	var out []summaryView
	for _, e := range envs {
		sv := summaryView{Envelope: e}
		raw, err := u.cfg.Attest.Envelope(ctx, e)
		if err != nil {
			sv.Problem = status.Convert(err).Message()
			out = append(out, sv)
			continue
		}
		env, err := attest.ParseEnvelope(raw)
		if err != nil {
			sv.Problem = status.Convert(err).Message()
			out = append(out, sv)
			continue
		}
		key, payload, err := attest.VerifyEnvelope(ctx, env, keysTrust(ks, &lk))
		if err != nil {
			sv.Problem = status.Convert(err).Message()
			out = append(out, sv)
			continue
		}
		sv.Verified, sv.KeyID = true, key.KeyID
		var st struct {
			Subject []struct {
				Digest map[string]string `json:"digest"`
			} `json:"subject"`
			Predicate struct {
				Verifier struct {
					ID string `json:"id"`
				} `json:"verifier"`
				TimeVerified string `json:"timeVerified"`
				Policy       struct {
					URI string `json:"uri"`
				} `json:"policy"`
				Result string `json:"verificationResult"`
			} `json:"predicate"`
		}
		if err := json.Unmarshal(payload, &st); err != nil || len(st.Subject) != 1 || st.Subject[0].Digest["sha256"] != sha {
			sv.Verified, sv.Problem = false, "signed, but not a verification summary of this artifact"
		}
		sv.Result, sv.Verifier, sv.Policy, sv.Time = st.Predicate.Result, st.Predicate.Verifier.ID, st.Predicate.Policy.URI, st.Predicate.TimeVerified
		out = append(out, sv)
	}
	return out
}

func (u *UI) sbom(w http.ResponseWriter, r *http.Request) {
	sha, err := parseHash(r.PathValue("hash"))
	if err != nil {
		u.fail(w, r, err)
		return
	}
	name := "sha256:" + sha
	if ps, _ := u.cfg.History.Producers(sha); len(ps) > 0 {
		for _, o := range ps[0].Outputs {
			if o.SHA256 == sha {
				name = o.Path
			}
		}
	}
	ch, err := u.chain(r.Context(), sha, name)
	if err == nil && (ch == nil || !ch.OK()) {
		err = status.Errorf(codes.FailedPrecondition, "the provenance of %s does not verify; no SBOM", name)
	}
	if err != nil {
		u.fail(w, r, err)
		return
	}
	b, err := attest.EncodeSBOM(ch.SBOM(u.cfg.Version))
	if err != nil {
		u.fail(w, r, err)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Disposition", `attachment; filename="`+sha[:12]+`.cdx.json"`)
	w.Write(b)
}

// ---- toolchains, quarantine, log

type toolchainRow struct {
	Digest string
	Names  []string
	Size   int64
	Arch   string
	InUse  int
}

func (u *UI) toolchainsPage(w http.ResponseWriter, r *http.Request) {
	var rows []toolchainRow
	c, err := u.cfg.History.Count()
	if err != nil {
		u.fail(w, r, err)
		return
	}
	if u.cfg.Toolchains != nil {
		ents, err := u.cfg.Toolchains.List(r.Context())
		if err != nil {
			u.fail(w, r, err)
			return
		}
		for _, e := range ents {
			rows = append(rows, toolchainRow{Digest: e.Digest.String(), Names: e.Names, Size: e.Size,
				Arch: e.Platform.OS + "/" + e.Platform.Architecture, InUse: c.Toolchains[e.Digest.Encoded()]})
		}
	}
	u.render(w, r, "toolchains", "Toolchains", rows)
}

type quarantineData struct {
	Entries []quarantine.Entry
	Audit   []quarantine.AuditRecord
}

func (u *UI) quarantinePage(w http.ResponseWriter, r *http.Request) {
	var d quarantineData
	var err error
	if d.Entries, err = u.cfg.Quarantine.List(); err != nil {
		u.fail(w, r, err)
		return
	}
	recs, err := u.cfg.Quarantine.Audit()
	if err != nil {
		u.fail(w, r, err)
		return
	}
	for i := len(recs) - 1; i >= 0 && len(d.Audit) < 500; i-- {
		d.Audit = append(d.Audit, recs[i])
	}
	u.render(w, r, "quarantine", "Quarantine", d)
}

type logData struct {
	Origin     string
	Size       uint64
	Root       string
	Checkpoint string
	Err        string
	Indexed    uint64
	Keys       []kv
}

func (u *UI) logPage(w http.ResponseWriter, r *http.Request) {
	d := logData{Indexed: u.cfg.History.LogSize()}
	lr, err := u.logReader(r.Context())
	if err == nil {
		cp, cerr := lr.Checkpoint(r.Context())
		if cerr == nil {
			d.Origin, d.Size, d.Root, d.Checkpoint = cp.Origin, cp.Size, base64.StdEncoding.EncodeToString(cp.Root), string(cp.Raw)
		}
		err = cerr
	}
	if err != nil {
		d.Err = status.Convert(err).Message()
	}
	if ks, err := u.cfg.Keys.Keys(); err == nil {
		for _, k := range ks {
			state := "active"
			if !k.Active() {
				state = "retired " + k.NotAfter.Format("2006-01-02 15:04")
			}
			d.Keys = append(d.Keys, kv{k.KeyID, state})
		}
	}
	u.render(w, r, "log", "Transparency log", d)
}

func keysTrust(ks []keys.PublicKey, lk *keys.LogKey) keys.Trust { return keys.Trust{Keys: ks, Log: lk} }
