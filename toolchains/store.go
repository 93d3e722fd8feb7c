// Package toolchains keeps pinned toolchain images: OCI images identified by manifest
// digest, imported and verified with containerd's content store and layer code,
// unpacked once into read-only root filesystems that sandboxes mount.
//
// On disk, under DATA/toolchains (see docs/toolchains.md):
//
//	content/               containerd content/local store (blobs/sha256/HEX, ingest/)
//	images/HEX.json        one record per image manifest: the file-based index
//	indexes/HEX.json       an image index digest that resolves to a manifest digest
//	names/NAME.json        an informational name -> digest (one file per name)
//	roots/HEX/rootfs       the unpacked root; roots/HEX/complete.json marks it whole
//	locks/, tmp/           flock files and staging directories
//
// Several processes share a data dir (a long-running `kiln serve` and short CLI
// commands), so there is no database and no lock held between calls: every record is
// a small file written with temp+rename and read again on each lookup; flock(2)
// serialises unpacking of one image and keeps GC away from in-flight writes.
package toolchains

import (
	"context"
	_ "crypto/sha256" // go-digest needs the sha256 implementation linked in
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/log"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Options configures a Store.
type Options struct {
	// Default is the toolchain reference Resolve uses for an empty ref (actions without
	// a container-image property). Empty means such actions are refused.
	Default string
	// Pinner pins tags to digests (the lockfile); nil pins nothing.
	Pinner TagPinner
	// Platform selects the manifest of a multi-platform index; nil means this host.
	Platform *ocispec.Platform
	// Logger receives progress and warnings; nil means slog.Default().
	Logger *slog.Logger
}

// Store is the toolchain store of one data dir. It is safe for concurrent use by
// goroutines and by other processes on the same data dir.
type Store struct {
	dir     string // DATA/toolchains
	content content.Store
	opts    Options
	log     *slog.Logger
	clog    *log.Entry // containerd's logger, forwarding to log

	onUnpack func(digest.Digest) // test hook: called once per real unpack
}

// Image is a stored toolchain image, as recorded at import or build time.
type Image struct {
	Digest       digest.Digest        `json:"digest"`    // manifest digest: the toolchain's identity
	MediaType    string               `json:"mediaType"` // manifest media type (OCI or Docker schema 2)
	ManifestSize int64                `json:"manifestSize"`
	Size         int64                `json:"size"` // bytes of manifest, config and layers
	Platform     ocispec.Platform     `json:"platform"`
	Config       ocispec.Descriptor   `json:"config"`
	Layers       []ocispec.Descriptor `json:"layers"`
	DiffIDs      []digest.Digest      `json:"diffIDs"` // uncompressed layer digests, from the config

	// Name is the informational name of the reference that resolved the image, if any.
	Name string `json:"-"`
}

// ManifestDescriptor is the OCI descriptor of the image's manifest.
func (img Image) ManifestDescriptor() ocispec.Descriptor {
	return ocispec.Descriptor{MediaType: img.MediaType, Digest: img.Digest, Size: img.ManifestSize}
}

// Entry is an image with what the store knows around it, for listing and inspection.
type Entry struct {
	Image
	Names   []string        `json:"names"`             // informational names pointing at it
	Indexes []digest.Digest `json:"indexes,omitempty"` // index digests that resolve to it
	RootFS  string          `json:"rootfs,omitempty"`  // unpacked root, if unpacked
}

// imageRecord is the JSON file images/HEX.json.
type imageRecord struct {
	Schema int `json:"schema"`
	Image
}

// indexRecord is the JSON file indexes/HEX.json: an index resolving to a manifest.
type indexRecord struct {
	Schema   int           `json:"schema"`
	Index    digest.Digest `json:"index"`
	Manifest digest.Digest `json:"manifest"`
}

// nameRecord is the JSON file names/NAME.json.
type nameRecord struct {
	Schema int           `json:"schema"`
	Name   string        `json:"name"`
	Digest digest.Digest `json:"digest"`
}

const recordSchema = 1

// Open opens (creating if needed) the toolchain store under dataDir/toolchains.
func Open(ctx context.Context, dataDir string, opts Options) (*Store, error) {
	if dataDir == "" {
		return nil, status.Error(codes.InvalidArgument, "toolchains: empty data dir")
	}
	dir := filepath.Join(dataDir, "toolchains")
	for _, d := range []string{"", "images", "indexes", "names", "locks", "tmp"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return nil, status.Errorf(codes.Internal, "toolchains: %v", err)
		}
	}
	// roots/ is 0700: unpacked roots may hold world-writable-looking modes from images,
	// and nobody but the owner (root) needs to traverse into them on the host.
	if err := os.MkdirAll(filepath.Join(dir, "roots"), 0o700); err != nil {
		return nil, status.Errorf(codes.Internal, "toolchains: %v", err)
	}
	if err := os.Chmod(filepath.Join(dir, "roots"), 0o700); err != nil {
		return nil, status.Errorf(codes.Internal, "toolchains: %v", err)
	}
	// Roots are named by an absolute path without symlinks: that is how the kernel
	// shows overlay layers in mountinfo, which gc compares them with.
	dir, err := canonical(dir)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "toolchains: %v", err)
	}
	cs, err := local.NewStore(filepath.Join(dir, "content"))
	if err != nil {
		return nil, status.Errorf(codes.Internal, "toolchains: open content store: %v", err)
	}
	if opts.Pinner == nil {
		opts.Pinner = noPins{}
	}
	lg := opts.Logger
	if lg == nil {
		lg = slog.Default()
	}
	return &Store{dir: dir, content: cs, opts: opts, log: lg, clog: newContainerdLogger(lg)}, nil
}

