package toolchains

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// BuildOptions tunes Build.
type BuildOptions struct {
	// Name is an informational NAME[:TAG] recorded for the image (not part of it).
	Name string
	// Epoch is the modification time, in Unix seconds, of every entry and the config's
	// created time (SOURCE_DATE_EPOCH); 0 is 1970-01-01.
	Epoch int64
	// Architecture of the image config; empty means this host's (runtime.GOARCH).
	Architecture string
}

// DefaultPath is the PATH recorded in built images' configs (kiln itself never uses
// an image's environment: an action's environment is exactly its Command's).
const DefaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Build makes a single-layer OCI image of the directory rootfs and stores it. The
// image depends only on the tree's names, contents, permission bits, symlink targets
// and hard-link structure, so the same tree gives the same manifest digest on any
// machine: entries in sorted order, every mtime Epoch, uid/gid 0 with no user names,
// no extended attributes or other host metadata, an uncompressed layer (so no
// compressor version can change the bytes), and a fixed config without history.
// Hard links within the tree are stored as hard links. Device nodes and sockets are
// refused (INVALID_ARGUMENT): a toolchain root may not contain them.
func (s *Store) Build(ctx context.Context, rootfs string, opts BuildOptions) (Image, error) {
	ctx = s.withLog(ctx)
	var names []string
	if opts.Name != "" {
		n, err := parseName(opts.Name)
		if err != nil {
			return Image{}, err
		}
		names = append(names, n)
	}
	fi, err := os.Stat(rootfs)
	if err != nil {
		return Image{}, status.Errorf(codes.InvalidArgument, "build: rootfs %s: %v", rootfs, unwrapPathErr(err))
	}
	if !fi.IsDir() {
		return Image{}, status.Errorf(codes.InvalidArgument, "build: rootfs %s is not a directory", rootfs)
	}
	arch := opts.Architecture
	if arch == "" {
		arch = runtime.GOARCH
	}
	mtime := time.Unix(opts.Epoch, 0).UTC()

	t, err := s.begin(ctx)
	if err != nil {
		return Image{}, err
	}
	defer t.done(ctx)

	layer, err := t.put(ctx, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer}, func(w io.Writer) error {
		return writeTree(ctx, w, rootfs, mtime)
	})
	if err != nil {
		return Image{}, err
	}
	cfg := ocispec.Image{
		Created:  &mtime,
		Platform: ocispec.Platform{OS: "linux", Architecture: arch},
		Config:   ocispec.ImageConfig{Env: []string{DefaultPath}},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{layer.Digest}},
	}
	config, err := t.putBytes(ctx, ocispec.MediaTypeImageConfig, cfg)
	if err != nil {
		return Image{}, err
	}
	mf := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    config,
		Layers:    []ocispec.Descriptor{layer},
	}
	manifest, err := t.putBytes(ctx, ocispec.MediaTypeImageManifest, mf)
	if err != nil {
		return Image{}, err
	}
	img := Image{
		Digest:       manifest.Digest,
		MediaType:    manifest.MediaType,
		ManifestSize: manifest.Size,
		Size:         manifest.Size + config.Size + layer.Size,
		Platform:     cfg.Platform,
		Config:       config,
		Layers:       []ocispec.Descriptor{layer},
		DiffIDs:      []digest.Digest{layer.Digest},
	}
	if err := t.commit(ctx, func() error { return s.writeImageRecords(img, nil, names) }); err != nil {
		return Image{}, err
	}
	s.log.Info("toolchain built", "digest", img.Digest, "size", img.Size, "rootfs", rootfs)
	return img, nil
}

// putBytes stages the JSON encoding of v as a blob of the given media type.
func (t *txn) putBytes(ctx context.Context, mediaType string, v any) (ocispec.Descriptor, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return ocispec.Descriptor{}, status.Errorf(codes.Internal, "toolchains: %v", err)
	}
	return t.put(ctx, ocispec.Descriptor{MediaType: mediaType}, func(w io.Writer) error {
		_, err := io.Copy(w, bytes.NewReader(b))
		return err
	})
}

// writeTree writes the tar stream of the tree under root (not including root itself).
func writeTree(ctx context.Context, w io.Writer, root string, mtime time.Time) error {
	tw := tar.NewWriter(w)
	type inode struct{ dev, ino uint64 }
	links := map[inode]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if p == root {
			return nil
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		name := filepath.ToSlash(rel)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		hdr := &tar.Header{
			Name:    name,
			Mode:    tarMode(fi.Mode()),
			ModTime: mtime,
			Format:  tar.FormatPAX,
		}
		mode := fi.Mode()
		switch {
		case mode.IsDir():
			hdr.Typeflag = tar.TypeDir
			hdr.Name += "/"
		case mode.IsRegular():
			st, ok := fi.Sys().(*syscall.Stat_t)
			if ok && st.Nlink > 1 {
				key := inode{uint64(st.Dev), st.Ino}
				if first, seen := links[key]; seen {
					hdr.Typeflag = tar.TypeLink
					hdr.Linkname = first
					break
				}
				links[key] = name
			}
			hdr.Typeflag = tar.TypeReg
			hdr.Size = fi.Size()
		case mode&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			hdr.Typeflag = tar.TypeSymlink
			hdr.Linkname = target
			hdr.Mode = 0o777
		case mode&fs.ModeNamedPipe != 0:
			hdr.Typeflag = tar.TypeFifo
		case mode&fs.ModeDevice != 0:
			return status.Errorf(codes.InvalidArgument, "build: %s is a device node; toolchain roots may not contain device nodes (remove it)", name)
		default:
			return status.Errorf(codes.InvalidArgument, "build: %s has unsupported file type %v (remove it)", name, mode.Type())
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if hdr.Typeflag == tar.TypeReg {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			n, err := io.Copy(tw, io.LimitReader(f, hdr.Size))
			f.Close()
			if err != nil {
				return err
			}
			if n != hdr.Size {
				return status.Errorf(codes.Aborted, "build: %s changed while it was read", name)
			}
		}
		return nil
	})
	if err != nil {
		if ctx.Err() != nil {
			return status.FromContextError(ctx.Err()).Err()
		}
		if _, ok := status.FromError(err); ok {
			return err
		}
		return status.Errorf(codes.InvalidArgument, "build: %v", err)
	}
	if err := tw.Close(); err != nil {
		return status.Errorf(codes.Internal, "build: %v", err)
	}
	return nil
}

// tarMode converts permission and special bits of a file mode to tar's encoding.
func tarMode(m fs.FileMode) int64 {
	mode := int64(m.Perm())
	if m&fs.ModeSetuid != 0 {
		mode |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		mode |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		mode |= 0o1000
	}
	return mode
}
