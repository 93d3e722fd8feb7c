// Package rebuild exports what an artifact was built from (a bundle), re-executes the
// actions recorded in its provenance in fresh sandboxes, compares every product bit for
// bit with the record, and signs a SLSA verification summary, quarantining the
// artifact when the rebuild disagrees.
//
// A bundle is laid out like a kiln data dir, so the same verification code reads it:
//
//	bundle.json                 manifest: subject, actions, toolchains
//	provenance.json             the DSSE-signed SLSA provenance of the subject
//	keys.json                   the exporter's public keys and log key (informational:
//	                            a rebuild trusts only the keys it is given)
//	store/cas/..                Actions, Commands, input Directories and input files
//	attest/envelopes/..         the link envelopes of every action of the chain
//	log/                        the transparency log the links are in (tiles, checkpoint)
//	toolchains/HEX/             each toolchain image as an OCI layout
//
// A bundle may also be one tar file of that tree.
package rebuild

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/disk"
	"github.com/kilnbuild/kiln/engine"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/executor"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	"github.com/klauspost/compress/zstd"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// BundleVersion is the version of the bundle layout.
const BundleVersion = 1

// Manifest is bundle.json.
type Manifest struct {
	Version    int            `json:"version"`
	Subject    attest.Subject `json:"subject"`
	Actions    []ActionRef    `json:"actions"`
	Toolchains []string       `json:"toolchains"` // manifest digests, sha256:HEX
	Created    string         `json:"created_by"`
}

// ActionRef is one recorded action of a chain.
type ActionRef struct {
	Action string `json:"action"` // HASH/SIZE
	Link   string `json:"link"`   // envelope HASH/SIZE
}

// ExportResult says what went into a bundle.
type ExportResult struct {
	Manifest Manifest
	Blobs    int
	Bytes    int64
}

// Export writes the bundle of subj (its provenance, links, actions, inputs and
// toolchains, from eng's data dir) to out: a new directory, or a tar file if out ends
// in .tar (.tar.zst: compressed with zstd). The chain must verify with the data dir's
// own keys.
func Export(ctx context.Context, eng *engine.Engine, subj attest.Subject, out string, wait time.Duration, version string) (*ExportResult, error) {
	if _, err := os.Stat(out); err == nil {
		return nil, status.Errorf(codes.AlreadyExists, "%s already exists", out)
	}
	ch, env, _, err := attest.BuildProvenance(ctx, eng.Signer.Store(), eng.Signer.Keyring(), subj, wait)
	if err != nil {
		if ch != nil && len(ch.Failures) > 0 {
			return nil, status.Errorf(status.Code(err), "%s: %s", status.Convert(err).Message(), ch.Failures[0])
		}
		return nil, err
	}
	dir := out
	asTar, compressed := bundleFile(out)
	if asTar {
		if dir, err = os.MkdirTemp(filepath.Dir(out), ".kiln-bundle-*"); err != nil {
			return nil, status.Errorf(codes.Internal, "bundle: %v", err)
		}
		defer os.RemoveAll(dir)
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, status.Errorf(codes.Internal, "bundle: %v", err)
	}
	res := &ExportResult{Manifest: Manifest{Version: BundleVersion, Subject: subj, Toolchains: []string{}, Created: "kiln " + version}}
	paths := attest.PathsFor(dir)
	bcas, err := disk.Open(ctx, paths.CAS, disk.Options{})
	if err != nil {
		return nil, err
	}
	defer bcas.Close()
	bstore := attest.NewStore(paths, bcas)
	copied := map[cache.Digest]bool{}
	copyBlob := func(d cache.Digest) error {
		if copied[d] || d.IsEmpty() {
			return nil
		}
		copied[d] = true
		r, err := eng.CAS.Get(ctx, d, 0)
		if err != nil {
			return grpcerr.Wrap(err, "blob %s", d)
		}
		defer r.Close()
		if err := bcas.Put(ctx, d, r); err != nil {
			return err
		}
		res.Blobs++
		res.Bytes += d.Size
		return nil
	}
	for _, l := range ch.Links {
		ad, err := ActionDigestOf(l)
		if err != nil {
			return nil, err
		}
		res.Manifest.Actions = append(res.Manifest.Actions, ActionRef{Action: ad.String(), Link: l.Envelope.String()})
		if _, err := bstore.PutEnvelope(ctx, l.Raw); err != nil {
			return nil, err
		}
		if err := bstore.SetLogIndex(l.Envelope, l.LogIndex); err != nil {
			return nil, err
		}
		ds, err := actionBlobs(ctx, eng.CAS, ad)
		if err != nil {
			return nil, err
		}
		for _, d := range ds {
			if err := copyBlob(d); err != nil {
				return nil, err
			}
		}
	}
	sort.Slice(res.Manifest.Actions, func(i, j int) bool { return res.Manifest.Actions[i].Action < res.Manifest.Actions[j].Action })
	if err := copyTree(eng.Data.Log(), paths.Log); err != nil {
		return nil, status.Errorf(codes.Internal, "bundle: copy the transparency log: %v", err)
	}
	for _, t := range ch.Toolchains {
		ref := "sha256:" + t
		if err := eng.Toolchains.Export(ctx, ref, filepath.Join(dir, "toolchains", t)); err != nil {
			return nil, grpcerr.Wrap(err, "export toolchain %s", ref)
		}
		res.Manifest.Toolchains = append(res.Manifest.Toolchains, ref)
	}
	exp, err := eng.Signer.Keyring().Export()
	if err != nil {
		return nil, err
	}
	for name, v := range map[string]any{"bundle.json": res.Manifest, "keys.json": exp} {
		b, _ := json.MarshalIndent(v, "", "  ")
		if err := os.WriteFile(filepath.Join(dir, name), append(b, '\n'), 0o644); err != nil {
			return nil, status.Errorf(codes.Internal, "bundle: %v", err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "provenance.json"), append(env, '\n'), 0o644); err != nil {
		return nil, status.Errorf(codes.Internal, "bundle: %v", err)
	}
	if asTar {
		if err := writeTar(dir, out, compressed); err != nil {
			return nil, err
		}
	}
	return res, nil
}

// ActionDigestOf returns the action digest (with size) a verified link records.
func ActionDigestOf(l *attest.VerifiedLink) (cache.Digest, error) {
	s, _ := l.Link.ByProducts[attest.ByproductActionDigest].(string)
	d, err := cache.ParseDigest(s)
	if err != nil {
		return cache.Digest{}, status.Errorf(codes.InvalidArgument, "link %s: no usable action digest (%q)", l.Link.Name, s)
	}
	if d.Hash != l.Link.Name {
		return cache.Digest{}, status.Errorf(codes.InvalidArgument, "link %s records action digest %s", l.Link.Name, d)
	}
	return d, nil
}

// actionBlobs lists every blob an action needs: the Action, its Command, the input
// tree's Directories and files (the tree validated as the executor would).
func actionBlobs(ctx context.Context, cas cache.BlobStore, ad cache.Digest) ([]cache.Digest, error) {
	a := &repb.Action{}
	if err := cache.ReadProto(ctx, cas, ad, a, 16<<20); err != nil {
		return nil, grpcerr.Wrap(err, "action %s", ad)
	}
	cd, err := cache.FromProto(a.GetCommandDigest())
	if err != nil {
		return nil, err
	}
	root, err := cache.FromProto(a.GetInputRootDigest())
	if err != nil {
		return nil, err
	}
	tree, err := executor.TreeBlobs(ctx, cas, root)
	if err != nil {
		return nil, grpcerr.Wrap(err, "input tree of action %s", ad)
	}
	return append([]cache.Digest{ad, cd}, tree...), nil
}

// copyTree copies the regular files and directories under src to dst.
func copyTree(src, dst string) error {
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		target := filepath.Join(dst, rel)
		switch {
		case d.IsDir():
			return os.MkdirAll(target, 0o755)
		case d.Type().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			return os.WriteFile(target, b, 0o644)
		}
		return nil // locks, sockets: not part of the log's content
	})
}

