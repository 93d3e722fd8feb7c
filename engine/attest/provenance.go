package attest

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"time"

	slsa "github.com/in-toto/attestation/go/predicates/provenance/v1"
	intoto "github.com/in-toto/attestation/go/v1"
	"github.com/in-toto/in-toto-golang/in_toto"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
)

// Provenance vocabulary (documented in docs/attestation.md).
const (
	// BuildType says how to read a kiln provenance's parameters: the subject was
	// produced by REAPI actions executed by kiln, described by their in-toto links.
	BuildType = "https://kiln.build/reapi-action/v1"
	// BuilderID identifies kiln's executor as the builder.
	BuilderID = "https://kiln.build/executor/v1"
	// SLSAProvenanceType is the predicate type of kiln's provenance statements.
	SLSAProvenanceType = "https://slsa.dev/provenance/v1"
	// LinkMediaType is the media type of a link byproduct (a DSSE envelope).
	LinkMediaType = "application/vnd.dsse.envelope.v1+json"
	// OCIManifestMediaType is the media type of a toolchain dependency.
	OCIManifestMediaType = "application/vnd.oci.image.manifest.v1+json"
	// ToolchainName names toolchain dependencies (their digest identifies them).
	ToolchainName = "kiln:toolchain"
)

// Statement builds the SLSA provenance v1 statement for a verified chain:
// externalParameters.actions = the top-level actions (action and command digest, argv,
// platform, link); resolvedDependencies = the toolchains and the source files (by path,
// with digests); runDetails.byproducts = every link of the chain (envelope digest, log
// index, key id). No timestamps: the same chain gives the same statement.
func (c *Chain) Statement(logOrigin string) (*intoto.Statement, error) {
	if !c.OK() {
		return nil, status.Errorf(codes.FailedPrecondition, "the chain of %s did not verify: %s", c.Subject.Name, c.Failures[0])
	}
	var actions []any
	versions := map[string]bool{}
	keyIDs := map[string]bool{}
	for _, l := range c.Top {
		plat, _ := l.Link.Environment[EnvPlatform].([]any)
		actions = append(actions, map[string]any{
			"actionDigest":  l.Link.ByProducts[ByproductActionDigest],
			"commandDigest": l.Link.ByProducts[ByproductCommandDigest],
			"argv":          stringsToAny(l.Link.Command),
			"platform":      orEmpty(plat),
			"link":          l.Envelope.String(),
		})
	}
	var deps []*intoto.ResourceDescriptor
	for _, t := range c.Toolchains {
		deps = append(deps, &intoto.ResourceDescriptor{Name: ToolchainName, Uri: "oci:sha256:" + t, Digest: map[string]string{AlgSHA256: t}, MediaType: OCIManifestMediaType})
	}
	for _, s := range c.Sources {
		deps = append(deps, &intoto.ResourceDescriptor{Name: s.Path, Digest: map[string]string{s.Alg: s.Hash}})
	}
	var byproducts []*intoto.ResourceDescriptor
	for _, l := range c.Links {
		if v, ok := l.Link.Environment[EnvKilnVersion].(string); ok && v != "" {
			versions[v] = true
		}
		keyIDs[l.KeyID] = true
		ann, err := structpb.NewStruct(map[string]any{
			"envelopeSize": float64(l.Envelope.Size),
			"logIndex":     float64(l.LogIndex),
			"logOrigin":    logOrigin,
			"keyid":        l.KeyID,
			"action":       l.Link.Name,
		})
		if err != nil {
			return nil, status.Errorf(codes.Internal, "provenance: %v", err)
		}
		byproducts = append(byproducts, &intoto.ResourceDescriptor{
			Name:        "link:" + l.Link.Name,
			Digest:      map[string]string{AlgSHA256: l.Envelope.Hash},
			MediaType:   LinkMediaType,
			Annotations: ann,
		})
	}
	ext, err := structpb.NewStruct(map[string]any{"actions": actions})
	if err != nil {
		return nil, status.Errorf(codes.Internal, "provenance: %v", err)
	}
	internal, err := structpb.NewStruct(map[string]any{
		"kilnVersions": stringsToAny(sortedKeys(versions)),
		"executorKeys": stringsToAny(sortedKeys(keyIDs)),
	})
	if err != nil {
		return nil, status.Errorf(codes.Internal, "provenance: %v", err)
	}
	prov := &slsa.Provenance{
		BuildDefinition: &slsa.BuildDefinition{
			BuildType:            BuildType,
			ExternalParameters:   ext,
			InternalParameters:   internal,
			ResolvedDependencies: deps,
		},
		RunDetails: &slsa.RunDetails{
			Builder:    &slsa.Builder{Id: BuilderID},
			Byproducts: byproducts,
		},
	}
	if err := prov.Validate(); err != nil {
		return nil, status.Errorf(codes.Internal, "provenance: %v", err)
	}
	pred, err := toStruct(prov)
	if err != nil {
		return nil, err
	}
	st := &intoto.Statement{
		Type:          intoto.StatementTypeUri,
		Subject:       []*intoto.ResourceDescriptor{{Name: c.Subject.Name, Digest: map[string]string{AlgSHA256: c.Subject.SHA256}}},
		PredicateType: SLSAProvenanceType,
		Predicate:     pred,
	}
	if err := st.Validate(); err != nil {
		return nil, status.Errorf(codes.Internal, "provenance statement: %v", err)
	}
	return st, nil
}

