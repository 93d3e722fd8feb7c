package toolchains

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/images/archive"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ImportOptions tunes Import.
type ImportOptions struct {
	// Name is an informational name (NAME[:TAG]) given to the imported image, in
	// addition to names recorded in the source's index annotations. It requires a
	// source holding exactly one image.
	Name string
}

// maxJSONBlob bounds manifests, indexes and configs read into memory.
const maxJSONBlob = 8 << 20

// Import verifies and stores the images of src: an OCI image layout directory, an OCI
// archive tar, or a `docker save` tar (optionally gzip- or zstd-compressed). Every blob
// is checked against its digest, every config's diff_ids against its layers, every
// layer entry against the unpack policy; only then is anything committed. A refused
// image is an INVALID_ARGUMENT status and leaves no blob, record or root behind.
//
// For an image index, the manifest for Options.Platform (this host by default) is
// imported and the index digest recorded as an alias of it.
func (s *Store) Import(ctx context.Context, src string, opts ImportOptions) ([]Image, error) {
	ctx = s.withLog(ctx)
	var extra []string
	if opts.Name != "" {
		n, err := parseName(opts.Name)
		if err != nil {
			return nil, err
		}
		extra = append(extra, n)
	}
	fi, err := os.Stat(src)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "import %s: %v", src, unwrapPathErr(err))
	}
	t, err := s.begin(ctx)
	if err != nil {
		return nil, err
	}
	defer t.done(ctx)

	var (
		prov content.Provider
		top  ocispec.Index
	)
	if fi.IsDir() {
		prov, top, err = openLayout(src)
	} else {
		prov, top, err = t.stageArchive(ctx, src)
	}
	if err != nil {
		return nil, err
	}

	found, err := s.importIndex(ctx, t, prov, top)
	if err != nil {
		return nil, err
	}
	if len(extra) > 0 && len(found) != 1 {
		return nil, status.Errorf(codes.InvalidArgument, "import %s: a name was given but the source holds %d images", src, len(found))
	}
	err = t.commit(ctx, func() error {
		for _, f := range found {
			if err := s.writeImageRecords(f.img, f.indexes, append(f.names, extra...)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	out := make([]Image, len(found))
	for i, f := range found {
		out[i] = f.img
		s.log.Info("toolchain imported", "digest", f.img.Digest, "size", f.img.Size, "names", f.names)
	}
	return out, nil
}

// foundImage is one verified image of an import with the aliases and names it gets.
type foundImage struct {
	img     Image
	indexes []digest.Digest
	names   []string
}

// parseName validates an informational name (NAME[:TAG], no digest).
func parseName(name string) (string, error) {
	r, err := ParseRef(name)
	if err != nil {
		return "", err
	}
	if r.Pinned() || r.Name == "" {
		return "", status.Errorf(codes.InvalidArgument, "name %q must be NAME[:TAG] without a digest", name)
	}
	return strings.TrimPrefix(name, dockerScheme), nil
}

// importIndex verifies every image the top-level index lists and stages its blobs.
func (s *Store) importIndex(ctx context.Context, t *txn, prov content.Provider, top ocispec.Index) ([]*foundImage, error) {
	if top.SchemaVersion != 2 {
		return nil, statusInvalid("index has schemaVersion %d, want 2", top.SchemaVersion)
	}
	var (
		out  []*foundImage
		byMf = map[digest.Digest]*foundImage{}
	)
	add := func(img Image, index digest.Digest, ann map[string]string) {
		f := byMf[img.Digest]
		if f == nil {
			f = &foundImage{img: img}
			byMf[img.Digest] = f
			out = append(out, f)
		}
		if index != "" && !contains(f.indexes, index) {
			f.indexes = append(f.indexes, index)
		}
		if n := nameFromAnnotations(ann); n != "" && !contains(f.names, n) {
			f.names = append(f.names, n)
		}
	}
	for _, desc := range top.Manifests {
		if err := ctx.Err(); err != nil {
			return nil, status.FromContextError(err).Err()
		}
		switch desc.MediaType {
		case ocispec.MediaTypeImageManifest, images.MediaTypeDockerSchema2Manifest:
			if f := byMf[desc.Digest]; f != nil {
				add(f.img, "", desc.Annotations) // listed again under another name
				continue
			}
			img, err := s.importManifest(ctx, t, prov, desc)
			if err != nil {
				return nil, err
			}
			add(img, "", desc.Annotations)
		case ocispec.MediaTypeImageIndex, images.MediaTypeDockerSchema2ManifestList:
			img, err := s.importPlatform(ctx, t, prov, desc, 0)
			if err != nil {
				return nil, err
			}
			add(img, desc.Digest, desc.Annotations)
		default:
			s.log.Warn("toolchain import: skipping index entry of unsupported type", "digest", desc.Digest, "mediaType", desc.MediaType)
		}
	}
	if len(out) == 0 {
		return nil, statusInvalid("the source lists no image manifest")
	}
	for _, f := range out {
		sort.Strings(f.names)
	}
	return out, nil
}

// importPlatform picks the manifest of an image index for the store's platform.
func (s *Store) importPlatform(ctx context.Context, t *txn, prov content.Provider, desc ocispec.Descriptor, depth int) (Image, error) {
	if depth > 2 {
		return Image{}, statusInvalid("index %s: indexes nested too deep", desc.Digest)
	}
	b, err := t.putJSON(ctx, prov, desc, "index")
	if err != nil {
		return Image{}, err
	}
	var idx ocispec.Index
	if err := json.Unmarshal(b, &idx); err != nil {
		return Image{}, statusInvalid("index %s: %v", desc.Digest, err)
	}
	want := platforms.DefaultSpec()
	if s.opts.Platform != nil {
		want = *s.opts.Platform
	}
	m := platforms.Only(want)
	var cands []ocispec.Descriptor
	for _, c := range idx.Manifests {
		if c.Platform == nil || m.Match(*c.Platform) {
			cands = append(cands, c)
		}
	}
	sort.SliceStable(cands, func(i, j int) bool {
		if cands[i].Platform == nil || cands[j].Platform == nil {
			return cands[i].Platform != nil
		}
		return m.Less(*cands[i].Platform, *cands[j].Platform)
	})
	for _, c := range cands {
		switch c.MediaType {
		case ocispec.MediaTypeImageManifest, images.MediaTypeDockerSchema2Manifest:
			return s.importManifest(ctx, t, prov, c)
		case ocispec.MediaTypeImageIndex, images.MediaTypeDockerSchema2ManifestList:
			return s.importPlatform(ctx, t, prov, c, depth+1)
		}
	}
	return Image{}, statusInvalid("index %s has no image manifest for %s", desc.Digest, platforms.Format(want))
}

// importManifest verifies one image manifest, its config and layers, staging them.
func (s *Store) importManifest(ctx context.Context, t *txn, prov content.Provider, desc ocispec.Descriptor) (Image, error) {
	b, err := t.putJSON(ctx, prov, desc, "manifest")
	if err != nil {
		return Image{}, err
	}
	var mf ocispec.Manifest
	if err := json.Unmarshal(b, &mf); err != nil {
		return Image{}, statusInvalid("manifest %s: %v", desc.Digest, err)
	}
	if mf.SchemaVersion != 2 {
		return Image{}, statusInvalid("manifest %s: schemaVersion %d, want 2", desc.Digest, mf.SchemaVersion)
	}
	if mf.MediaType != "" && mf.MediaType != desc.MediaType {
		return Image{}, statusInvalid("manifest %s: media type %q, but the index says %q", desc.Digest, mf.MediaType, desc.MediaType)
	}
	switch mf.Config.MediaType {
	case ocispec.MediaTypeImageConfig, images.MediaTypeDockerSchema2Config:
	default:
		return Image{}, statusInvalid("manifest %s: unsupported config media type %q", desc.Digest, mf.Config.MediaType)
	}
	cb, err := t.putJSON(ctx, prov, mf.Config, "config")
	if err != nil {
		return Image{}, err
	}
	var cfg ocispec.Image
	if err := json.Unmarshal(cb, &cfg); err != nil {
		return Image{}, statusInvalid("config %s: %v", mf.Config.Digest, err)
	}
	if cfg.OS != "linux" {
		return Image{}, statusInvalid("config %s: os %q, want linux", mf.Config.Digest, cfg.OS)
	}
	if cfg.RootFS.Type != "layers" || len(cfg.RootFS.DiffIDs) != len(mf.Layers) {
		return Image{}, statusInvalid("manifest %s has %d layers but its config lists %d diff_ids",
			desc.Digest, len(mf.Layers), len(cfg.RootFS.DiffIDs))
	}
	if len(mf.Layers) == 0 {
		return Image{}, statusInvalid("manifest %s has no layers", desc.Digest)
	}
	img := Image{
		Digest:       desc.Digest,
		MediaType:    desc.MediaType,
		ManifestSize: desc.Size,
		Size:         desc.Size + mf.Config.Size,
		Platform:     ocispec.Platform{OS: cfg.OS, Architecture: cfg.Architecture, Variant: cfg.Variant, OSVersion: cfg.OSVersion},
		Config:       plainDesc(mf.Config),
		DiffIDs:      cfg.RootFS.DiffIDs,
	}
	for i, l := range mf.Layers {
		if !layerMediaTypes[l.MediaType] {
			return Image{}, statusInvalid("layer %d of manifest %s: unsupported media type %q", i+1, desc.Digest, l.MediaType)
		}
		if len(l.URLs) > 0 {
			return Image{}, statusInvalid("layer %d of manifest %s is a foreign layer with URLs; only self-contained images are accepted", i+1, desc.Digest)
		}
		want := cfg.RootFS.DiffIDs[i]
		_, err := t.put(ctx, plainDesc(l), func(w io.Writer) error {
			ra, err := prov.ReaderAt(ctx, l)
			if err != nil {
				return missingBlob(err, "layer", i+1, l.Digest, desc.Digest)
			}
			defer ra.Close()
			r := io.TeeReader(content.NewReader(ra), w)
			diffID, err := scanLayer(r)
			_, _ = io.Copy(io.Discard, r) // hash the whole blob, even past a parse error
			if err != nil {
				return statusInvalid("layer %d (%s) of manifest %s: %v", i+1, l.Digest, desc.Digest, err)
			}
			if diffID != want {
				return statusInvalid("layer %d (%s) of manifest %s: uncompressed digest %s does not match the config's diff_id %s",
					i+1, l.Digest, desc.Digest, diffID, want)
			}
			return nil
		})
		if err != nil {
			return Image{}, err
		}
		img.Layers = append(img.Layers, plainDesc(l))
		img.Size += l.Size
	}
	return img, nil
}

// putJSON reads a small JSON blob from prov, verifies it and stages it.
func (t *txn) putJSON(ctx context.Context, prov content.Provider, desc ocispec.Descriptor, what string) ([]byte, error) {
	if err := desc.Digest.Validate(); err != nil {
		return nil, statusInvalid("%s descriptor: bad digest %q: %v", what, desc.Digest, err)
	}
	if desc.Size < 0 || desc.Size > maxJSONBlob {
		return nil, statusInvalid("%s %s: size %d out of range", what, desc.Digest, desc.Size)
	}
	var buf bytes.Buffer
	_, err := t.put(ctx, plainDesc(desc), func(w io.Writer) error {
		ra, err := prov.ReaderAt(ctx, desc)
		if err != nil {
			return missingBlob(err, what, 0, desc.Digest, "")
		}
		defer ra.Close()
		_, err = io.Copy(io.MultiWriter(w, &buf), io.LimitReader(content.NewReader(ra), maxJSONBlob+1))
		return err
	})
	if err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// missingBlob explains a blob the source does not have.
func missingBlob(err error, what string, n int, d, parent digest.Digest) error {
	if errdefs.IsNotFound(err) || errors.Is(err, fs.ErrNotExist) {
		where := ""
		if parent != "" {
			where = fmt.Sprintf(" of manifest %s", parent)
		}
		num := ""
		if n > 0 {
			num = fmt.Sprintf(" %d", n)
		}
		return statusInvalid("%s%s%s (%s) is missing from the source: it is truncated, incomplete or was altered", what, num, where, d)
	}
	return status.Errorf(codes.Internal, "read %s %s: %v", what, d, err)
}

// plainDesc keeps only the fields that identify a blob.
func plainDesc(d ocispec.Descriptor) ocispec.Descriptor {
	return ocispec.Descriptor{MediaType: d.MediaType, Digest: d.Digest, Size: d.Size}
}

// nameFromAnnotations returns the image name an index entry carries, if usable.
func nameFromAnnotations(ann map[string]string) string {
	for _, k := range []string{images.AnnotationImageName, ocispec.AnnotationRefName} {
		v := ann[k]
		if v == "" || !strings.ContainsAny(v, ":/") {
			continue // a bare tag ("latest") is not a name
		}
		if n, err := parseName(v); err == nil {
			return n
		}
	}
	return ""
}

func contains[T comparable](xs []T, x T) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}

// stageArchive reads an OCI archive or docker-save tar into a staging content store
// with containerd's importer (which keys every file by its computed digest), and
// returns the store and the archive's top-level index.
func (t *txn) stageArchive(ctx context.Context, src string) (content.Provider, ocispec.Index, error) {
	f, err := os.Open(src)
	if err != nil {
		return nil, ocispec.Index{}, status.Errorf(codes.InvalidArgument, "import %s: %v", src, unwrapPathErr(err))
	}
	defer f.Close()
	ds, err := compression.DecompressStream(f)
	if err != nil {
		return nil, ocispec.Index{}, statusInvalid("%s: %v", src, err)
	}
	defer ds.Close()
	staging, err := local.NewStore(t.stagingDir())
	if err != nil {
		return nil, ocispec.Index{}, status.Errorf(codes.Internal, "toolchains: staging store: %v", err)
	}
	desc, err := archive.ImportIndex(ctx, staging, ds)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ocispec.Index{}, status.FromContextError(ctx.Err()).Err()
		}
		return nil, ocispec.Index{}, statusInvalid("%s is not a readable OCI archive or docker-save tar: %v", src, err)
	}
	b, err := content.ReadBlob(ctx, staging, desc)
	if err != nil {
		return nil, ocispec.Index{}, statusInvalid("%s: index: %v", src, err)
	}
	var idx ocispec.Index
	if err := json.Unmarshal(b, &idx); err != nil {
		return nil, ocispec.Index{}, statusInvalid("%s: index.json: %v", src, err)
	}
	return staging, idx, nil
}

// openLayout opens an OCI image layout directory as a content provider.
func openLayout(dir string) (content.Provider, ocispec.Index, error) {
	var lay ocispec.ImageLayout
	if err := readSmallJSON(filepath.Join(dir, ocispec.ImageLayoutFile), &lay); err != nil {
		return nil, ocispec.Index{}, statusInvalid("%s is not an OCI image layout: %v", dir, err)
	}
	if lay.Version != ocispec.ImageLayoutVersion {
		return nil, ocispec.Index{}, statusInvalid("%s: unsupported OCI layout version %q", dir, lay.Version)
	}
	var idx ocispec.Index
	if err := readSmallJSON(filepath.Join(dir, ocispec.ImageIndexFile), &idx); err != nil {
		return nil, ocispec.Index{}, statusInvalid("%s: %v", dir, err)
	}
	return layoutProvider{dir: dir}, idx, nil
}

func readSmallJSON(path string, v any) error {
	f, err := os.Open(path)
	if err != nil {
		return unwrapPathErr(err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxJSONBlob+1))
	if err != nil {
		return err
	}
	if len(b) > maxJSONBlob {
		return fmt.Errorf("%s: %w", filepath.Base(path), errLimit)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s: %w", filepath.Base(path), err)
	}
	return nil
}

// layoutProvider serves the blobs of an OCI image layout directory (blobs/ALG/HEX).
// It does not verify them: txn.put does.
type layoutProvider struct{ dir string }

func (p layoutProvider) ReaderAt(ctx context.Context, desc ocispec.Descriptor) (content.ReaderAt, error) {
	if err := desc.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %v", errdefs.ErrInvalidArgument, err)
	}
	path := filepath.Join(p.dir, "blobs", desc.Digest.Algorithm().String(), desc.Digest.Encoded())
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("blob %s: %w", desc.Digest, errdefs.ErrNotFound)
		}
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("blob %s is not a regular file: %w", desc.Digest, errdefs.ErrNotFound)
	}
	return &fileReaderAt{File: f, size: fi.Size()}, nil
}

type fileReaderAt struct {
	*os.File
	size int64
}

func (f *fileReaderAt) Size() int64 { return f.size }

// unwrapPathErr drops the path from an *fs.PathError (callers name the path themselves).
func unwrapPathErr(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
