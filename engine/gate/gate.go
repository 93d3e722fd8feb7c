// Package gate decides whether an artifact may be promoted to a stage: it verifies the
// artifact's attestations (provenance, links and their log inclusion, verification
// summaries of independent rebuilds, SBOM, lockfile pins, quarantine), builds an input
// document of the verified facts only, runs a CEL policy over it, and signs the decision
// as an in-toto statement.
package gate

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"runtime"
	"slices"
	"sort"
	"strings"
	"time"

	intoto "github.com/in-toto/attestation/go/v1"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/engine/quarantine"
	"github.com/kilnbuild/kiln/engine/rebuild"
	"github.com/kilnbuild/kiln/lockfiles"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Options configures a Gate.
type Options struct {
	// Policy decides (required).
	Policy *Policy
	// Trust holds the keys trusted to sign provenance, links and verification
	// summaries, and the log key (both required).
	Trust keys.Trust
	// Store holds the links and the transparency log: a data dir's or a bundle's.
	Store *attest.Store
	// Quarantine is the quarantine list consulted for the subject; nil: none.
	Quarantine *quarantine.List
	// Signer signs decisions; nil leaves them unsigned.
	Signer *keys.Signer
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Wait bounds the wait for links still on their way into the log.
	Wait    time.Duration
	Version string
	// Cache, if set, keeps what signed documents (link envelopes, provenance,
	// summaries) established across decisions, keyed by the digest of their bytes and
	// the trust set, so that deciding again about the same attestations skips their
	// signatures and decoding (attest.VerifyCache). Log inclusion, key retirement
	// bounds and quarantine are established at every decision.
	Cache *attest.VerifyCache
}

// Gate makes promotion decisions. It is safe for concurrent use.
type Gate struct {
	opts Options
	// trustID is the fingerprint of opts.Trust, the cache's key with a digest.
	trustID [32]byte
}

