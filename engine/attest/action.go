// Package attest proves what kiln executed: for every action a signed in-toto link (a
// DSSE envelope stored in the CAS, indexed by product and action, appended to the
// transparency log), and from the links SLSA provenance, a CycloneDX SBOM and their
// verification.
//
// The engine calls Signer.Link once per executed action with an Action it fills from
// what it ran, and attaches the returned envelope digest to the ActionResult with
// AttachToResult. Everything else (provenance, verification, the CLI) reads back what
// Link wrote. docs/attestation.md describes the formats.
package attest

import (
	"crypto/sha256"
	"encoding/hex"
	"path"
	"sort"
	"strings"
	"unicode/utf8"

	"github.com/in-toto/in-toto-golang/in_toto"
	"github.com/kilnbuild/kiln/cache"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Action is what the engine knows about one executed action, in a form independent of
// REAPI messages. The same Action gives the same link payload on every host.
type Action struct {
	// ActionDigest and CommandDigest name the REAPI Action and Command blobs (required).
	ActionDigest  cache.Digest
	CommandDigest cache.Digest
	// Toolchain is the OCI manifest digest of the toolchain image the action ran in,
	// "sha256:<hex>"; empty if it ran without one.
	Toolchain string
	// Inputs are every file of the input root by its path relative to the root (input
	// directories flattened into their files; symlinks with SymlinkTarget set).
	Inputs []File
	// Outputs are every output, flattened the same way: an output directory contributes
	// each file (and symlink) under it by its full path; an empty directory contributes
	// nothing.
	Outputs []File
	// Argv is the command line as run (Command.arguments).
	Argv []string
	// ExitCode is the command's exit status.
	ExitCode int
	// Stdout and Stderr are the digests of the captured output streams (the empty
	// digest when a stream was empty).
	Stdout, Stderr cache.Digest
	// PolicyDigest is the digest of the sandbox policy the action ran under (seccomp
	// profile, mounts, limits) as the engine stores it; zero if none.
	PolicyDigest cache.Digest
	// Platform is the action's platform properties, in any order.
	Platform []Property
	// KilnVersion is the executor's version string.
	KilnVersion string
	// Reproducibility, if set, records a rebuild check of this action (issue 7), e.g.
	// "reproducible" or "nondeterministic: out/a.o differs"; empty when not checked.
	Reproducibility string
	// RequestedBy is the identity of the client whose Execute caused the run (package
	// engine/auth's string form); empty when the server knows none (no authentication).
	RequestedBy string
}

// File is one input or output of an action.
type File struct {
	// Path is relative to the input root (for outputs: to the working directory the
	// REAPI output paths are relative to, i.e. the path the client sees), clean, with
	// forward slashes.
	Path string
	// Digest is the file's content digest; unused for symlinks.
	Digest cache.Digest
	// SymlinkTarget is the link target if the entry is a symlink, else empty.
	SymlinkTarget string
}

// Property is one platform property.
type Property struct{ Name, Value string }

// Reserved material names. An input file at the root with one of these exact names
// cannot be attested (Link refuses it); names that cannot collide at all (with "//")
// would be mangled by in-toto's rule matching, which cleans patterns.
const (
	MaterialAction    = "kiln:action"    // the REAPI Action blob
	MaterialCommand   = "kiln:command"   // the REAPI Command blob
	MaterialToolchain = "kiln:toolchain" // the toolchain image's OCI manifest
)

func reservedMaterial(name string) bool {
	return name == MaterialAction || name == MaterialCommand || name == MaterialToolchain
}

// Hash algorithm names used in link artifacts.
const (
	// AlgSHA256 is a file's content hash.
	AlgSHA256 = "sha256"
	// AlgSymlink is the SHA-256 of a symlink's target string: in-toto artifacts carry
	// only hashes, and a symlink has no content of its own.
	AlgSymlink = "kiln-symlink-target-sha256"
)

// Byproduct and environment keys in a kiln link.
const (
	ByproductReturnValue     = "return-value" // in-toto's conventional name for the exit code
	ByproductActionDigest    = "kiln:action-digest"
	ByproductCommandDigest   = "kiln:command-digest"
	ByproductStdout          = "kiln:stdout-digest"
	ByproductStderr          = "kiln:stderr-digest"
	ByproductPolicy          = "kiln:policy-digest"
	ByproductReproducibility = "kiln:reproducibility"
	EnvKilnVersion           = "kiln:version"
	EnvPlatform              = "kiln:platform"
	EnvRequestedBy           = "kiln:requested-by"
)

// Link builds the in-toto link for a: name = the action digest's hash; materials = every
// input plus the Action, Command and toolchain under the reserved names; products =
// every output; command = argv; byproducts = exit code and the digests of Action,
// Command, stdout, stderr and sandbox policy; environment = kiln version, platform and,
// if known, the identity that requested the run.
// The executor key is not in the payload (it is the DSSE signature's keyid), so two
// executors with different keys produce the same payload for the same action and requester.
func (a Action) Link() (in_toto.Link, error) {
	if _, err := cache.NewDigest(a.ActionDigest.Hash, a.ActionDigest.Size); err != nil {
		return in_toto.Link{}, status.Errorf(codes.InvalidArgument, "action digest: %v", status.Convert(err).Message())
	}
	if _, err := cache.NewDigest(a.CommandDigest.Hash, a.CommandDigest.Size); err != nil {
		return in_toto.Link{}, status.Errorf(codes.InvalidArgument, "command digest: %v", status.Convert(err).Message())
	}
	if err := a.checkUTF8(); err != nil {
		return in_toto.Link{}, err
	}
	materials, err := artifacts("input", a.Inputs)
	if err != nil {
		return in_toto.Link{}, err
	}
	for _, f := range a.Inputs {
		if reservedMaterial(f.Path) {
			return in_toto.Link{}, status.Errorf(codes.InvalidArgument, "input %q has the name of a reserved link material and cannot be attested", f.Path)
		}
	}
	products, err := artifacts("output", a.Outputs)
	if err != nil {
		return in_toto.Link{}, err
	}
	materials[MaterialAction] = in_toto.HashObj{AlgSHA256: a.ActionDigest.Hash}
	materials[MaterialCommand] = in_toto.HashObj{AlgSHA256: a.CommandDigest.Hash}
	if a.Toolchain != "" {
		h, err := ociSHA256(a.Toolchain)
		if err != nil {
			return in_toto.Link{}, err
		}
		materials[MaterialToolchain] = in_toto.HashObj{AlgSHA256: h}
	}
	by := map[string]any{
		ByproductReturnValue:   a.ExitCode,
		ByproductActionDigest:  a.ActionDigest.String(),
		ByproductCommandDigest: a.CommandDigest.String(),
	}
	for _, s := range []struct {
		key string
		d   cache.Digest
	}{{ByproductStdout, a.Stdout}, {ByproductStderr, a.Stderr}, {ByproductPolicy, a.PolicyDigest}} {
		if s.d == (cache.Digest{}) {
			if s.key == ByproductPolicy {
				continue
			}
			s.d = cache.EmptyDigest
		}
		if _, err := cache.NewDigest(s.d.Hash, s.d.Size); err != nil {
			return in_toto.Link{}, status.Errorf(codes.InvalidArgument, "%s: %v", s.key, status.Convert(err).Message())
		}
		by[s.key] = s.d.String()
	}
	if a.Reproducibility != "" {
		by[ByproductReproducibility] = a.Reproducibility
	}
	props := append([]Property(nil), a.Platform...)
	sort.Slice(props, func(i, j int) bool {
		if props[i].Name != props[j].Name {
			return props[i].Name < props[j].Name
		}
		return props[i].Value < props[j].Value
	})
	plat := make([]any, 0, len(props))
	for _, p := range props {
		plat = append(plat, map[string]any{"name": p.Name, "value": p.Value})
	}
	argv := append([]string{}, a.Argv...)
	env := map[string]any{EnvKilnVersion: a.KilnVersion, EnvPlatform: plat}
	if a.RequestedBy != "" {
		env[EnvRequestedBy] = a.RequestedBy
	}
	return in_toto.Link{
		Type:        "link",
		Name:        a.ActionDigest.Hash,
		Materials:   materials,
		Products:    products,
		ByProducts:  by,
		Command:     argv,
		Environment: env,
	}, nil
}

// Payload returns the canonical JSON of a's link: the bytes kiln signs.
func (a Action) Payload() ([]byte, error) {
	l, err := a.Link()
	if err != nil {
		return nil, err
	}
	mats := make(map[string]map[string]string, len(l.Materials))
	for k, v := range l.Materials {
		mats[k] = v
	}
	prods := make(map[string]map[string]string, len(l.Products))
	for k, v := range l.Products {
		prods[k] = v
	}
	tree := map[string]any{
		"_type":       l.Type,
		"name":        l.Name,
		"materials":   mats,
		"products":    prods,
		"byproducts":  l.ByProducts,
		"command":     l.Command,
		"environment": l.Environment,
	}
	return canonicalTree(tree, 256+128*(len(mats)+len(prods)))
}

// checkUTF8 refuses strings JSON cannot carry exactly (encoding/json would silently
// replace invalid bytes, and two different argvs would sign as one).
func (a Action) checkUTF8() error {
	strs := append([]string{a.KilnVersion, a.Reproducibility, a.Toolchain, a.RequestedBy}, a.Argv...)
	for _, fs := range [][]File{a.Inputs, a.Outputs} {
		for _, f := range fs {
			strs = append(strs, f.Path, f.SymlinkTarget)
		}
	}
	for _, p := range a.Platform {
		strs = append(strs, p.Name, p.Value)
	}
	for _, s := range strs {
		if !utf8.ValidString(s) {
			return status.Errorf(codes.InvalidArgument, "action %s: %q is not valid UTF-8", a.ActionDigest, s)
		}
	}
	return nil
}

// artifacts turns files into in-toto artifacts, refusing unclean, duplicate or
// malformed entries.
func artifacts(kind string, files []File) (map[string]in_toto.HashObj, error) {
	out := make(map[string]in_toto.HashObj, len(files)+3)
	for _, f := range files {
		if err := checkPath(f.Path); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "%s %q: %v", kind, f.Path, err)
		}
		if _, dup := out[f.Path]; dup {
			return nil, status.Errorf(codes.InvalidArgument, "%s %q listed twice", kind, f.Path)
		}
		if f.SymlinkTarget != "" {
			out[f.Path] = in_toto.HashObj{AlgSymlink: symlinkHash(f.SymlinkTarget)}
			continue
		}
		if _, err := cache.NewDigest(f.Digest.Hash, f.Digest.Size); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "%s %q: %v", kind, f.Path, status.Convert(err).Message())
		}
		out[f.Path] = in_toto.HashObj{AlgSHA256: f.Digest.Hash}
	}
	return out, nil
}

type pathError string

func (e pathError) Error() string { return string(e) }

// checkPath accepts clean relative slash-separated paths that stay inside the root.
func checkPath(p string) error {
	switch {
	case p == "" || p == ".":
		return pathError("empty path")
	case strings.HasPrefix(p, "/"):
		return pathError("absolute path")
	case path.Clean(p) != p:
		return pathError("not a clean path")
	case p == ".." || strings.HasPrefix(p, "../"):
		return pathError("leaves the root")
	}
	return nil
}

// ociSHA256 returns the hex of an OCI digest "sha256:<hex>".
func ociSHA256(d string) (string, error) {
	h, ok := strings.CutPrefix(d, "sha256:")
	if !ok {
		return "", status.Errorf(codes.InvalidArgument, "toolchain digest %q: want sha256:<hex>", d)
	}
	if _, err := cache.NewDigest(h, 0); err != nil {
		return "", status.Errorf(codes.InvalidArgument, "toolchain digest %q: %v", d, status.Convert(err).Message())
	}
	return h, nil
}

func symlinkHash(target string) string {
	sum := sha256.Sum256([]byte(target))
	return hex.EncodeToString(sum[:])
}
