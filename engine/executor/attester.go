package executor

import (
	"context"
	"sort"
	"strings"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest"
)

// LinkAttester signs an in-toto link for every execution with package attest and
// references it from the ActionResult, so a cached result keeps its link.
type LinkAttester struct {
	Signer  *attest.Signer
	Version string // kiln's version, recorded in every link
	// CheckKey refuses a revoked executor key (package engine/revoke); nil: none is.
	CheckKey func(keyID string) error
}

// Attest implements Attester.
func (l LinkAttester) Attest(ctx context.Context, rec *Record) error {
	if l.CheckKey != nil {
		k, err := l.Signer.Keyring().Active()
		if err != nil {
			return err
		}
		if err := l.CheckKey(k.ID()); err != nil {
			return err
		}
	}
	r := rec.Result
	a := attest.Action{
		ActionDigest: rec.ActionDigest, CommandDigest: rec.CommandDigest, Toolchain: rec.Toolchain,
		Argv: rec.Argv, ExitCode: int(r.GetExitCode()), PolicyDigest: rec.PolicyDigest,
		KilnVersion: l.Version, Reproducibility: strings.Join(rec.Notes, "; "),
		Stdout: digestOr(r.GetStdoutDigest()), Stderr: digestOr(r.GetStderrDigest()),
		RequestedBy: rec.RequestedBy,
	}
	for _, f := range rec.Inputs {
		a.Inputs = append(a.Inputs, attest.File{Path: f.Path, Digest: f.Digest, SymlinkTarget: f.SymlinkTarget})
	}
	for _, f := range rec.Outputs {
		a.Outputs = append(a.Outputs, attest.File{Path: f.Path, Digest: f.Digest, SymlinkTarget: f.SymlinkTarget})
	}
	for _, p := range rec.Platform {
		a.Platform = append(a.Platform, attest.Property{Name: p.GetName(), Value: p.GetValue()})
	}
	sort.Slice(a.Platform, func(i, j int) bool { return a.Platform[i].Name < a.Platform[j].Name })
	linked, err := l.Signer.Link(ctx, a)
	if err != nil {
		return err
	}
	attest.AttachToResult(r, linked.Digest)
	return nil
}

func digestOr(p interface {
	GetHash() string
	GetSizeBytes() int64
}) cache.Digest {
	if p == nil || p.GetHash() == "" {
		return cache.EmptyDigest
	}
	return cache.Digest{Hash: p.GetHash(), Size: p.GetSizeBytes()}
}
