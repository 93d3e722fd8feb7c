package gate

import (
	"context"

	intoto "github.com/in-toto/attestation/go/v1"
	"github.com/kilnbuild/kiln/engine/attest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
)

// Decision statement vocabulary (docs/gate.md).
const (
	// DecisionType is the predicate type of a signed gate decision.
	DecisionType = "https://kiln.build/gate-decision/v1"
	// GateID identifies kiln's gate as the decider.
	GateID = "https://kiln.build/gate/v1"
)

// Statement returns the decision as an in-toto Statement v1: the subject, and a
// predicate naming the gate, the stage, the policy by digest, the verdict with every
// violation, the log checkpoint links were proved against, and every attestation
// considered.
func (d *Decision) Statement(version string) (*intoto.Statement, error) {
	vs, atts := []any{}, []any{}
	for _, v := range d.Violations {
		vs = append(vs, map[string]any{"rule": v.Rule, "attestation": v.Attestation, "reason": v.Reason})
	}
	for _, a := range d.Attestations {
		m := map[string]any{"kind": a.Kind, "name": a.Name, "digest": map[string]any{"sha256": a.SHA256}, "verified": a.Verified}
		if a.KeyID != "" {
			m["keyid"] = a.KeyID
		}
		atts = append(atts, m)
	}
	pred := map[string]any{
		"gate":         map[string]any{"id": GateID, "version": version},
		"decision":     d.Decision,
		"stage":        d.Stage,
		"decidedAt":    d.DecidedAt,
		"policy":       map[string]any{"uri": d.Policy.Name, "digest": map[string]any{"sha256": d.Policy.SHA256}},
		"violations":   vs,
		"attestations": atts,
	}
	if in := d.Input; in != nil {
		pred["log"] = map[string]any{"origin": in.Log.Origin, "checkpointSize": float64(in.Log.CheckpointSize), "verified": in.Log.Verified}
	}
	ps, err := structpb.NewStruct(pred)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "decision: %v", err)
	}
	st := &intoto.Statement{
		Type:          intoto.StatementTypeUri,
		Subject:       []*intoto.ResourceDescriptor{{Name: d.Subject.Name, Digest: map[string]string{attest.AlgSHA256: d.Subject.SHA256}}},
		PredicateType: DecisionType,
		Predicate:     ps,
	}
	if err := st.Validate(); err != nil {
		return nil, status.Errorf(codes.Internal, "decision statement: %v", err)
	}
	return st, nil
}

// sign signs d's statement with the gate's key, the way kiln signs provenance and
// verification summaries (canonical JSON in a DSSE envelope).
func (g *Gate) sign(ctx context.Context, d *Decision) error {
	st, err := d.Statement(g.opts.Version)
	if err != nil {
		return err
	}
	env, err := attest.SignStatement(ctx, g.opts.Signer, st)
	if err != nil {
		return err
	}
	d.Envelope, d.SignedBy = env, g.opts.Signer.ID()
	return nil
}
