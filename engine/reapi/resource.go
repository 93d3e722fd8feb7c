package reapi

import (
	"strconv"
	"strings"

	"github.com/kilnbuild/kiln/cache"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// resource is a parsed ByteStream resource name.
type resource struct {
	instance   string
	uuid       string // uploads only
	compressor string // "" for plain blobs, else e.g. "zstd"
	digest     cache.Digest
}

// reserved are the path segments REAPI forbids in instance names; the first one marks
// where the instance name ends.
var reserved = map[string]bool{
	"blobs": true, "uploads": true, "actions": true, "actionResults": true,
	"operations": true, "capabilities": true, "compressed-blobs": true,
}

// parseReadResource parses `{instance}/blobs/{hash}/{size}` or
// `{instance}/compressed-blobs/{compressor}/{hash}/{size}` (with an optional
// digest-function segment before the hash).
func parseReadResource(name string) (resource, error) {
	segs := strings.Split(name, "/")
	i, err := instanceEnd(name, segs)
	if err != nil {
		return resource{}, err
	}
	r := resource{instance: strings.Join(segs[:i], "/")}
	rest, err := parseBlobPart(name, &r, segs[i:])
	if err != nil {
		return resource{}, err
	}
	if len(rest) != 0 {
		return resource{}, badResource(name, "unexpected segments after the size")
	}
	return r, nil
}

// parseWriteResource parses `{instance}/uploads/{uuid}/blobs/{hash}/{size}{/metadata}`
// and its compressed-blobs form.
func parseWriteResource(name string) (resource, error) {
	segs := strings.Split(name, "/")
	i, err := instanceEnd(name, segs)
	if err != nil {
		return resource{}, err
	}
	if segs[i] != "uploads" || len(segs) < i+2 {
		return resource{}, badResource(name, "want {instance}/uploads/{uuid}/blobs/{hash}/{size}")
	}
	r := resource{instance: strings.Join(segs[:i], "/"), uuid: segs[i+1]}
	if r.uuid == "" || r.uuid == "." || r.uuid == ".." || reserved[r.uuid] {
		return resource{}, badResource(name, "bad upload id")
	}
	// Optional metadata after the size is allowed and ignored, but it must be a path
	// as harmless as the rest.
	meta, err := parseBlobPart(name, &r, segs[i+2:])
	if err != nil {
		return resource{}, err
	}
	for _, m := range meta {
		if m == "" || m == "." || m == ".." {
			return resource{}, badResource(name, "empty, '.' or '..' segment after the size")
		}
	}
	return r, nil
}

// instanceEnd validates the instance-name segments and returns the index of the first
// reserved segment.
func instanceEnd(name string, segs []string) (int, error) {
	if strings.HasPrefix(name, "/") {
		return 0, badResource(name, "must not be absolute")
	}
	if strings.ContainsRune(name, 0) {
		return 0, badResource(name, "contains NUL")
	}
	for i, s := range segs {
		if reserved[s] {
			return i, nil
		}
		if s == "" || s == "." || s == ".." {
			return 0, badResource(name, "empty, '.' or '..' segment in the instance name")
		}
	}
	return 0, badResource(name, "no blobs, compressed-blobs or uploads segment")
}

// parseBlobPart parses `blobs/[fn/]hash/size` or `compressed-blobs/comp/[fn/]hash/size`
// into r and returns the segments that follow.
func parseBlobPart(name string, r *resource, segs []string) ([]string, error) {
	if len(segs) == 0 {
		return nil, badResource(name, "missing blobs segment")
	}
	switch segs[0] {
	case "blobs":
		segs = segs[1:]
	case "compressed-blobs":
		if len(segs) < 2 {
			return nil, badResource(name, "missing compressor")
		}
		switch segs[1] {
		case "zstd":
			r.compressor = "zstd"
		case "identity":
			return nil, badResource(name, "use blobs/, not compressed-blobs/identity/")
		default:
			return nil, status.Errorf(codes.InvalidArgument, "resource %q: unsupported compressor %q (kiln supports zstd)", trunc(name), segs[1])
		}
		segs = segs[2:]
	default:
		return nil, badResource(name, "want blobs/ or compressed-blobs/")
	}
	if len(segs) < 2 {
		return nil, badResource(name, "missing hash or size")
	}
	if len(segs[0]) != 64 {
		// A digest-function segment: only SHA-256 is served (and by the spec it should
		// have been omitted for SHA-256).
		if segs[0] != "sha256" {
			return nil, status.Errorf(codes.InvalidArgument, "resource %q: unsupported digest function %q (kiln serves SHA-256)", trunc(name), segs[0])
		}
		segs = segs[1:]
		if len(segs) < 2 {
			return nil, badResource(name, "missing hash or size")
		}
	}
	size, err := parseSize(segs[1])
	if err != nil {
		return nil, badResource(name, "size is not a decimal number without sign or leading zeros")
	}
	d, err := cache.NewDigest(segs[0], size)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "resource %q: %s", trunc(name), status.Convert(err).Message())
	}
	r.digest = d
	return segs[2:], nil
}

// parseSize parses a size the one way REAPI writes it: decimal digits, no sign, no
// leading zero (strconv.ParseInt alone would take "+24" and "024").
func parseSize(s string) (int64, error) {
	if s == "" || (len(s) > 1 && s[0] == '0') {
		return 0, strconv.ErrSyntax
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, strconv.ErrSyntax
		}
	}
	return strconv.ParseInt(s, 10, 64)
}

func badResource(name, why string) error {
	return status.Errorf(codes.InvalidArgument, "bad resource name %q: %s", trunc(name), why)
}

func trunc(s string) string {
	if len(s) > 200 {
		return s[:200] + "..."
	}
	return s
}