func stringsToAny(ss []string) []any {
	out := make([]any, len(ss))
	for i, s := range ss {
		out[i] = s
	}
	return out
}

func orEmpty(v []any) []any {
	if v == nil {
		return []any{}
	}
	return v
}

func toStruct(m proto.Message) (*structpb.Struct, error) {
	b, err := protojson.Marshal(m)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "provenance: %v", err)
	}
	s := &structpb.Struct{}
	if err := protojson.Unmarshal(b, s); err != nil {
		return nil, status.Errorf(codes.Internal, "provenance: %v", err)
	}
	return s, nil
}

// StatementPayload returns the canonical JSON of st (protojson output is not byte-stable
// across runs, so it is canonicalized before signing).
func StatementPayload(st *intoto.Statement) ([]byte, error) {
	b, err := protojson.Marshal(st)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "statement: %v", err)
	}
	return CanonicalJSON(json.RawMessage(b))
}

// SignStatement signs st as a DSSE envelope with key k.
func SignStatement(ctx context.Context, k *keys.Signer, st *intoto.Statement) ([]byte, error) {
	p, err := StatementPayload(st)
	if err != nil {
		return nil, err
	}
	return SignEnvelope(ctx, k, p)
}

// Provenance is a verified provenance statement: what it claims, decoded.
type Provenance struct {
	KeyID string
	// Statement holds the subjects and types; the predicate is decoded into Predicate
	// only (Statement.Predicate is an empty Struct).
	Statement *intoto.Statement
	Predicate *slsa.Provenance
	// Links are the link envelopes it lists as byproducts.
	Links []cache.Digest
	// LogIndexes are where it says those links were logged (its logIndex
	// annotations): hints for finding their log entries, whose inclusion is proved
	// all the same (Verifier.HintLogIndexes).
	LogIndexes map[cache.Digest]uint64
	// Sources and Toolchains are its resolved dependencies.
	Sources    []Artifact
	Toolchains []string
	// SignedAt is runDetails.metadata.finishedOn: when the provenance was signed (zero
	// if it does not say).
	SignedAt time.Time
}

// ParseProvenance verifies a provenance envelope's signature against trust and decodes
// it, checking that it is SLSA provenance v1 of kiln's build type.
func ParseProvenance(ctx context.Context, raw []byte, trust keys.Trust) (*Provenance, error) {
	sp, err := VerifyProvenanceSignature(ctx, raw, trust)
	if err != nil {
		return nil, err
	}
	return sp.Decode()
}

// SignedProvenance is a provenance envelope whose signature by a trusted key verified,
// its payload not yet decoded (ParseProvenance is VerifyProvenanceSignature, then
// Decode; kiln gate starts verifying the links in between).
type SignedProvenance struct {
	KeyID   string
	Payload []byte
}

// VerifyProvenanceSignature checks that raw is an envelope signed by a key of trust.
func VerifyProvenanceSignature(ctx context.Context, raw []byte, trust keys.Trust) (*SignedProvenance, error) {
	e, err := ParseEnvelope(raw)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "provenance: %v", status.Convert(err).Message())
	}
	key, payload, err := VerifyEnvelope(ctx, e, trust)
	if err != nil {
		return nil, grpcerr.Wrap(err, "provenance")
	}
	return &SignedProvenance{KeyID: key.KeyID, Payload: payload}, nil
}

