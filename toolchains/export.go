package toolchains

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Export writes the image ref resolves to as an OCI image layout: a directory, or an
// OCI archive (a tar of that layout) when dest ends in ".tar". The manifest, config
// and layers are the stored bytes, so importing the result anywhere gives the same
// manifest digest; the index lists the image once per informational name. dest must
// not exist; it appears complete or not at all.
func (s *Store) Export(ctx context.Context, ref, dest string) error {
	ctx = s.withLog(ctx)
	img, err := s.Resolve(ctx, ref)
	if err != nil {
		return err
	}
	if _, err := os.Lstat(dest); err == nil {
		return status.Errorf(codes.AlreadyExists, "export: %s already exists", dest)
	}
	names, err := s.names()
	if err != nil {
		return err
	}
	idx := exportIndex(img, names[img.Digest])
	idxBytes, err := json.Marshal(idx)
	if err != nil {
		return status.Errorf(codes.Internal, "export: %v", err)
	}
	layoutBytes, _ := json.Marshal(ocispec.ImageLayout{Version: ocispec.ImageLayoutVersion})

	blobs := append([]ocispec.Descriptor{img.ManifestDescriptor(), img.Config}, img.Layers...)
	sort.Slice(blobs, func(i, j int) bool { return blobs[i].Digest < blobs[j].Digest })

	var lw layoutWriter
	if strings.HasSuffix(dest, ".tar") {
		lw, err = newTarLayout(dest)
	} else {
		lw, err = newDirLayout(dest)
	}
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "export: %v", err)
	}
	ok := false
	defer func() {
		if !ok {
			lw.abort()
		}
	}()
	if err := lw.file(ocispec.ImageLayoutFile, bytes.NewReader(layoutBytes), int64(len(layoutBytes))); err != nil {
		return status.Errorf(codes.Internal, "export: %v", err)
	}
	if err := lw.file(ocispec.ImageIndexFile, bytes.NewReader(idxBytes), int64(len(idxBytes))); err != nil {
		return status.Errorf(codes.Internal, "export: %v", err)
	}
	seen := map[digest.Digest]bool{}
	for _, b := range blobs {
		if seen[b.Digest] {
			continue
		}
		seen[b.Digest] = true
		if err := s.exportBlob(ctx, lw, img, b); err != nil {
			return err
		}
	}
	if err := lw.commit(); err != nil {
		return status.Errorf(codes.Internal, "export: %v", err)
	}
	ok = true
	return nil
}

// exportIndex is the index.json of an exported image: one entry per name (or one
// without a name), in name order.
func exportIndex(img Image, names []string) ocispec.Index {
	idx := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex}
	md := img.ManifestDescriptor()
	if len(names) == 0 {
		idx.Manifests = []ocispec.Descriptor{md}
	}
	for _, n := range names {
		d := md
		// As containerd does: the full name in its annotation, the tag in the OCI one.
		refName := n
		if r, err := ParseRef(n); err == nil && r.Tag != "" {
			refName = r.Tag
		}
		d.Annotations = map[string]string{images.AnnotationImageName: n, ocispec.AnnotationRefName: refName}
		idx.Manifests = append(idx.Manifests, d)
	}
	return idx
}

// exportBlob copies one stored blob into the layout, checking its digest as it goes.
func (s *Store) exportBlob(ctx context.Context, lw layoutWriter, img Image, b ocispec.Descriptor) error {
	ra, err := s.content.ReaderAt(ctx, b)
	if err != nil {
		return status.Errorf(codes.FailedPrecondition, "export %s: blob %s: %v; re-import the image", img.Digest, b.Digest, err)
	}
	defer ra.Close()
	if ra.Size() != b.Size {
		return status.Errorf(codes.DataLoss, "export %s: blob %s has %d bytes, want %d", img.Digest, b.Digest, ra.Size(), b.Size)
	}
	dg := digest.Canonical.Digester()
	r := io.TeeReader(content.NewReader(ra), dg.Hash())
	if err := lw.file(path.Join("blobs", b.Digest.Algorithm().String(), b.Digest.Encoded()), r, b.Size); err != nil {
		return status.Errorf(codes.Internal, "export: %v", err)
	}
	if dg.Digest() != b.Digest {
		return s.corrupt(ctx, img, b.Digest, errors.New("digest mismatch on export"))
	}
	return nil
}

// layoutWriter receives the files of an OCI layout, in order.
type layoutWriter interface {
	file(name string, r io.Reader, size int64) error
	commit() error // make the result appear at its destination
	abort()
}

// dirLayout writes a layout directory in a temp dir, renamed into place on commit.
type dirLayout struct{ dest, tmp string }

func newDirLayout(dest string) (*dirLayout, error) {
	tmp := filepath.Join(filepath.Dir(dest), ".tmp-"+filepath.Base(dest)+"-"+randomID())
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return nil, err
	}
	return &dirLayout{dest: dest, tmp: tmp}, nil
}

func (d *dirLayout) file(name string, r io.Reader, size int64) error {
	p := filepath.Join(d.tmp, filepath.FromSlash(name))
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	n, err := io.Copy(f, r)
	if err == nil && n != size {
		err = fmt.Errorf("%s: wrote %d bytes, want %d", name, n, size)
	}
	if err == nil {
		err = f.Sync()
	}
	if err1 := f.Close(); err == nil {
		err = err1
	}
	return err
}

func (d *dirLayout) commit() error {
	for _, sub := range []string{"blobs/sha256", "blobs", ""} {
		if err := syncDir(filepath.Join(d.tmp, sub)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	if err := os.Rename(d.tmp, d.dest); err != nil {
		return err
	}
	return syncDir(filepath.Dir(d.dest))
}

func (d *dirLayout) abort() { _ = os.RemoveAll(d.tmp) }

// tarLayout writes an OCI archive: a deterministic tar (fixed mtimes, uid 0, sorted
// blobs) of the layout, via a temp file renamed into place on commit.
type tarLayout struct {
	dest string
	f    *os.File
	tw   *tar.Writer
	dirs map[string]bool
}

func newTarLayout(dest string) (*tarLayout, error) {
	f, err := os.CreateTemp(filepath.Dir(dest), ".tmp-"+filepath.Base(dest)+"-")
	if err != nil {
		return nil, err
	}
	return &tarLayout{dest: dest, f: f, tw: tar.NewWriter(f), dirs: map[string]bool{}}, nil
}

func (t *tarLayout) file(name string, r io.Reader, size int64) error {
	if dir := path.Dir(name); dir != "." {
		var parents []string
		for d := dir; d != "."; d = path.Dir(d) {
			parents = append([]string{d}, parents...)
		}
		for _, d := range parents {
			if t.dirs[d] {
				continue
			}
			t.dirs[d] = true
			if err := t.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: time.Unix(0, 0), Format: tar.FormatPAX}); err != nil {
				return err
			}
		}
	}
	if err := t.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: size, ModTime: time.Unix(0, 0), Format: tar.FormatPAX}); err != nil {
		return err
	}
	_, err := io.Copy(t.tw, r)
	return err
}

func (t *tarLayout) commit() error {
	if err := t.tw.Close(); err != nil {
		return err
	}
	if err := t.f.Sync(); err != nil {
		return err
	}
	if err := t.f.Close(); err != nil {
		return err
	}
	if err := os.Rename(t.f.Name(), t.dest); err != nil {
		return err
	}
	return syncDir(filepath.Dir(t.dest))
}

func (t *tarLayout) abort() {
	t.f.Close()
	os.Remove(t.f.Name())
}
