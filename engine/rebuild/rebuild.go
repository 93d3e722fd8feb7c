package rebuild

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"path/filepath"
	"sort"
	"strings"
	"time"

	vsa "github.com/in-toto/attestation/go/predicates/vsa/v1"
	intoto "github.com/in-toto/attestation/go/v1"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/disk"
	"github.com/kilnbuild/kiln/engine"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/engine/cluster"
	"github.com/kilnbuild/kiln/engine/executor"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	"github.com/kilnbuild/kiln/toolchains"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Verification summary constants (SLSA VSA v1).
const (
	VSAType    = "https://slsa.dev/verification_summary/v1"
	VerifierID = "https://kiln.build/rebuild/v1"
	// PolicyURI names what kiln checks: the provenance and every link verify against
	// the given keys and the transparency log, and every recorded action, re-executed
	// without cache in a fresh sandbox, reproduces every recorded product bit for bit.
	PolicyURI = "https://kiln.build/rebuild-policy/v1"
	Passed    = "PASSED"
	Failed    = "FAILED"
)

// Options configures Rebuild.
type Options struct {
	// Provenance is the DSSE-signed provenance of the artifact (raw bytes) and where
	// it came from (recorded in the summary).
	Provenance    []byte
	ProvenanceURI string
	// Trust holds the executor keys (and log key) the provenance and links must verify
	// against; nothing else is trusted.
	Trust keys.Trust
	// Bundle is an opened bundle directory; empty: the links and blobs are read from
	// the engine's own data dir (a rebuild on the machine that built it).
	Bundle string
	// Executor runs the actions; nil: locally in eng's sandbox.
	Executor Executor
	// Wait bounds the wait for links still being logged (local data dir only).
	Wait    time.Duration
	Version string
	Logger  *slog.Logger
}

// Executor re-executes one recorded action without any cache.
type Executor interface {
	Execute(ctx context.Context, action cache.Digest, src cache.BlobStore) (Run, error)
}

// Run is what a re-execution produced.
type Run struct {
	// Products are the outputs by path relative to the working directory, as
	// "alg:hash" the way links record them.
	Products map[string]string
	ExitCode int
	// Link is the envelope of the link the executor signed for this run, when the
	// run was remote (it must verify, and must not be a recorded one).
	Link cache.Digest
}

// ActionResult is the outcome of one re-executed action.
type ActionResult struct {
	Action      string       `json:"action"`
	Link        string       `json:"link"`
	Products    int          `json:"products"`
	Differences []Difference `json:"differences,omitempty"`
	Error       string       `json:"error,omitempty"`
}

// Difference is one recorded product the rebuild did not reproduce.
type Difference struct {
	Path     string `json:"path"`
	Recorded string `json:"recorded"` // alg:hash, or "" when the rebuild made something not recorded
	Rebuilt  string `json:"rebuilt"`  // alg:hash, or "" when the rebuild did not make it
}

// Result is a rebuild's verdict.
type Result struct {
	Subject    attest.Subject `json:"subject"`
	Verdict    string         `json:"verdict"`
	Reason     string         `json:"reason,omitempty"`
	Actions    []ActionResult `json:"actions"`
	VSA        []byte         `json:"-"`
	SignedBy   string         `json:"signed_by"`
	Quarantine bool           `json:"quarantined"`
}

// Verify checks the provenance and its links against opts.Trust and the log, before
// anything runs; a failure here is an error (the artifact's record cannot be trusted,
// which says nothing yet about the artifact).
func Verify(ctx context.Context, eng *engine.Engine, opts Options) (*attest.Provenance, *attest.Chain, error) {
	prov, err := attest.ParseProvenance(ctx, opts.Provenance, opts.Trust)
	if err != nil {
		return nil, nil, err
	}
	subjects := prov.Statement.GetSubject()
	if len(subjects) != 1 {
		return nil, nil, status.Errorf(codes.InvalidArgument, "provenance has %d subjects; kiln rebuilds one artifact at a time", len(subjects))
	}
	subj := attest.Subject{Name: subjects[0].GetName(), SHA256: subjects[0].GetDigest()[attest.AlgSHA256]}
	if subj.SHA256 == "" {
		return nil, nil, status.Error(codes.InvalidArgument, "provenance subject has no sha256 digest")
	}
	if opts.Trust.Log == nil {
		return nil, nil, status.Error(codes.InvalidArgument, "no log key: pass the keys as `kiln attest pubkey --all --json` writes them (it includes the log key) or --log-key")
	}
	lv, err := opts.Trust.Log.Verifier()
	if err != nil {
		return nil, nil, err
	}
	// The data dir's log, or with shared storage a cluster's published there.
	store := cluster.LogFor(eng.Signer.Store(), lv, eng.Bucket)
	if opts.Bundle != "" {
		bcas, err := disk.Open(ctx, attest.PathsFor(opts.Bundle).CAS, disk.Options{ReadOnly: true})
		if err != nil {
			return nil, nil, err
		}
		store = attest.NewStore(attest.PathsFor(opts.Bundle), bcas)
	}
	v, err := attest.NewVerifier(ctx, store, attest.VerifierOptions{Trust: opts.Trust, LogVerifier: lv, WaitCheckpoint: opts.Wait})
	if err != nil {
		return nil, nil, err
	}
	ch := v.CheckProvenance(ctx, prov, subj)
	if !ch.OK() {
		msgs := make([]string, len(ch.Failures))
		for i, f := range ch.Failures {
			msgs[i] = f.String()
		}
		return prov, ch, status.Errorf(codes.PermissionDenied, "the provenance of %s does not verify: %s", subj.Name, strings.Join(msgs, "; "))
	}
	return prov, ch, nil
}