// LinkHints returns the link envelopes and log indexes the payload appears to list,
// found by scanning its bytes for the byproduct descriptors kiln writes rather than by
// decoding it, so that verifying them can start while Decode runs (decoding 1,000
// byproducts takes as long as verifying a third of them). They are only a guess of
// what Decode will return: use them to start work whose result does not depend on who
// asked (Verifier.CheckAll, HintLogIndexes), never as facts.
func (sp *SignedProvenance) LinkHints() ([]cache.Digest, map[cache.Digest]uint64) {
	var links []cache.Digest
	hints := map[cache.Digest]uint64{}
	rest := sp.Payload
	for {
		i := bytes.Index(rest, []byte(`"envelopeSize":`))
		if i < 0 {
			return links, hints
		}
		rest = rest[i+len(`"envelopeSize":`):]
		size, ok := leadingUint(rest)
		// The descriptor's digest follows its annotations (keys in canonical order).
		j := bytes.Index(rest, []byte(`"digest":{"sha256":"`))
		if !ok || j < 0 || len(rest) < j+len(`"digest":{"sha256":"`)+64 {
			continue
		}
		ann := rest[:j]
		h := string(rest[j+len(`"digest":{"sha256":"`):][:64])
		d, err := cache.NewDigest(h, int64(size))
		if err != nil {
			continue
		}
		links = append(links, d)
		if k := bytes.Index(ann, []byte(`"logIndex":`)); k >= 0 {
			if idx, ok := leadingUint(ann[k+len(`"logIndex":`):]); ok {
				hints[d] = idx
			}
		}
	}
}

// leadingUint reads the decimal digits at the start of b.
func leadingUint(b []byte) (uint64, bool) {
	n, i := uint64(0), 0
	for ; i < len(b) && i < 16 && '0' <= b[i] && b[i] <= '9'; i++ {
		n = n*10 + uint64(b[i]-'0')
	}
	return n, i > 0
}

// Decode decodes the signed payload, checking that it is SLSA provenance v1 of kiln's
// build type.
func (sp *SignedProvenance) Decode() (*Provenance, error) {
	payload := sp.Payload
	st, predicate, err := decodeStatement(payload)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "provenance: %v", err)
	}
	if st.PredicateType != SLSAProvenanceType {
		return nil, status.Errorf(codes.InvalidArgument, "provenance: predicate type %q, want %q", st.PredicateType, SLSAProvenanceType)
	}
	pred := &slsa.Provenance{}
	if err := protojson.Unmarshal(predicate, pred); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "provenance: not SLSA provenance v1: %v", err)
	}
	if bt := pred.GetBuildDefinition().GetBuildType(); bt != BuildType {
		return nil, status.Errorf(codes.InvalidArgument, "provenance: build type %q, want %q", bt, BuildType)
	}
	p := &Provenance{KeyID: sp.KeyID, Statement: st, Predicate: pred}
	if t := pred.GetRunDetails().GetMetadata().GetFinishedOn(); t != nil {
		if err := t.CheckValid(); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "provenance: runDetails.metadata.finishedOn: %v", err)
		}
		p.SignedAt = t.AsTime()
	}
	for _, b := range pred.GetRunDetails().GetByproducts() {
		if b.GetMediaType() != LinkMediaType {
			continue
		}
		h := b.GetDigest()[AlgSHA256]
		ann := b.GetAnnotations().GetFields()
		size, _ := ann["envelopeSize"].GetKind().(*structpb.Value_NumberValue)
		if size == nil {
			return nil, status.Errorf(codes.InvalidArgument, "provenance: byproduct %s has no envelopeSize", b.GetName())
		}
		d, err := cache.NewDigest(h, int64(size.NumberValue))
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "provenance: byproduct %s: %v", b.GetName(), status.Convert(err).Message())
		}
		p.Links = append(p.Links, d)
		if i, ok := ann["logIndex"].GetKind().(*structpb.Value_NumberValue); ok && i.NumberValue >= 0 && i.NumberValue <= maxSafeInteger && i.NumberValue == math.Trunc(i.NumberValue) {
			if p.LogIndexes == nil {
				p.LogIndexes = map[cache.Digest]uint64{}
			}
			p.LogIndexes[d] = uint64(i.NumberValue)
		}
	}
	for _, d := range pred.GetBuildDefinition().GetResolvedDependencies() {
		if d.GetName() == ToolchainName {
			p.Toolchains = append(p.Toolchains, d.GetDigest()[AlgSHA256])
			continue
		}
		for alg, h := range d.GetDigest() {
			p.Sources = append(p.Sources, Artifact{Path: d.GetName(), Alg: alg, Hash: h})
		}
	}
	return p, nil
}