// New checks opts and returns a Gate.
func New(opts Options) (*Gate, error) {
	switch {
	case opts.Policy == nil:
		return nil, status.Error(codes.InvalidArgument, "gate: no policy")
	case len(opts.Trust.Keys) == 0:
		return nil, status.Error(codes.InvalidArgument, "gate: no trusted keys")
	case opts.Trust.Log == nil:
		return nil, status.Error(codes.InvalidArgument, "gate: no log key: pass keys as `kiln attest pubkey --all --json` writes them (it includes the log key), or --log-key")
	case opts.Store == nil:
		return nil, status.Error(codes.InvalidArgument, "gate: no attestation store")
	}
	if _, err := opts.Trust.Log.Verifier(); err != nil {
		return nil, err
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Gate{opts: opts, trustID: opts.Trust.Fingerprint()}, nil
}

// VerifyCache kinds of the documents a request carries.
const (
	cacheProvenance = "provenance"
	cacheVSA        = "vsa"
)

// parseProvenance verifies and decodes a provenance, or finds it in the cache (the
// decoded provenance holds about three times its bytes). With a verifier v, once the
// provenance's signature verified, the links it appears to list start verifying on
// all cores while it is decoded (one goroutine's work): checking the links it does
// list afterwards answers from v's memory.
func (g *Gate) parseProvenance(ctx context.Context, data []byte, v *attest.Verifier) (*attest.Provenance, error) {
	return verifyCached(g, cacheProvenance, data, 3, func() (*attest.Provenance, error) {
		sp, err := attest.VerifyProvenanceSignature(ctx, data, g.opts.Trust)
		if err != nil {
			return nil, err
		}
		if v != nil {
			links, hints := sp.LinkHints()
			v.HintLogIndexes(hints)
			done := make(chan struct{})
			go func() {
				defer close(done)
				v.CheckAll(ctx, links, runtime.GOMAXPROCS(0))
			}()
			defer func() { <-done }()
		}
		return sp.Decode()
	})
}

// checkSummary verifies and decodes a verification summary, or finds it in the cache.
func (g *Gate) checkSummary(ctx context.Context, data []byte) (*rebuild.Summary, error) {
	return verifyCached(g, cacheVSA, data, 2, func() (*rebuild.Summary, error) {
		return rebuild.CheckSummary(ctx, data, g.opts.Trust)
	})
}

// verifyCached returns what verify established about data under the gate's trust set:
// from the cache if it holds it (by data's digest), else verified now and, if it
// verified, kept at an estimated cost of scale times its bytes.
func verifyCached[T any](g *Gate, kind string, data []byte, scale int64, verify func() (T, error)) (T, error) {
	d := cache.DigestOf(data)
	if v, ok := g.opts.Cache.Get(g.trustID, kind, d); ok {
		return v.(T), nil
	}
	v, err := verify()
	if err == nil {
		g.opts.Cache.Put(g.trustID, kind, d, v, scale*d.Size+1024)
	}
	return v, err
}

// Policy returns the gate's policy.
func (g *Gate) Policy() *Policy { return g.opts.Policy }

// Doc is one document given to the gate: where it came from, and its exact bytes (a
// verification summary names the provenance by the SHA-256 of these bytes).
type Doc struct {
	Name string
	Data []byte
}

func (d *Doc) sha256() string {
	s := sha256.Sum256(d.Data)
	return hex.EncodeToString(s[:])
}

// Request is one question: may Subject go to Stage, given these attestations?
type Request struct {
	Stage      string
	Subject    attest.Subject
	Provenance *Doc
	VSAs       []Doc
	SBOM       *Doc
	Lockfile   *Doc
}

// Decision is the gate's answer.
type Decision struct {
	Allow bool `json:"allow"`
	// Decision is ALLOW or DENY.
	Decision   string         `json:"decision"`
	Stage      string         `json:"stage"`
	Subject    attest.Subject `json:"subject"`
	Policy     PolicyRef      `json:"policy"`
	DecidedAt  string         `json:"decided_at"`
	Violations []Violation    `json:"violations"`
	// Attestations are every attestation the gate considered, verified or not.
	Attestations []Considered `json:"attestations"`
	// SignedBy is the key id that signed Envelope ("" when unsigned).
	SignedBy string `json:"signed_by,omitempty"`
	// Envelope is the signed decision (a DSSE envelope of an in-toto statement).
	Envelope []byte `json:"-"`
	// Input is what the policy saw.
	Input *Input `json:"-"`
}

// PolicyRef names the policy that decided.
type PolicyRef struct {
	Name   string `json:"name"`
	SHA256 string `json:"sha256"`
}

// Considered is one attestation the gate looked at.
type Considered struct {
	// Kind is provenance, link, vsa, sbom or lockfile.
	Kind     string `json:"kind"`
	Name     string `json:"name"`
	SHA256   string `json:"sha256"`
	Verified bool   `json:"verified"`
	KeyID    string `json:"keyid,omitempty"`
}

// Decide verifies what req carries, runs the policy and, with a signer, signs the
// decision. An error is a set-up problem (a stage the policy is not for, an unreadable
// lockfile, a store that cannot be read), not a denial.
func (g *Gate) Decide(ctx context.Context, req Request) (*Decision, error) {
	p := g.opts.Policy
	if req.Stage == "" {
		req.Stage = p.Stage
	}
	if p.Stage != "" && req.Stage != p.Stage {
		return nil, status.Errorf(codes.InvalidArgument, "policy %s is for stage %q, not %q", p.Name, p.Stage, req.Stage)
	}
	if req.Subject.SHA256 == "" {
		return nil, status.Error(codes.InvalidArgument, "no subject")
	}
	now := g.opts.Now().UTC()
	in, considered, err := g.facts(ctx, req, now)
	if err != nil {
		return nil, err
	}
	vs, err := p.Evaluate(in)
	if err != nil {
		return nil, err
	}
	d := &Decision{Allow: len(vs) == 0, Decision: "DENY", Stage: req.Stage, Subject: req.Subject,
		Policy: PolicyRef{Name: p.Name, SHA256: p.SHA256}, DecidedAt: now.Format(time.RFC3339Nano),
		Violations: vs, Attestations: considered, Input: in}
	if d.Allow {
		d.Decision = "ALLOW"
	}
	if d.Violations == nil {
		d.Violations = []Violation{}
	}
	if g.opts.Signer != nil {
		if err := g.sign(ctx, d); err != nil {
			return nil, err
		}
	}
	return d, nil
}

// facts builds the policy's input from what verifies, and lists what was considered.
func (g *Gate) facts(ctx context.Context, req Request, now time.Time) (*Input, []Considered, error) {
	trust := g.opts.Trust
	in := &Input{Stage: req.Stage, Now: now.Format(time.RFC3339Nano),
		Subject: SubjectFacts{Name: req.Subject.Name, SHA256: req.Subject.SHA256},
		Log:     LogFacts{Origin: trust.Log.Origin, CheckpointSize: -1}}
	var considered []Considered
	if q := g.opts.Quarantine; q != nil && q.Quarantined(req.Subject.SHA256) {
		in.Subject.Quarantined = true
		if es, err := q.List(); err == nil {
			for _, e := range es {
				if e.Digest == "sha256:"+req.Subject.SHA256 {
					in.Subject.QuarantineReason = e.Reason
				}
			}
		}
	}
	lv, err := trust.Log.Verifier()
	if err != nil {
		return nil, nil, err
	}
	in.Log.Origin = lv.Name()
	v, err := attest.NewVerifier(ctx, g.opts.Store, attest.VerifierOptions{Trust: trust, LogVerifier: lv, WaitCheckpoint: g.opts.Wait, Cache: g.opts.Cache})
	if err != nil {
		in.Log.Error = status.Convert(err).Message()
	} else {
		in.Log.Verified, in.Log.CheckpointSize = true, int64(v.Checkpoint().Size)
	}

	// Provenance: its signature, its type, its subject, when it was signed.
	var prov *attest.Provenance
	if d := req.Provenance; d != nil {
		pf := &in.Provenance
		pf.Present, pf.Name, pf.SHA256 = true, d.Name, d.sha256()
		p, err := g.parseProvenance(ctx, d.Data, v)
		switch {
		case err != nil:
			pf.Error = status.Convert(err).Message()
		case !about(p.Statement.GetSubject(), req.Subject.SHA256):
			pf.Error = fmt.Sprintf("provenance is not about the subject (sha256 %s)", req.Subject.SHA256)
		default:
			prov = p
			pf.Verified = true
			k, _ := trust.Key(p.KeyID)
			pf.Key = keyFacts(k, p.SignedAt)
			if !p.SignedAt.IsZero() {
				pf.SignedAt = p.SignedAt.UTC().Format(time.RFC3339)
				pf.AgeSeconds = now.Sub(p.SignedAt).Seconds()
			}
		}
		considered = append(considered, Considered{Kind: "provenance", Name: d.Name, SHA256: pf.SHA256, Verified: pf.Verified, KeyID: pf.Key.KeyID})
	}

	// The chain: exactly the links the provenance lists, or (without provenance) what
	// the store's product index says produced the subject.
	var verified []*attest.VerifiedLink
	builders := map[string]bool{}
	if prov != nil {
		builders[prov.KeyID] = true
	}
	switch {
	case v == nil:
		in.Chain.Failures = append(in.Chain.Failures, "the transparency log does not verify: "+in.Log.Error)
	case req.Provenance != nil && prov == nil:
		in.Chain.Failures = append(in.Chain.Failures, "the provenance does not verify: "+in.Provenance.Error)
	default:
		var ch *attest.Chain
		var envs []cache.Digest
		if prov != nil {
			in.Chain.From = "provenance"
			v.HintLogIndexes(prov.LogIndexes)
			v.CheckAll(ctx, prov.Links, runtime.GOMAXPROCS(0))
			ch = v.CheckProvenance(ctx, prov, req.Subject)
			envs = prov.Links
		} else {
			in.Chain.From = "index"
			if ch, err = v.Chain(ctx, req.Subject); err != nil {
				return nil, nil, err
			}
			for _, l := range ch.Links {
				envs = append(envs, l.Envelope)
			}
		}
		in.Chain.Verified = ch.OK()
		for _, f := range ch.Failures {
			in.Chain.Failures = append(in.Chain.Failures, f.String())
		}
		for _, e := range envs {
			c := v.Check(ctx, e)
			lf := LinkFacts{Action: c.Claims, Envelope: e.String(), Verified: c.Err == nil, LogIndex: -1}
			if c.Err != nil {
				lf.Error = status.Convert(c.Err).Message()
			}
			if c.Key != nil {
				lf.Key = keyFacts(*c.Key, time.Time{})
				lf.Key.ValidAtSigning = c.KeyValid
			} else {
				lf.Key.NotAfterLogSize = -1
			}
			if c.Logged {
				lf.Logged, lf.LogIndex = true, int64(c.LogIndex)
			}
			if c.Link != nil {
				verified = append(verified, c.Link)
				builders[c.Link.KeyID] = true
				lf.Toolchain = c.Link.Link.Materials[attest.MaterialToolchain][attest.AlgSHA256]
			}
			in.Links = append(in.Links, lf)
			considered = append(considered, Considered{Kind: "link", Name: "link:" + c.Claims, SHA256: e.Hash, Verified: lf.Verified, KeyID: lf.Key.KeyID})
		}
	}
	for k := range builders {
		in.BuilderKeys = append(in.BuilderKeys, k)
	}
	sort.Strings(in.BuilderKeys)

	// Sources and toolchains, from the verified links only.
	sources, toolchains := inputsOf(verified)
	in.Chain.Sources = len(sources)

	if d := req.Lockfile; d != nil {
		in.Lockfile = LockfileFacts{Present: true, Name: d.Name, SHA256: d.sha256()}
		considered = append(considered, Considered{Kind: "lockfile", Name: d.Name, SHA256: in.Lockfile.SHA256, Verified: true})
	}
	lock, err := parseLockfile(req.Lockfile)
	if err != nil {
		return nil, nil, err
	}
	for _, t := range toolchains {
		tf := ToolchainFacts{SHA256: t, LockfileNames: []string{}}
		if lock != nil {
			for _, name := range slices.Sorted(maps.Keys(lock.Toolchains)) {
				if lock.Toolchains[name].Digest == "sha256:"+t {
					tf.LockfileNames = append(tf.LockfileNames, name)
				}
			}
		}
		in.Toolchains = append(in.Toolchains, tf)
	}
	for _, dep := range dependencies(sources) {
		if lock != nil {
			if p, ok := lock.Dependencies[dep.Name]; ok {
				dep.Pinned, dep.PinSHA256 = true, p.SHA256
			}
		}
		in.Dependencies = append(in.Dependencies, dep)
	}

	if d := req.SBOM; d != nil {
		sf := &in.SBOM
		sf.Present, sf.Name, sf.SHA256 = true, d.Name, d.sha256()
		if in.Chain.Verified {
			ch := &attest.Chain{Subject: req.Subject, Sources: sources, Toolchains: toolchains}
			for _, f := range ch.CheckSBOM(d.Data) {
				sf.Errors = append(sf.Errors, f.String())
			}
			sf.Matches = len(sf.Errors) == 0
		} else {
			sf.Errors = append(sf.Errors, "no verified chain to compare it with")
		}
		considered = append(considered, Considered{Kind: "sbom", Name: d.Name, SHA256: sf.SHA256, Verified: sf.Matches})
	}

	for i := range req.VSAs {
		d := &req.VSAs[i]
		vf := VSAFacts{Name: d.Name, SHA256: d.sha256()}
		vf.Key.NotAfterLogSize = -1
		s, err := g.checkSummary(ctx, d.Data)
		if err != nil {
			vf.Error = status.Convert(err).Message()
		} else {
			vf.Verified = true
			k, _ := trust.Key(s.KeyID)
			vf.Key = keyFacts(k, s.TimeVerified)
			vf.Result, vf.Verifier, vf.Policy = s.Result, s.Verifier, s.Policy
			if !s.TimeVerified.IsZero() {
				vf.TimeVerified = s.TimeVerified.UTC().Format(time.RFC3339Nano)
				vf.AgeSeconds = now.Sub(s.TimeVerified).Seconds()
			}
			vf.SubjectMatches = s.Subject.SHA256 == req.Subject.SHA256
			for _, h := range s.Inputs {
				vf.ProvenanceMatches = vf.ProvenanceMatches || (req.Provenance != nil && h == in.Provenance.SHA256)
			}
			vf.ByBuilder = builders[s.KeyID]
		}
		in.VSAs = append(in.VSAs, vf)
		considered = append(considered, Considered{Kind: "vsa", Name: d.Name, SHA256: vf.SHA256, Verified: vf.Verified, KeyID: vf.Key.KeyID})
	}
	in.normalize()
	return in, considered, nil
}

// about reports whether a statement's subjects include the SHA-256.
func about(subjects []*intoto.ResourceDescriptor, sha string) bool {
	for _, s := range subjects {
		if s.GetDigest()[attest.AlgSHA256] == sha {
			return true
		}
	}
	return false
}

// keyFacts describes a trusted key and whether it was valid at a signed time (false
// when the time is unknown).
func keyFacts(k keys.PublicKey, at time.Time) KeyFacts {
	f := KeyFacts{KeyID: k.KeyID, Trusted: k.KeyID != "", NotAfterLogSize: -1}
	if !k.NotBefore.IsZero() {
		f.NotBefore = k.NotBefore.UTC().Format(time.RFC3339)
	}
	if k.NotAfter != nil {
		f.NotAfter = k.NotAfter.UTC().Format(time.RFC3339)
	}
	if k.NotAfterLogSize != nil {
		f.NotAfterLogSize = int64(*k.NotAfterLogSize)
	}
	// Key validity is recorded to the second; so is the signed time compared with it.
	t := at.Truncate(time.Second)
	f.ValidAtSigning = f.Trusted && !at.IsZero() &&
		(k.NotBefore.IsZero() || !t.Before(k.NotBefore)) &&
		(k.NotAfter == nil || !t.After(*k.NotAfter))
	return f
}

// inputsOf returns the sources (materials no verified link produced) and toolchains of
// the verified links.
func inputsOf(links []*attest.VerifiedLink) ([]attest.Artifact, []string) {
	produced := map[string]bool{}
	for _, l := range links {
		for _, hs := range l.Link.Products {
			for alg, h := range hs {
				produced[alg+":"+h] = true
			}
		}
	}
	srcs := map[attest.Artifact]bool{}
	tools := map[string]bool{}
	for _, l := range links {
		for path, hs := range l.Link.Materials {
			switch path {
			case attest.MaterialAction, attest.MaterialCommand:
				continue
			case attest.MaterialToolchain:
				tools[hs[attest.AlgSHA256]] = true
				continue
			}
			for alg, h := range hs {
				if !produced[alg+":"+h] {
					srcs[attest.Artifact{Path: path, Alg: alg, Hash: h}] = true
				}
			}
		}
	}
	var sources []attest.Artifact
	for a := range srcs {
		sources = append(sources, a)
	}
	sort.Slice(sources, func(i, j int) bool {
		if sources[i].Path != sources[j].Path {
			return sources[i].Path < sources[j].Path
		}
		return sources[i].Alg+sources[i].Hash < sources[j].Alg+sources[j].Hash
	})
	return sources, slices.Sorted(maps.Keys(tools))
}

// dependencies groups sources under external/NAME/ (Bazel's external repositories) by
// repository.
func dependencies(sources []attest.Artifact) []DependencyFacts {
	files := map[string]int{}
	for _, s := range sources {
		rest, ok := strings.CutPrefix(s.Path, "external/")
		if !ok {
			continue
		}
		name, _, ok := strings.Cut(rest, "/")
		if ok && name != "" {
			files[name]++
		}
	}
	var out []DependencyFacts
	for _, n := range slices.Sorted(maps.Keys(files)) {
		out = append(out, DependencyFacts{Name: n, Files: files[n]})
	}
	return out
}

// parseLockfile validates a lockfile document; a malformed one is a set-up error.
func parseLockfile(d *Doc) (*lockfiles.Lockfile, error) {
	if d == nil {
		return nil, nil
	}
	l, err := lockfiles.Parse(d.Name, d.Data)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "lockfile: %v", err)
	}
	return l, nil
}

// normalize makes every list non-nil, so policies see [] rather than null.
func (in *Input) normalize() {
	if in.Links == nil {
		in.Links = []LinkFacts{}
	}
	if in.Toolchains == nil {
		in.Toolchains = []ToolchainFacts{}
	}
	if in.Dependencies == nil {
		in.Dependencies = []DependencyFacts{}
	}
	if in.VSAs == nil {
		in.VSAs = []VSAFacts{}
	}
	if in.BuilderKeys == nil {
		in.BuilderKeys = []string{}
	}
	if in.Chain.Failures == nil {
		in.Chain.Failures = []string{}
	}
	if in.SBOM.Errors == nil {
		in.SBOM.Errors = []string{}
	}
}
