package lockfiles

import (
	"bytes"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"hash"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Algorithms this package can verify, in the order SRI ranks them (weakest first).
const (
	SHA256 = "sha256"
	SHA384 = "sha384"
	SHA512 = "sha512"
)

var hashSizes = map[string]int{SHA256: sha256.Size, SHA384: sha512.Size384, SHA512: sha512.Size}

// Checksum is one expected or computed hash of some content.
type Checksum struct {
	Algo string // SHA256, SHA384 or SHA512
	Sum  []byte
}

// newHash returns a fresh hash for algo.
func newHash(algo string) hash.Hash {
	switch algo {
	case SHA256:
		return sha256.New()
	case SHA384:
		return sha512.New384()
	case SHA512:
		return sha512.New()
	}
	return nil
}

// ParseSRI parses one Subresource Integrity value "ALGO-BASE64" (options after '?' are
// ignored, as SRI says); an unknown algorithm or a wrong length is INVALID_ARGUMENT.
func ParseSRI(s string) (Checksum, error) {
	algo, b64, ok := strings.Cut(s, "-")
	if !ok {
		return Checksum{}, status.Errorf(codes.InvalidArgument, "integrity %q: want ALGO-BASE64, e.g. sha256-…", short(s))
	}
	if i := strings.IndexByte(b64, '?'); i >= 0 {
		b64 = b64[:i]
	}
	size, known := hashSizes[algo]
	if !known {
		return Checksum{}, status.Errorf(codes.InvalidArgument, "integrity %q: unsupported algorithm %q (sha256, sha384 or sha512)", short(s), algo)
	}
	sum, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return Checksum{}, status.Errorf(codes.InvalidArgument, "integrity %q: not base64: %v", short(s), err)
	}
	if len(sum) != size {
		return Checksum{}, status.Errorf(codes.InvalidArgument, "integrity %q: %s sum must be %d bytes, got %d", short(s), algo, size, len(sum))
	}
	return Checksum{Algo: algo, Sum: sum}, nil
}

// ParseIntegrity parses a whitespace-separated list of SRI values, as the remote asset
// `checksum.sri` qualifier allows. Values with algorithms this package cannot verify are
// skipped; if none is left the list is INVALID_ARGUMENT.
func ParseIntegrity(s string) ([]Checksum, error) {
	var out []Checksum
	var firstErr error
	for _, f := range strings.Fields(s) {
		if algo, _, _ := strings.Cut(f, "-"); hashSizes[algo] == 0 {
			if firstErr == nil {
				firstErr = status.Errorf(codes.InvalidArgument, "integrity %q: unsupported algorithm %q (sha256, sha384 or sha512)", short(f), algo)
			}
			continue
		}
		c, err := ParseSRI(f) // a known algorithm with a malformed sum is an error, never skipped
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		if firstErr != nil {
			return nil, firstErr
		}
		return nil, status.Error(codes.InvalidArgument, "empty integrity value")
	}
	return out, nil
}

// ParseSHA256Hex parses a lowercase hex SHA-256 sum (64 characters).
func ParseSHA256Hex(s string) (Checksum, error) {
	if len(s) != 2*sha256.Size || strings.ToLower(s) != s {
		return Checksum{}, status.Errorf(codes.InvalidArgument, "sha256 %q: want 64 lowercase hex characters", short(s))
	}
	sum, err := hex.DecodeString(s)
	if err != nil {
		return Checksum{}, status.Errorf(codes.InvalidArgument, "sha256 %q: not hex", short(s))
	}
	return Checksum{Algo: SHA256, Sum: sum}, nil
}

// SRI formats c as "ALGO-BASE64".
func (c Checksum) SRI() string { return c.Algo + "-" + base64.StdEncoding.EncodeToString(c.Sum) }

// Hex returns the sum as lowercase hex.
func (c Checksum) Hex() string { return hex.EncodeToString(c.Sum) }

// String formats c as "ALGO:HEX", the form error messages and logs use.
func (c Checksum) String() string { return c.Algo + ":" + c.Hex() }

// Equal reports whether c and o are the same algorithm and sum.
func (c Checksum) Equal(o Checksum) bool { return c.Algo == o.Algo && bytes.Equal(c.Sum, o.Sum) }

// FindAlgo returns the checksum in cs with algorithm algo.
func FindAlgo(cs []Checksum, algo string) (Checksum, bool) {
	for _, c := range cs {
		if c.Algo == algo {
			return c, true
		}
	}
	return Checksum{}, false
}

// MergeChecksums returns the union of a and b, or an error if they name two different
// sums for one algorithm (no content can match both).
func MergeChecksums(a, b []Checksum) ([]Checksum, error) {
	out := append([]Checksum(nil), a...)
	for _, c := range b {
		if prev, ok := FindAlgo(out, c.Algo); ok {
			if !prev.Equal(c) {
				return nil, fmt.Errorf("conflicting %s checksums %s and %s", c.Algo, prev.Hex(), c.Hex())
			}
			continue
		}
		out = append(out, c)
	}
	return out, nil
}

func short(s string) string {
	if len(s) > 100 {
		return s[:100] + "…"
	}
	return s
}

// Hashes computes several checksums of one stream at once.
type Hashes struct {
	algos []string
	hs    []hash.Hash
}

// NewHashes returns Hashes for SHA-256 and every algorithm in cs.
func NewHashes(cs []Checksum) *Hashes {
	h := &Hashes{}
	h.add(SHA256)
	for _, c := range cs {
		h.add(c.Algo)
	}
	return h
}

func (h *Hashes) add(algo string) {
	if contains(h.algos, algo) || newHash(algo) == nil {
		return
	}
	h.algos = append(h.algos, algo)
	h.hs = append(h.hs, newHash(algo))
}

// Write implements io.Writer.
func (h *Hashes) Write(p []byte) (int, error) {
	for _, x := range h.hs {
		x.Write(p)
	}
	return len(p), nil
}

// Sum returns the checksum in algo of what was written (zero if algo is not computed).
func (h *Hashes) Sum(algo string) Checksum {
	for i, a := range h.algos {
		if a == algo {
			return Checksum{Algo: a, Sum: h.hs[i].Sum(nil)}
		}
	}
	return Checksum{}
}

// All returns every computed checksum, SHA-256 first.
func (h *Hashes) All() []Checksum {
	out := make([]Checksum, len(h.algos))
	for i := range h.algos {
		out[i] = h.Sum(h.algos[i])
	}
	return out
}