// Rebuild verifies the provenance, then re-executes every recorded action in
// dependency order and compares each product with the record. It signs a SLSA
// verification summary with eng's key and, on FAILED, quarantines the subject in
// eng's data dir.
func Rebuild(ctx context.Context, eng *engine.Engine, opts Options) (*Result, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	_, ch, err := Verify(ctx, eng, opts)
	if err != nil {
		return nil, err
	}
	if opts.Bundle != "" {
		// Everything is imported, and so verified, before the first action runs: a
		// damaged bundle stops the rebuild without a verdict on the artifact.
		if err := importBundle(ctx, eng, opts.Bundle, ch.Links); err != nil {
			return nil, err
		}
	}
	src := eng.CAS
	ex := opts.Executor
	if ex == nil {
		ex = localExecutor{eng}
	}
	res := &Result{Subject: ch.Subject, Verdict: Passed}
	recorded := map[cache.Digest]bool{}
	for _, l := range ch.Links {
		recorded[l.Envelope] = true
	}
	for _, l := range order(ch.Links) {
		ad, err := ActionDigestOf(l)
		if err != nil {
			return nil, err
		}
		ar := ActionResult{Action: ad.String(), Link: l.Envelope.String(), Products: len(l.Link.Products)}
		log.Info("rebuilding", "action", ad.String(), "argv", l.Link.Command)
		run, err := ex.Execute(ctx, ad, src)
		if err != nil {
			// The rebuild could not run (a missing toolchain, an unreachable or
			// unverifiable executor): that is no verdict on the artifact.
			return nil, grpcerr.Wrap(err, "re-executing action %s", ad)
		}
		if recorded[run.Link] {
			return nil, status.Errorf(codes.FailedPrecondition, "re-executing action %s: the executor answered with the recorded link %s instead of running it again", ad, run.Link)
		}
		ar.Differences = compare(l, run.Products)
		if rc, ok := recordedExitCode(l); ok && rc != run.ExitCode {
			ar.Error = fmt.Sprintf("exit code %d, recorded %d", run.ExitCode, rc)
		}
		if ar.Error != "" || len(ar.Differences) > 0 {
			res.Verdict = Failed
			if res.Reason == "" {
				res.Reason = describe(ar)
			}
		}
		res.Actions = append(res.Actions, ar)
	}
	k, err := eng.Signer.Keyring().Active()
	if err != nil {
		return nil, err
	}
	res.SignedBy = k.ID()
	st, err := summary(res, opts)
	if err != nil {
		return nil, err
	}
	if res.VSA, err = attest.SignStatement(ctx, k, st); err != nil {
		return nil, err
	}
	// Kept with the artifact for the web UI's artifact page (and anyone reading the
	// data dir); the caller gets it too.
	if _, err := eng.Signer.Store().AddSummary(ctx, res.Subject.SHA256, res.VSA); err != nil {
		return nil, err
	}
	if res.Verdict == Failed {
		if _, err := eng.Quarantine.Add("sha256:"+res.Subject.SHA256, res.Subject.Name, "kiln rebuild FAILED: "+res.Reason, "kiln rebuild"); err != nil {
			return nil, err
		}
		res.Quarantine = true
	}
	return res, nil
}

func describe(ar ActionResult) string {
	if ar.Error != "" {
		return "action " + ar.Action + ": " + ar.Error
	}
	d := ar.Differences[0]
	switch {
	case d.Recorded == "":
		return fmt.Sprintf("action %s: made %s, which the record does not have", ar.Action, d.Path)
	case d.Rebuilt == "":
		return fmt.Sprintf("action %s: did not make recorded product %s", ar.Action, d.Path)
	}
	return fmt.Sprintf("action %s: %s is %s, recorded %s", ar.Action, d.Path, d.Rebuilt, d.Recorded)
}