// canonical returns dir as an absolute path with every symlink resolved.
func canonical(dir string) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	return filepath.EvalSymlinks(abs)
}

// Dir is the store's directory (DATA/toolchains).
func (s *Store) Dir() string { return s.dir }

func (s *Store) imagePath(d digest.Digest) string {
	return filepath.Join(s.dir, "images", d.Encoded()+".json")
}
func (s *Store) indexPath(d digest.Digest) string {
	return filepath.Join(s.dir, "indexes", d.Encoded()+".json")
}
func (s *Store) namePath(name string) string {
	return filepath.Join(s.dir, "names", url.PathEscape(name)+".json")
}
func (s *Store) rootDir(d digest.Digest) string { return filepath.Join(s.dir, "roots", d.Encoded()) }
func (s *Store) storeLock() string              { return filepath.Join(s.dir, "locks", "store.lock") }
func (s *Store) imageLock(d digest.Digest) string {
	return filepath.Join(s.dir, "locks", d.Encoded()+".lock")
}

// Resolve maps a toolchain reference to a stored image. The digest alone decides; an
// empty ref means Options.Default. Errors: INVALID_ARGUMENT for a malformed ref;
// FAILED_PRECONDITION for an unpinned tag or an image that is not in the store.
func (s *Store) Resolve(ctx context.Context, ref string) (Image, error) {
	if ref == "" {
		if s.opts.Default == "" {
			return Image{}, status.Error(codes.FailedPrecondition,
				"no toolchain: the action has no container-image platform property and no default toolchain is configured")
		}
		ref = s.opts.Default
	}
	r, err := ParseRef(ref)
	if err != nil {
		return Image{}, err
	}
	if !r.Pinned() {
		tagRef := strings.TrimPrefix(ref, dockerScheme)
		d, ok, err := s.opts.Pinner.PinTag(ctx, tagRef)
		if err != nil {
			return Image{}, grpcerr.WrapCode(err, codes.FailedPrecondition, "pin toolchain tag %q", tagRef)
		}
		if !ok {
			return Image{}, status.Errorf(codes.FailedPrecondition,
				"toolchain %q is unpinned: a tag without a digest is refused; use %s@sha256:<digest> (see `kiln toolchain ls`) or pin the tag in the lockfile",
				ref, r.Name)
		}
		if _, err := parseDigest(d.String()); err != nil {
			return Image{}, status.Errorf(codes.FailedPrecondition, "toolchain tag %q is pinned to a malformed digest %q", tagRef, d)
		}
		r.Digest = d
	}
	img, err := s.lookup(r.Digest)
	if err != nil {
		return Image{}, err
	}
	img.Name = r.Name
	if r.Tag != "" {
		img.Name += ":" + r.Tag
	}
	return img, nil
}

// lookup reads the record of a manifest digest, or of an index digest aliasing one.
// It reads the files on every call, so a new import by another process is seen at once.
func (s *Store) lookup(d digest.Digest) (Image, error) {
	img, err := s.readImage(d)
	if err == nil {
		return img, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return Image{}, status.Errorf(codes.Internal, "toolchain %s: %v", d, err)
	}
	var ix indexRecord
	if err := readJSON(s.indexPath(d), &ix); err == nil && ix.Index == d {
		if img, err := s.readImage(ix.Manifest); err == nil {
			return img, nil
		}
	}
	return Image{}, status.Errorf(codes.FailedPrecondition,
		"toolchain image %s is not in the store %s: import it with `kiln toolchain import PATH --data DATA` (an OCI layout or archive exported with `kiln toolchain export`) or build it",
		d, filepath.Dir(s.dir))
}

func (s *Store) readImage(d digest.Digest) (Image, error) {
	var rec imageRecord
	if err := readJSON(s.imagePath(d), &rec); err != nil {
		return Image{}, err
	}
	if rec.Digest != d {
		return Image{}, fmt.Errorf("record %s names digest %s", s.imagePath(d), rec.Digest)
	}
	return rec.Image, nil
}

