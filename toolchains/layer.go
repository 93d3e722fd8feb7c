package toolchains

import (
	"archive/tar"
	"fmt"
	"io"
	"strings"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Unpack policy (docs/toolchains.md, "What an unpacked root may contain"). A toolchain
// root is mounted into hostile sandboxes, so:
//   - device nodes (char, block) are refused at import and at unpack: a sandbox must
//     only see the devices the sandbox itself provides;
//   - paths and hard-link targets with ".." components are refused (containerd's
//     Apply would also keep them inside the root; refusing is clearer);
//   - setuid and setgid bits and the world-write bit are cleared, and every entry is
//     owned by root (0:0), so the host tree is root-owned and not world-writable;
//   - extended attributes (including security.capability file capabilities) are dropped.
//
// policyVersion is recorded in each root's completion marker; a root unpacked under
// another policy version is redone.
const policyVersion = 1

// layerMediaTypes are the layer types an image may use (uncompressed, gzip, zstd).
var layerMediaTypes = map[string]bool{
	ocispec.MediaTypeImageLayer:               true,
	ocispec.MediaTypeImageLayerGzip:           true,
	ocispec.MediaTypeImageLayerZstd:           true,
	images.MediaTypeDockerSchema2Layer:        true,
	images.MediaTypeDockerSchema2LayerGzip:    true,
	images.MediaTypeDockerSchema2LayerZstd:    true,
	images.MediaTypeDockerSchema2LayerForeign: false,
}

// checkEntry enforces the parts of the unpack policy that refuse a layer entry.
func checkEntry(hdr *tar.Header) error {
	if unsafePath(hdr.Name) {
		return fmt.Errorf("unsafe path %q in layer (\"..\" component)", hdr.Name)
	}
	switch hdr.Typeflag {
	case tar.TypeReg, tar.TypeDir, tar.TypeSymlink, tar.TypeFifo, tar.TypeXGlobalHeader: // tar.Reader maps old TypeRegA to TypeReg
	case tar.TypeLink:
		if unsafePath(hdr.Linkname) {
			return fmt.Errorf("hard link %q points outside the root (%q)", hdr.Name, hdr.Linkname)
		}
	case tar.TypeChar, tar.TypeBlock:
		return fmt.Errorf("device node %q in layer: toolchain images may not contain device nodes", hdr.Name)
	default:
		return fmt.Errorf("unsupported entry type %q for %q in layer", hdr.Typeflag, hdr.Name)
	}
	return nil
}

// unsafePath reports whether a layer path has a ".." component (after cleaning it as
// an absolute path would not remove it).
func unsafePath(p string) bool {
	for _, c := range strings.Split(p, "/") {
		if c == ".." {
			return true
		}
	}
	return false
}

// applyPolicy rewrites a header accepted by checkEntry into what is unpacked: owned by
// root, no setuid/setgid, not world-writable, no extended attributes.
func applyPolicy(hdr *tar.Header) {
	hdr.Uid, hdr.Gid = 0, 0
	hdr.Uname, hdr.Gname = "", ""
	hdr.Mode &^= 0o4000 | 0o2000 | 0o002
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, "SCHILY.xattr.") || strings.HasPrefix(k, "LIBARCHIVE.xattr.") {
			delete(hdr.PAXRecords, k)
		}
	}
}

// scanLayer reads a whole (possibly compressed) layer stream, checks every entry
// against the unpack policy, and returns the digest of the uncompressed tar (diffID).
func scanLayer(r io.Reader) (digest.Digest, error) {
	ds, err := compression.DecompressStream(r)
	if err != nil {
		return "", fmt.Errorf("decompress layer: %w", err)
	}
	defer ds.Close()
	dg := digest.Canonical.Digester()
	tr := tar.NewReader(io.TeeReader(ds, dg.Hash()))
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return "", fmt.Errorf("read layer tar: %w", err)
		}
		if err := checkEntry(hdr); err != nil {
			return "", err
		}
		if _, err := io.Copy(io.Discard, tr); err != nil {
			return "", fmt.Errorf("read layer tar: %s: %w", hdr.Name, err)
		}
	}
	// The diffID covers the whole uncompressed stream, padding after the end marker too.
	if _, err := io.Copy(dg.Hash(), ds); err != nil {
		return "", fmt.Errorf("read layer: %w", err)
	}
	return dg.Digest(), nil
}

// statusInvalid formats an INVALID_ARGUMENT status for a refused image.
func statusInvalid(format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, "image refused: "+format, args...)
}
