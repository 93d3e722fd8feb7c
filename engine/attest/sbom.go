package attest

import (
	"bytes"

	cdx "github.com/CycloneDX/cyclonedx-go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// SBOM returns a CycloneDX SBOM of what went into the chain's subject: the toolchain
// images and the source files, each with its SHA-256 (a symlink source has no content
// hash; its target's hash is recorded as a property). The subject is the metadata
// component and depends on all of them. No serial number or timestamp, so equal chains
// give equal SBOMs.
func (c *Chain) SBOM(kilnVersion string) *cdx.BOM {
	bom := cdx.NewBOM()
	subjectRef := "subject:sha256:" + c.Subject.SHA256
	bom.Metadata = &cdx.Metadata{
		Tools: &cdx.ToolsChoice{Components: &[]cdx.Component{{Type: cdx.ComponentTypeApplication, Name: "kiln", Version: kilnVersion}}},
		Component: &cdx.Component{
			BOMRef: subjectRef,
			Type:   cdx.ComponentTypeFile,
			Name:   c.Subject.Name,
			Hashes: &[]cdx.Hash{{Algorithm: cdx.HashAlgoSHA256, Value: c.Subject.SHA256}},
		},
	}
	var comps []cdx.Component
	var refs []string
	for _, t := range c.Toolchains {
		ref := "toolchain:sha256:" + t
		comps = append(comps, cdx.Component{
			BOMRef:  ref,
			Type:    cdx.ComponentTypeContainer,
			Name:    ToolchainName,
			Version: "sha256:" + t,
			Hashes:  &[]cdx.Hash{{Algorithm: cdx.HashAlgoSHA256, Value: t}},
		})
		refs = append(refs, ref)
	}
	for _, s := range c.Sources {
		ref := "source:" + s.Path + "@" + s.Alg + ":" + s.Hash
		comp := cdx.Component{BOMRef: ref, Type: cdx.ComponentTypeFile, Name: s.Path}
		if s.Alg == AlgSHA256 {
			comp.Hashes = &[]cdx.Hash{{Algorithm: cdx.HashAlgoSHA256, Value: s.Hash}}
		} else {
			comp.Properties = &[]cdx.Property{{Name: "kiln:" + s.Alg, Value: s.Hash}}
		}
		comps = append(comps, comp)
		refs = append(refs, ref)
	}
	bom.Components = &comps
	bom.Dependencies = &[]cdx.Dependency{{Ref: subjectRef, Dependencies: &refs}}
	return bom
}

// EncodeSBOM writes bom as indented CycloneDX JSON.
func EncodeSBOM(bom *cdx.BOM) ([]byte, error) {
	var buf bytes.Buffer
	if err := cdx.NewBOMEncoder(&buf, cdx.BOMFileFormatJSON).SetPretty(true).SetEscapeHTML(false).Encode(bom); err != nil {
		return nil, status.Errorf(codes.Internal, "sbom: %v", err)
	}
	return buf.Bytes(), nil
}

// CheckSBOM compares an SBOM with a verified chain: it must name the chain's subject
// and list exactly its toolchains and sources with their hashes.
func (c *Chain) CheckSBOM(data []byte) []Failure {
	var bom cdx.BOM
	if err := cdx.NewBOMDecoder(bytes.NewReader(data), cdx.BOMFileFormatJSON).Decode(&bom); err != nil {
		return []Failure{{Reason: "sbom: not CycloneDX JSON: " + err.Error()}}
	}
	var fails []Failure
	if bom.Metadata == nil || bom.Metadata.Component == nil || !hasHash(bom.Metadata.Component.Hashes, c.Subject.SHA256) {
		fails = append(fails, Failure{Reason: "sbom: does not describe subject sha256 " + c.Subject.SHA256})
	}
	want := map[string]bool{}
	for _, ref := range *c.SBOM("").Dependencies {
		for _, r := range *ref.Dependencies {
			want[r] = true
		}
	}
	got := map[string]bool{}
	if bom.Components != nil {
		for _, comp := range *bom.Components {
			// Identify a component by what it states (name and hash), not by its
			// bom-ref, which a tampered SBOM could leave unchanged.
			id := componentID(comp)
			got[id] = true
			if !want[id] {
				fails = append(fails, Failure{Reason: "sbom: lists " + id + ", which is not in the verified chain"})
			}
		}
	}
	for r := range want {
		if !got[r] {
			fails = append(fails, Failure{Reason: "sbom: omits " + r})
		}
	}
	return fails
}

func hasHash(hs *[]cdx.Hash, sha string) bool {
	if hs == nil {
		return false
	}
	for _, h := range *hs {
		if h.Algorithm == cdx.HashAlgoSHA256 && h.Value == sha {
			return true
		}
	}
	return false
}

// componentID names a component the way SBOM builds bom-refs, from its content.
func componentID(c cdx.Component) string {
	sha := ""
	if c.Hashes != nil {
		for _, h := range *c.Hashes {
			if h.Algorithm == cdx.HashAlgoSHA256 {
				sha = h.Value
			}
		}
	}
	switch {
	case c.Type == cdx.ComponentTypeContainer:
		return "toolchain:sha256:" + sha
	case sha != "":
		return "source:" + c.Name + "@" + AlgSHA256 + ":" + sha
	case c.Properties != nil:
		for _, p := range *c.Properties {
			if p.Name == "kiln:"+AlgSymlink {
				return "source:" + c.Name + "@" + AlgSymlink + ":" + p.Value
			}
		}
	}
	return "unidentified:" + c.Name
}