// decodeStatement decodes an in-toto Statement v1 whose predicate the caller decodes
// into its own type: the statement's fields are checked as Statement.Validate does, and
// its predicate is returned as JSON, not decoded into a generic Struct (for a provenance
// of 1,000 links, that and converting it back cost more than everything else the gate
// does with it). The returned statement's Predicate is an empty Struct.
func decodeStatement(payload []byte) (*intoto.Statement, json.RawMessage, error) {
	var parts struct {
		Type          string            `json:"_type"`
		Subject       []json.RawMessage `json:"subject"`
		PredicateType string            `json:"predicateType"`
		Predicate     json.RawMessage   `json:"predicate"`
	}
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&parts); err != nil {
		return nil, nil, fmt.Errorf("not an in-toto statement: %v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, nil, fmt.Errorf("not an in-toto statement: data after the statement")
	}
	if p := bytes.TrimSpace(parts.Predicate); len(p) == 0 || p[0] != '{' {
		return nil, nil, fmt.Errorf("not an in-toto statement: no predicate object")
	}
	st := &intoto.Statement{Type: parts.Type, PredicateType: parts.PredicateType, Predicate: &structpb.Struct{}}
	for _, raw := range parts.Subject {
		rd := &intoto.ResourceDescriptor{}
		if err := protojson.Unmarshal(raw, rd); err != nil {
			return nil, nil, fmt.Errorf("not an in-toto statement: subject: %v", err)
		}
		st.Subject = append(st.Subject, rd)
	}
	if err := st.Validate(); err != nil {
		return nil, nil, err
	}
	return st, parts.Predicate, nil
}

// CheckProvenance verifies a chain exactly as a provenance states it: every link it
// lists verifies (signature, log), the subject is a product of one of them, and each
// material of each listed link is a listed toolchain, a listed source (same path and
// hash) or a product of another listed link. Unlike Chain, it does not consult the
// product index: a link missing from the provenance leaves its products unexplained.
func (v *Verifier) CheckProvenance(ctx context.Context, p *Provenance, subj Subject) *Chain {
	ch := &Chain{Subject: subj, Toolchains: append([]string(nil), p.Toolchains...), Sources: append([]Artifact(nil), p.Sources...)}
	found := false
	for _, s := range p.Statement.GetSubject() {
		if s.GetDigest()[AlgSHA256] == subj.SHA256 {
			found = true
		}
	}
	if !found {
		ch.fail("", "provenance is not about subject %s (sha256 %s)", subj.Name, subj.SHA256)
	}
	v.HintLogIndexes(p.LogIndexes)
	products := map[[2]string][]*VerifiedLink{}
	for _, d := range p.Links {
		l, err := v.Link(ctx, d)
		if err != nil {
			ch.fail(d.String(), "%s", status.Convert(err).Message())
			continue
		}
		ch.Links = append(ch.Links, l)
		for _, h := range l.Link.Products {
			alg, hash := artifactOf(h)
			products[[2]string{alg, hash}] = append(products[[2]string{alg, hash}], l)
		}
		for _, h := range l.Link.Products {
			if h[AlgSHA256] == subj.SHA256 {
				ch.Top = append(ch.Top, l)
				break
			}
		}
	}
	if found && len(ch.Top) == 0 {
		ch.fail("", "no link listed in the provenance produced the subject %s (sha256 %s)", subj.Name, subj.SHA256)
	}
	tools := map[string]bool{}
	for _, t := range p.Toolchains {
		tools[t] = true
	}
	srcs := map[Artifact]bool{}
	for _, s := range p.Sources {
		srcs[s] = true
	}
	for _, l := range ch.Links {
		for _, path := range sortedKeys(l.Link.Materials) {
			h := l.Link.Materials[path]
			switch path {
			case MaterialAction, MaterialCommand:
				continue
			case MaterialToolchain:
				if !tools[h[AlgSHA256]] {
					ch.fail(l.Link.Name, "toolchain sha256:%s is not among the provenance's resolved dependencies", h[AlgSHA256])
				}
				continue
			}
			alg, hash := artifactOf(h)
			if srcs[Artifact{Path: path, Alg: alg, Hash: hash}] {
				continue
			}
			produced := false
			for _, pl := range products[[2]string{alg, hash}] {
				if pl.Envelope != l.Envelope {
					produced = true
				}
			}
			if !produced {
				ch.fail(l.Link.Name, "material %s (%s %s) is neither a declared source nor a product of another listed link", path, alg, hash)
			}
		}
	}
	sortLinks(ch.Top)
	sortLinks(ch.Links)
	return ch
}