// compare lists the products of l that the rebuild's products do not match.
func compare(l *attest.VerifiedLink, got map[string]string) []Difference {
	rec := map[string]string{}
	for p, hs := range l.Link.Products {
		for alg, h := range hs {
			rec[p] = alg + ":" + h
		}
	}
	var paths []string
	for p := range rec {
		paths = append(paths, p)
	}
	for p := range got {
		if _, ok := rec[p]; !ok {
			paths = append(paths, p)
		}
	}
	sort.Strings(paths)
	var diffs []Difference
	for _, p := range paths {
		if rec[p] != got[p] {
			diffs = append(diffs, Difference{Path: p, Recorded: rec[p], Rebuilt: got[p]})
		}
	}
	return diffs
}

func recordedExitCode(l *attest.VerifiedLink) (int, bool) {
	switch v := l.Link.ByProducts[attest.ByproductReturnValue].(type) {
	case float64:
		return int(v), true
	case int:
		return v, true
	}
	return 0, false
}

// order sorts links so each comes after the links that produced its materials.
func order(links []*attest.VerifiedLink) []*attest.VerifiedLink {
	producer := map[string]int{}
	for i, l := range links {
		for _, hs := range l.Link.Products {
			if h, ok := hs[attest.AlgSHA256]; ok {
				producer[h] = i
			}
		}
	}
	done := make([]bool, len(links))
	var out []*attest.VerifiedLink
	var visit func(i int, depth int)
	visit = func(i, depth int) {
		if done[i] || depth > len(links) {
			return
		}
		done[i] = true
		for _, hs := range links[i].Link.Materials {
			if p, ok := producer[hs[attest.AlgSHA256]]; ok && p != i {
				visit(p, depth+1)
			}
		}
		out = append(out, links[i])
	}
	for i := range links {
		visit(i, 0)
	}
	return out
}

// importBundle brings a bundle's toolchains and the blobs of every action of links
// into eng's store, each verified against its digest on the way in.
func importBundle(ctx context.Context, eng *engine.Engine, dir string, links []*attest.VerifiedLink) error {
	m, err := readManifest(dir)
	if err != nil {
		return err
	}
	for _, t := range m.Toolchains {
		imgs, err := eng.Toolchains.Import(ctx, filepath.Join(dir, "toolchains", strings.TrimPrefix(t, "sha256:")), toolchains.ImportOptions{})
		if err != nil {
			return grpcerr.Wrap(err, "bundle toolchain %s", t)
		}
		found := false
		for _, img := range imgs {
			found = found || img.Digest.String() == t
		}
		if !found {
			return status.Errorf(codes.InvalidArgument, "bundle toolchain directory for %s holds another image", t)
		}
	}
	bcas, err := disk.Open(ctx, attest.PathsFor(dir).CAS, disk.Options{ReadOnly: true})
	if err != nil {
		return err
	}
	defer bcas.Close()
	src := cache.WithEmptyBlob(bcas)
	for _, l := range links {
		ad, err := ActionDigestOf(l)
		if err != nil {
			return err
		}
		ds, err := actionBlobs(ctx, src, ad)
		if err != nil {
			return grpcerr.Wrap(err, "bundle")
		}
		missing, err := eng.CAS.FindMissing(ctx, ds)
		if err != nil {
			return err
		}
		for _, d := range missing {
			r, err := src.Get(ctx, d, 0)
			if err != nil {
				return grpcerr.Wrap(err, "bundle blob %s", d)
			}
			err = eng.CAS.Put(ctx, d, r)
			r.Close()
			if err != nil {
				return grpcerr.Wrap(err, "bundle blob %s", d)
			}
		}
	}
	return nil
}

// summary builds the SLSA verification summary statement of res.
func summary(res *Result, opts Options) (*intoto.Statement, error) {
	sum := sha256.Sum256(opts.Provenance)
	pred := &vsa.VerificationSummary{
		Verifier:           &vsa.VerificationSummary_Verifier{Id: VerifierID},
		TimeVerified:       timestamppb.Now(),
		ResourceUri:        res.Subject.Name,
		Policy:             &vsa.VerificationSummary_Policy{Uri: PolicyURI},
		InputAttestations:  []*vsa.VerificationSummary_InputAttestation{{Uri: opts.ProvenanceURI, Digest: map[string]string{"sha256": hex.EncodeToString(sum[:])}}},
		VerificationResult: res.Verdict,
		VerifiedLevels:     []string{},
		SlsaVersion:        "1.0",
	}
	if res.Verdict == Passed {
		pred.VerifiedLevels = []string{"SLSA_BUILD_LEVEL_2"}
	}
	b, err := protojson.Marshal(pred)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "vsa: %v", err)
	}
	ps := &structpb.Struct{}
	if err := protojson.Unmarshal(b, ps); err != nil {
		return nil, status.Errorf(codes.Internal, "vsa: %v", err)
	}
	// verifier.version is in the VSA v1 spec but not in the Go message.
	if v := ps.GetFields()["verifier"].GetStructValue(); v != nil {
		ver, _ := structpb.NewStruct(map[string]any{"kiln": opts.Version})
		v.Fields["version"] = structpb.NewStructValue(ver)
	}
	st := &intoto.Statement{
		Type:          intoto.StatementTypeUri,
		Subject:       []*intoto.ResourceDescriptor{{Name: res.Subject.Name, Digest: map[string]string{"sha256": res.Subject.SHA256}}},
		PredicateType: VSAType,
		Predicate:     ps,
	}
	return st, st.Validate()
}

