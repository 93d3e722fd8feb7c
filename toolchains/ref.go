package toolchains

import (
	"context"
	"strings"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// dockerScheme is the optional prefix of a `container-image` platform property value.
const dockerScheme = "docker://"

// Ref is a parsed toolchain reference. Digest alone decides which image it means; Name
// (with Tag) is informational, except that a Ref without a Digest is unpinned.
type Ref struct {
	Name   string        // repository name as written, e.g. "kiln/busybox" (may be empty)
	Tag    string        // tag as written, if any
	Digest digest.Digest // manifest (or index) digest; empty for an unpinned tag
}

// Pinned reports whether the reference names an image by digest.
func (r Ref) Pinned() bool { return r.Digest != "" }

// String formats the reference as NAME[:TAG][@DIGEST], or the bare digest.
func (r Ref) String() string {
	s := r.Name
	if r.Tag != "" {
		s += ":" + r.Tag
	}
	if r.Digest != "" {
		if s == "" {
			return r.Digest.String()
		}
		s += "@" + r.Digest.String()
	}
	return s
}

// ParseRef parses `docker://NAME@sha256:HEX`, `NAME@sha256:HEX`, `sha256:HEX` or a tag
// reference `NAME[:TAG]` (which parses but is unpinned). Malformed input is an
// INVALID_ARGUMENT status.
func ParseRef(s string) (Ref, error) {
	orig := s
	s = strings.TrimPrefix(s, dockerScheme)
	if s == "" || strings.TrimSpace(s) != s {
		return Ref{}, status.Errorf(codes.InvalidArgument, "malformed toolchain reference %q", orig)
	}
	if !strings.Contains(s, "/") && strings.Contains(s, ":") && !strings.Contains(s, "@") {
		// "sha256:HEX" or "sha512:..." (a bare digest), or "name:tag".
		switch alg, _, _ := strings.Cut(s, ":"); alg {
		case "sha256", "sha384", "sha512":
			d, err := parseDigest(s)
			if err != nil {
				return Ref{}, status.Errorf(codes.InvalidArgument, "malformed toolchain reference %q: %v", orig, err)
			}
			return Ref{Digest: d}, nil
		}
	}
	var r Ref
	name := s
	if i := strings.LastIndex(s, "@"); i >= 0 {
		d, err := parseDigest(s[i+1:])
		if err != nil {
			return Ref{}, status.Errorf(codes.InvalidArgument, "malformed toolchain reference %q: %v", orig, err)
		}
		r.Digest = d
		name = s[:i]
	}
	n, err := reference.Parse(name)
	if err != nil {
		return Ref{}, status.Errorf(codes.InvalidArgument, "malformed toolchain reference %q: %v", orig, err)
	}
	named, ok := n.(reference.Named)
	if !ok {
		return Ref{}, status.Errorf(codes.InvalidArgument, "malformed toolchain reference %q: no image name", orig)
	}
	if _, ok := n.(reference.Digested); ok {
		return Ref{}, status.Errorf(codes.InvalidArgument, "malformed toolchain reference %q: two digests", orig)
	}
	r.Name = named.Name()
	if t, ok := n.(reference.Tagged); ok {
		r.Tag = t.Tag()
	}
	return r, nil
}

// parseDigest accepts only well-formed sha256 digests: the one algorithm the store uses.
func parseDigest(s string) (digest.Digest, error) {
	d, err := digest.Parse(s)
	if err != nil {
		return "", err
	}
	if d.Algorithm() != digest.SHA256 {
		return "", status.Errorf(codes.InvalidArgument, "unsupported digest algorithm %q (only sha256)", d.Algorithm())
	}
	return d, nil
}

// TagPinner maps an unpinned tag reference to a manifest digest, e.g. from a lockfile.
// tagRef is the reference as written without the docker:// prefix ("debian:bookworm").
// ok is false when the tag is not pinned.
type TagPinner interface {
	PinTag(ctx context.Context, tagRef string) (d digest.Digest, ok bool, err error)
}

// noPins is the default TagPinner: no tag is pinned.
type noPins struct{}

func (noPins) PinTag(context.Context, string) (digest.Digest, bool, error) { return "", false, nil }