// zstdMagic starts every zstd frame.
var zstdMagic = []byte{0x28, 0xb5, 0x2f, 0xfd}

// bundleFile reports whether out names a bundle file (tar, or zstd-compressed tar)
// rather than a directory, and whether it is compressed.
func bundleFile(out string) (file, compressed bool) {
	switch {
	case strings.HasSuffix(out, ".tar.zst"):
		return true, true
	case strings.HasSuffix(out, ".tar"):
		return true, false
	}
	return false, false
}

// writeTar writes dir as a tar file at out (sorted, fixed metadata), zstd-compressed
// if asked, atomically. Files are streamed: a toolchain layer can be hundreds of MB.
func writeTar(dir, out string, compressed bool) error {
	tmp := out + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return status.Errorf(codes.Internal, "bundle: %v", err)
	}
	var w io.Writer = f
	var zw *zstd.Encoder
	if compressed {
		if zw, err = zstd.NewWriter(f); err != nil {
			f.Close()
			os.Remove(tmp)
			return status.Errorf(codes.Internal, "bundle: %v", err)
		}
		w = zw
	}
	tw := tar.NewWriter(w)
	var files []string
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			files = append(files, p)
		}
		return err
	})
	sort.Strings(files)
	for _, p := range files {
		if err != nil {
			break
		}
		err = tarFile(tw, dir, p)
	}
	if err == nil {
		err = tw.Close()
	}
	if zw != nil {
		if cerr := zw.Close(); err == nil {
			err = cerr
		}
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, out)
	}
	if err != nil {
		os.Remove(tmp)
		return status.Errorf(codes.Internal, "bundle: %v", err)
	}
	return nil
}

// tarFile appends file p (below dir) to tw with fixed metadata.
func tarFile(tw *tar.Writer, dir, p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	rel, _ := filepath.Rel(dir, p)
	if err := tw.WriteHeader(&tar.Header{Name: filepath.ToSlash(rel), Mode: 0o644, Size: fi.Size(), Typeflag: tar.TypeReg, Format: tar.FormatPAX}); err != nil {
		return err
	}
	_, err = io.Copy(tw, f)
	return err
}