// LinkFile is how in-toto's InTotoVerify finds a link on disk: "<name>.<keyid[:8]>.link".
func LinkFile(l *VerifiedLink) string {
	return fmt.Sprintf(in_toto.LinkNameFormat, l.Link.Name, l.KeyID)
}

// EnvelopePayload decodes an envelope's payload without verifying it (for display).
func EnvelopePayload(raw []byte) ([]byte, error) {
	e, err := ParseEnvelope(raw)
	if err != nil {
		return nil, err
	}
	return base64.StdEncoding.DecodeString(e.Payload)
}

// BuildProvenance verifies the chain that produced subj from the links in store, with
// every key of kr trusted and kr's log key, and signs SLSA provenance for it with kr's
// active key. wait bounds the wait for links still on their way into the log. A chain
// that does not verify is returned with an error (its Failures say why).
func BuildProvenance(ctx context.Context, store *Store, kr *keys.Keyring, subj Subject, wait time.Duration) (*Chain, []byte, *keys.Signer, error) {
	return BuildProvenanceWith(ctx, store, kr, keys.Trust{}, subj, wait)
}

// BuildProvenanceWith is BuildProvenance trusting also the keys of extra, and its log
// key instead of kr's when it has one (a cluster's workers and sequencer).
func BuildProvenanceWith(ctx context.Context, store *Store, kr *keys.Keyring, extra keys.Trust, subj Subject, wait time.Duration) (*Chain, []byte, *keys.Signer, error) {
	ks, err := kr.Keys()
	if err != nil {
		return nil, nil, nil, err
	}
	lk := kr.Log()
	if extra.Log != nil {
		lk = *extra.Log
	}
	trust := keys.Trust{Keys: ks, Log: &lk}
	trust.Add(extra)
	lv, err := lk.Verifier()
	if err != nil {
		return nil, nil, nil, err
	}
	v, err := NewVerifier(ctx, store, VerifierOptions{Trust: trust, LogVerifier: lv, WaitCheckpoint: wait})
	if err != nil {
		return nil, nil, nil, err
	}
	ch, err := v.Chain(ctx, subj)
	if err != nil {
		return nil, nil, nil, err
	}
	if !ch.OK() {
		return ch, nil, nil, status.Errorf(codes.FailedPrecondition, "cannot write provenance for %s: %d verification failure(s)", subj.Name, len(ch.Failures))
	}
	st, err := ch.Statement(lv.Name())
	if err != nil {
		return nil, nil, nil, err
	}
	// The one time in the provenance: when it was signed (every link it lists was in
	// the log by then, so the build finished at or before it). kiln gate bounds the
	// provenance's age and checks its key's validity with it.
	st.Predicate.Fields["runDetails"].GetStructValue().Fields["metadata"] = structpb.NewStructValue(&structpb.Struct{Fields: map[string]*structpb.Value{
		"finishedOn": structpb.NewStringValue(kr.Now().UTC().Truncate(time.Second).Format(time.RFC3339)),
	}})
	k, err := kr.Active()
	if err != nil {
		return nil, nil, nil, err
	}
	env, err := SignStatement(ctx, k, st)
	if err != nil {
		return nil, nil, nil, err
	}
	return ch, env, k, nil
}
