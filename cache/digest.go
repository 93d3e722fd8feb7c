// Package cache holds kiln's content-addressed storage: CAS blobs keyed by SHA-256
// digest and the action cache, behind small interfaces with behaviour added by wrapping.
package cache

import (
	"crypto/sha256"
	"encoding/hex"
	"strconv"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// Digest names a blob by its lowercase hex SHA-256 hash and its size in bytes.
type Digest struct {
	Hash string
	Size int64
}

// InputMtime is the modification time of every stored blob, and so of every input an
// action sees (hardlinks share the blob's inode; copies are given it too). Inputs with
// the same content then look the same whenever they were uploaded, so archivers and
// compilers that record mtimes (tar, zip, .pyc) stay reproducible. 2000-01-01 UTC: late
// enough for zip (1980+), and plainly not a real time.
var InputMtime = time.Unix(946684800, 0)

// EmptyDigest is the digest of the empty blob, which every store always holds.
var EmptyDigest = Digest{Hash: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", Size: 0}

// NewDigest validates hash and size and returns them as a Digest (INVALID_ARGUMENT otherwise).
func NewDigest(hash string, size int64) (Digest, error) {
	if len(hash) != sha256.Size*2 {
		return Digest{}, status.Errorf(codes.InvalidArgument, "digest hash %q: want %d lowercase hex characters (SHA-256)", truncate(hash), sha256.Size*2)
	}
	var bad byte
	for i := 0; i < len(hash); i++ {
		bad |= notLowerHex[hash[i]]
	}
	if bad != 0 {
		return Digest{}, status.Errorf(codes.InvalidArgument, "digest hash %q: not lowercase hex", truncate(hash))
	}
	if size < 0 {
		return Digest{}, status.Errorf(codes.InvalidArgument, "digest %s: negative size %d", hash, size)
	}
	return Digest{Hash: hash, Size: size}, nil
}

// notLowerHex is 1 for every byte that is not a lowercase hex digit: one table load per
// byte and no branch (FindMissingBlobs checks millions of digests).
var notLowerHex = func() (t [256]byte) {
	for i := range t {
		if !(i >= '0' && i <= '9' || i >= 'a' && i <= 'f') {
			t[i] = 1
		}
	}
	return t
}()

// ParseDigest parses "HASH/SIZE", the form Digest.String writes.
func ParseDigest(s string) (Digest, error) {
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == '/' {
			size, err := strconv.ParseInt(s[i+1:], 10, 64)
			if err != nil {
				return Digest{}, status.Errorf(codes.InvalidArgument, "digest %q: bad size", truncate(s))
			}
			return NewDigest(s[:i], size)
		}
	}
	return Digest{}, status.Errorf(codes.InvalidArgument, "digest %q: want HASH/SIZE", truncate(s))
}

// FromProto validates a REAPI digest; a nil digest is INVALID_ARGUMENT.
func FromProto(d *repb.Digest) (Digest, error) {
	if d == nil {
		return Digest{}, status.Error(codes.InvalidArgument, "digest missing")
	}
	return NewDigest(d.GetHash(), d.GetSizeBytes())
}

// Proto returns the REAPI form of d.
func (d Digest) Proto() *repb.Digest { return &repb.Digest{Hash: d.Hash, SizeBytes: d.Size} }

// String returns "HASH/SIZE".
func (d Digest) String() string { return d.Hash + "/" + strconv.FormatInt(d.Size, 10) }

// IsEmpty reports whether d names the empty blob.
func (d Digest) IsEmpty() bool { return d == EmptyDigest }

// DigestOf hashes data.
func DigestOf(data []byte) Digest {
	sum := sha256.Sum256(data)
	return Digest{Hash: hex.EncodeToString(sum[:]), Size: int64(len(data))}
}

// DigestOfProto marshals m deterministically and returns its bytes and digest.
func DigestOfProto(m proto.Message) ([]byte, Digest, error) {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return nil, Digest{}, status.Errorf(codes.Internal, "marshal %T: %v", m, err)
	}
	return b, DigestOf(b), nil
}

func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}