// DefaultMaxBundleBytes bounds what a bundle file may unpack to (kiln rebuild
// --max-bundle-size): a bundle is untrusted until verified, and a small file can claim
// terabytes (zstd, sparse tar entries).
const DefaultMaxBundleBytes = 16 << 30

// maxBundleEntries bounds the number of files a bundle file may hold.
const maxBundleEntries = 1 << 20

// OpenBundle returns the bundle's directory: path itself, or a temp directory holding
// the tar file's contents, at most maxBytes of them (removed by the returned function).
func OpenBundle(path string, maxBytes int64) (string, func(), error) {
	info, err := os.Stat(path)
	if err != nil {
		return "", nil, status.Errorf(codes.InvalidArgument, "bundle: %v", err)
	}
	if info.IsDir() {
		if err := checkBundleTree(path); err != nil {
			return "", nil, err
		}
		return path, func() {}, nil
	}
	dir, err := os.MkdirTemp("", "kiln-bundle-")
	if err != nil {
		return "", nil, status.Errorf(codes.Internal, "bundle: %v", err)
	}
	done := func() { os.RemoveAll(dir) }
	if err := extractTar(path, dir, maxBytes); err != nil {
		done()
		return "", nil, err
	}
	return dir, done, nil
}

// checkBundleTree refuses a bundle directory holding anything but directories and
// regular files: a symlink in an untrusted bundle could point kiln's reads (or a
// careless write) at host files.
func checkBundleTree(dir string) error {
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return status.Errorf(codes.InvalidArgument, "bundle: %v", err)
		}
		if !d.IsDir() && !d.Type().IsRegular() {
			return status.Errorf(codes.InvalidArgument, "bundle %s: %s is not a regular file or directory", dir, p)
		}
		return nil
	})
}

// extractTar unpacks a bundle tar, zstd-compressed or not (told by its first bytes):
// regular files only (not sparse), no absolute or climbing names, at most maxBytes.
func extractTar(path, dir string, maxBytes int64) error {
	f, err := os.Open(path)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "bundle: %v", err)
	}
	defer f.Close()
	br := bufio.NewReader(f)
	var r io.Reader = br
	if head, _ := br.Peek(len(zstdMagic)); bytes.Equal(head, zstdMagic) {
		// kiln writes 8 MiB windows; a frame claiming more would only cost memory.
		zr, err := zstd.NewReader(br, zstd.WithDecoderMaxWindow(64<<20), zstd.WithDecoderConcurrency(1))
		if err != nil {
			return status.Errorf(codes.InvalidArgument, "bundle %s: %v", path, err)
		}
		defer zr.Close()
		r = zr
	}
	tr := tar.NewReader(r)
	left := maxBytes
	for n := 0; ; n++ {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return status.Errorf(codes.InvalidArgument, "bundle %s: %v", path, err)
		}
		name := filepath.Clean(filepath.FromSlash(h.Name))
		if h.Typeflag != tar.TypeReg || filepath.IsAbs(name) || name == ".." || strings.HasPrefix(name, ".."+string(filepath.Separator)) || sparse(h) {
			return status.Errorf(codes.InvalidArgument, "bundle %s: refusing entry %q", path, h.Name)
		}
		if n >= maxBundleEntries {
			return status.Errorf(codes.InvalidArgument, "bundle %s: more than %d files", path, maxBundleEntries)
		}
		if h.Size > left {
			return status.Errorf(codes.InvalidArgument, "bundle %s: unpacks to more than %d bytes (at %q; kiln rebuild --max-bundle-size raises the bound)", path, maxBytes, h.Name)
		}
		left -= h.Size
		target := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
			return status.Errorf(codes.Internal, "bundle: %v", err)
		}
		out, err := os.OpenFile(target, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
		if err != nil {
			return status.Errorf(codes.InvalidArgument, "bundle %s: %v", path, err)
		}
		_, err = io.CopyN(out, tr, h.Size)
		out.Close()
		if err != nil {
			return status.Errorf(codes.InvalidArgument, "bundle %s: %v", path, err)
		}
	}
}

// sparse reports whether h is a GNU sparse file (archive/tar expands its holes, so its
// few bytes in the archive can stand for any size).
func sparse(h *tar.Header) bool {
	for k := range h.PAXRecords {
		if strings.HasPrefix(k, "GNU.sparse.") {
			return true
		}
	}
	return h.Typeflag == tar.TypeGNUSparse
}

// readManifest reads bundle.json.
func readManifest(dir string) (Manifest, error) {
	var m Manifest
	b, err := os.ReadFile(filepath.Join(dir, "bundle.json"))
	if err != nil {
		return m, status.Errorf(codes.InvalidArgument, "bundle: %v", err)
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, status.Errorf(codes.InvalidArgument, "bundle.json: %v", err)
	}
	if m.Version != BundleVersion {
		return m, status.Errorf(codes.InvalidArgument, "bundle.json: version %d, this kiln reads %d", m.Version, BundleVersion)
	}
	return m, nil
}