// localExecutor re-executes actions in eng's own sandbox.
type localExecutor struct{ eng *engine.Engine }

func (l localExecutor) Execute(ctx context.Context, ad cache.Digest, _ cache.BlobStore) (Run, error) {
	a, err := l.eng.Executor.LoadAction(ctx, ad)
	if err != nil {
		return Run{}, err
	}
	ex, err := l.eng.Executor.Execute(ctx, executor.Request{ActionDigest: ad, NoCache: true, CompareOnly: true, Queued: time.Now(),
		Notes: []string{"kiln rebuild"}}, a)
	if err != nil {
		return Run{}, err
	}
	if ex.Status != nil {
		return Run{}, ex.Status
	}
	return Run{Products: Products(ex.Produced), ExitCode: int(ex.Result.GetExitCode())}, nil
}

// Products renders produced files the way links record them: alg:hash by path.
func Products(fs []executor.ProducedFile) map[string]string {
	out := map[string]string{}
	for _, f := range fs {
		if f.SymlinkTarget != "" {
			h := sha256.Sum256([]byte(f.SymlinkTarget))
			out[f.Path] = attest.AlgSymlink + ":" + hex.EncodeToString(h[:])
			continue
		}
		out[f.Path] = attest.AlgSHA256 + ":" + f.Digest.Hash
	}
	return out
}

// Summary is a verified verification summary: who signed it, for what, with what result.
type Summary struct {
	KeyID   string
	Subject attest.Subject
	Result  string
	Policy  string
	// Verifier is verifier.id; TimeVerified is timeVerified (zero if absent).
	Verifier     string
	TimeVerified time.Time
	// Inputs are the SHA-256s (hex) of the input attestations (the provenance rebuilt).
	Inputs []string
}

// CheckSummary verifies a DSSE-signed verification summary against trust and decodes
// it; it does not judge the result (PASSED or FAILED), the caller does.
func CheckSummary(ctx context.Context, raw []byte, trust keys.Trust) (*Summary, error) {
	e, err := attest.ParseEnvelope(raw)
	if err != nil {
		return nil, err
	}
	key, payload, err := attest.VerifyEnvelope(ctx, e, trust)
	if err != nil {
		return nil, err
	}
	st := &intoto.Statement{}
	if err := protojson.Unmarshal(payload, st); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "summary: not an in-toto statement: %v", err)
	}
	if st.GetPredicateType() != VSAType || len(st.GetSubject()) != 1 {
		return nil, status.Errorf(codes.InvalidArgument, "summary: predicate type %q with %d subjects, want %s with one", st.GetPredicateType(), len(st.GetSubject()), VSAType)
	}
	f := st.GetPredicate().GetFields()
	s := &Summary{KeyID: key.KeyID, Result: f["verificationResult"].GetStringValue(),
		Policy:  f["policy"].GetStructValue().GetFields()["uri"].GetStringValue(),
		Subject: attest.Subject{Name: st.GetSubject()[0].GetName(), SHA256: st.GetSubject()[0].GetDigest()["sha256"]}}
	if s.Result != Passed && s.Result != Failed {
		return nil, status.Errorf(codes.InvalidArgument, "summary: verification result %q", s.Result)
	}
	s.Verifier = f["verifier"].GetStructValue().GetFields()["id"].GetStringValue()
	if tv := f["timeVerified"].GetStringValue(); tv != "" {
		t, err := time.Parse(time.RFC3339Nano, tv)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "summary: timeVerified %q: %v", tv, err)
		}
		s.TimeVerified = t
	}
	for _, in := range f["inputAttestations"].GetListValue().GetValues() {
		if h := in.GetStructValue().GetFields()["digest"].GetStructValue().GetFields()["sha256"].GetStringValue(); h != "" {
			s.Inputs = append(s.Inputs, h)
		}
	}
	return s, nil
}