// List returns every stored image with its names, sorted by digest.
func (s *Store) List(ctx context.Context) ([]Entry, error) {
	ents, err := os.ReadDir(filepath.Join(s.dir, "images"))
	if err != nil {
		return nil, status.Errorf(codes.Internal, "toolchains: %v", err)
	}
	names, err := s.names()
	if err != nil {
		return nil, err
	}
	idx, err := s.indexes()
	if err != nil {
		return nil, err
	}
	var out []Entry
	for _, e := range ents {
		hex, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		d := digest.NewDigestFromEncoded(digest.SHA256, hex)
		if d.Validate() != nil {
			continue
		}
		img, err := s.readImage(d)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue // removed meanwhile
			}
			return nil, status.Errorf(codes.Internal, "toolchains: %v", err)
		}
		out = append(out, s.entry(img, names, idx))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Digest < out[j].Digest })
	return out, nil
}

// Inspect resolves ref and returns the image with its names and unpack state.
func (s *Store) Inspect(ctx context.Context, ref string) (Entry, error) {
	img, err := s.Resolve(ctx, ref)
	if err != nil {
		return Entry{}, err
	}
	names, err := s.names()
	if err != nil {
		return Entry{}, err
	}
	idx, err := s.indexes()
	if err != nil {
		return Entry{}, err
	}
	return s.entry(img, names, idx), nil
}

func (s *Store) entry(img Image, names map[digest.Digest][]string, idx map[digest.Digest][]digest.Digest) Entry {
	e := Entry{Image: img, Names: names[img.Digest], Indexes: idx[img.Digest]}
	if e.Names == nil {
		e.Names = []string{}
	}
	if s.rootComplete(img.Digest) {
		e.RootFS = filepath.Join(s.rootDir(img.Digest), "rootfs")
	}
	return e
}

// names maps digests to their sorted names.
func (s *Store) names() (map[digest.Digest][]string, error) {
	ents, err := os.ReadDir(filepath.Join(s.dir, "names"))
	if err != nil {
		return nil, status.Errorf(codes.Internal, "toolchains: %v", err)
	}
	m := map[digest.Digest][]string{}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") || !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		var nr nameRecord
		if err := readJSON(filepath.Join(s.dir, "names", e.Name()), &nr); err != nil {
			continue // removed meanwhile, or a torn foreign file: names are informational
		}
		m[nr.Digest] = append(m[nr.Digest], nr.Name)
	}
	for _, v := range m {
		sort.Strings(v)
	}
	return m, nil
}

// indexes maps manifest digests to the index digests that alias them.
func (s *Store) indexes() (map[digest.Digest][]digest.Digest, error) {
	ents, err := os.ReadDir(filepath.Join(s.dir, "indexes"))
	if err != nil {
		return nil, status.Errorf(codes.Internal, "toolchains: %v", err)
	}
	m := map[digest.Digest][]digest.Digest{}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") || !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		var ir indexRecord
		if err := readJSON(filepath.Join(s.dir, "indexes", e.Name()), &ir); err != nil {
			continue
		}
		m[ir.Manifest] = append(m[ir.Manifest], ir.Index)
	}
	for _, v := range m {
		sort.Slice(v, func(i, j int) bool { return v[i] < v[j] })
	}
	return m, nil
}

// Remove forgets the image ref resolves to: its record, the index aliases and names
// pointing at it. Blobs and the unpacked root stay until GC.
func (s *Store) Remove(ctx context.Context, ref string) (Image, error) {
	img, err := s.Resolve(ctx, ref)
	if err != nil {
		return Image{}, err
	}
	l, err := lockFile(ctx, s.storeLock(), false)
	if err != nil {
		return Image{}, status.FromContextError(err).Err()
	}
	defer l.Unlock()
	if err := os.Remove(s.imagePath(img.Digest)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return Image{}, status.Errorf(codes.Internal, "remove %s: %v", img.Digest, err)
	}
	if err := s.dropDangling(); err != nil {
		return Image{}, err
	}
	return img, syncDir(filepath.Join(s.dir, "images"))
}

// dropDangling removes names and index aliases whose image record is gone.
// The caller holds the store lock exclusively.
func (s *Store) dropDangling() error {
	for _, sub := range []string{"names", "indexes"} {
		ents, err := os.ReadDir(filepath.Join(s.dir, sub))
		if err != nil {
			return status.Errorf(codes.Internal, "toolchains: %v", err)
		}
		for _, e := range ents {
			p := filepath.Join(s.dir, sub, e.Name())
			if strings.HasPrefix(e.Name(), ".tmp-") {
				continue // an atomic write in progress elsewhere: GC sweeps stale ones
			}
			var target digest.Digest
			if sub == "names" {
				var nr nameRecord
				if readJSON(p, &nr) == nil {
					target = nr.Digest
				}
			} else {
				var ir indexRecord
				if readJSON(p, &ir) == nil {
					target = ir.Manifest
				}
			}
			if target != "" && target.Validate() == nil {
				if _, err := os.Stat(s.imagePath(target)); err == nil {
					continue
				}
			}
			if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return status.Errorf(codes.Internal, "toolchains: %v", err)
			}
		}
	}
	return nil
}
