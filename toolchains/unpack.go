package toolchains

import (
	"archive/tar"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/containerd/errdefs"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// completeMarker is written into roots/HEX/ (beside rootfs/, not inside it) last.
type completeMarker struct {
	Schema   int             `json:"schema"`
	Manifest digest.Digest   `json:"manifest"`
	DiffIDs  []digest.Digest `json:"diffIDs"`
	Policy   int             `json:"policy"`
}

const completeFile = "complete.json"

// RootFS returns the directory holding img's unpacked root filesystem, unpacking it on
// first use. Concurrent calls for one image, from goroutines or processes, unpack it
// once (an flock per image); a root left incomplete by a crash has no marker and is
// redone. The tree is root-owned, has no setuid/setgid or world-writable entries, and
// must be mounted read-only: nothing may write it.
func (s *Store) RootFS(ctx context.Context, img Image) (string, error) {
	ctx = s.withLog(ctx)
	if err := img.Digest.Validate(); err != nil {
		return "", status.Errorf(codes.InvalidArgument, "rootfs: bad image digest %q", img.Digest)
	}
	dir := s.rootDir(img.Digest)
	rootfs := filepath.Join(dir, "rootfs")
	if s.rootComplete(img.Digest) {
		return rootfs, nil
	}
	l, err := lockFile(ctx, s.imageLock(img.Digest), false)
	if err != nil {
		return "", grpcerr.WrapCode(err, codes.Internal, "rootfs %s", img.Digest)
	}
	defer l.Unlock()
	if s.rootComplete(img.Digest) {
		return rootfs, nil // another goroutine or process finished it meanwhile
	}
	if _, err := os.Lstat(dir); err == nil {
		s.log.Warn("toolchain root incomplete (crash?); redoing it", "digest", img.Digest)
		if err := removeTree(dir); err != nil {
			return "", status.Errorf(codes.Internal, "rootfs %s: remove incomplete root: %v", img.Digest, err)
		}
	}
	start := time.Now()
	if err := s.unpack(ctx, img, dir); err != nil {
		return "", err
	}
	s.log.Info("toolchain unpacked", "digest", img.Digest, "layers", len(img.Layers), "duration", time.Since(start))
	if s.onUnpack != nil {
		s.onUnpack(img.Digest)
	}
	return rootfs, nil
}

// rootComplete reports whether roots/HEX has a valid completion marker.
func (s *Store) rootComplete(d digest.Digest) bool {
	var m completeMarker
	if err := readJSON(filepath.Join(s.rootDir(d), completeFile), &m); err != nil {
		return false
	}
	return m.Manifest == d && m.Policy == policyVersion
}

// unpack applies img's layers in a temp dir, syncs it, marks it complete and renames
// it to dir. The caller holds the image lock.
func (s *Store) unpack(ctx context.Context, img Image, dir string) (err error) {
	if len(img.Layers) != len(img.DiffIDs) {
		return status.Errorf(codes.Internal, "rootfs %s: record has %d layers and %d diff_ids", img.Digest, len(img.Layers), len(img.DiffIDs))
	}
	tmp := filepath.Join(filepath.Dir(dir), ".tmp-"+img.Digest.Encoded()+"-"+randomID())
	root := filepath.Join(tmp, "rootfs")
	defer func() {
		if err != nil {
			_ = removeTree(tmp)
		}
	}()
	if err := os.MkdirAll(root, 0o755); err != nil {
		return status.Errorf(codes.Internal, "rootfs %s: %v", img.Digest, err)
	}
	opts := []archive.ApplyOpt{archive.WithFilter(func(hdr *tar.Header) (bool, error) {
		if err := checkEntry(hdr); err != nil {
			return false, err
		}
		applyPolicy(hdr)
		return true, nil
	})}
	if os.Geteuid() != 0 {
		opts = append(opts, archive.WithNoSameOwner()) // unprivileged: files owned by the caller
	}
	for i := range img.Layers {
		if err := s.applyLayer(ctx, root, img, i, opts); err != nil {
			return err
		}
	}
	// The root directory itself: root-owned, not writable by others, whatever a layer said.
	if err := os.Chmod(root, 0o755); err != nil {
		return status.Errorf(codes.Internal, "rootfs %s: %v", img.Digest, err)
	}
	if err := chownRoot(root); err != nil {
		return status.Errorf(codes.Internal, "rootfs %s: %v", img.Digest, err)
	}
	if err := syncFS(root); err != nil {
		return status.Errorf(codes.Internal, "rootfs %s: sync: %v", img.Digest, err)
	}
	m := completeMarker{Schema: recordSchema, Manifest: img.Digest, DiffIDs: img.DiffIDs, Policy: policyVersion}
	if err := writeJSONAtomic(filepath.Join(tmp, completeFile), m); err != nil {
		return status.Errorf(codes.Internal, "rootfs %s: %v", img.Digest, err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		return status.Errorf(codes.Internal, "rootfs %s: %v", img.Digest, err)
	}
	return syncDir(filepath.Dir(dir))
}

// chownRoot makes the root directory owned by root when we are root.
func chownRoot(root string) error {
	if os.Geteuid() != 0 {
		return nil
	}
	return os.Lchown(root, 0, 0)
}

// applyLayer applies layer i with containerd's Apply (whiteouts, opaque directories,
// symlinks resolved inside the root), verifying the blob digest and the diffID as it
// streams. A blob whose bytes no longer match is removed from the store (a blob that
// fails a check on read is treated as missing).
func (s *Store) applyLayer(ctx context.Context, root string, img Image, i int, opts []archive.ApplyOpt) error {
	l := img.Layers[i]
	ra, err := s.content.ReaderAt(ctx, l)
	if err != nil {
		if errdefs.IsNotFound(err) {
			return status.Errorf(codes.FailedPrecondition, "rootfs %s: layer %s is missing from the store; re-import the image", img.Digest, l.Digest)
		}
		return status.Errorf(codes.Internal, "rootfs %s: %v", img.Digest, err)
	}
	defer ra.Close()
	blobDg := digest.Canonical.Digester()
	cr := io.TeeReader(content.NewReader(ra), blobDg.Hash())
	ds, err := compression.DecompressStream(cr)
	if err != nil {
		return s.corrupt(ctx, img, l.Digest, err)
	}
	defer ds.Close()
	diffDg := digest.Canonical.Digester()
	ur := io.TeeReader(ds, diffDg.Hash())
	if _, err := archive.Apply(ctx, root, ur, opts...); err != nil {
		if ctx.Err() != nil {
			return status.FromContextError(ctx.Err()).Err()
		}
		// A policy refusal of a verified blob cannot happen (import checked it); if the
		// blob does not hash right, that is the cause; else report the apply error.
		_, _ = io.Copy(io.Discard, cr)
		if blobDg.Digest() != l.Digest {
			return s.corrupt(ctx, img, l.Digest, err)
		}
		return status.Errorf(codes.Internal, "rootfs %s: apply layer %d (%s): %v", img.Digest, i+1, l.Digest, err)
	}
	if _, err := io.Copy(io.Discard, ur); err != nil {
		return s.corrupt(ctx, img, l.Digest, err)
	}
	if _, err := io.Copy(io.Discard, cr); err != nil {
		return s.corrupt(ctx, img, l.Digest, err)
	}
	if blobDg.Digest() != l.Digest || diffDg.Digest() != img.DiffIDs[i] {
		return s.corrupt(ctx, img, l.Digest, fmt.Errorf("read %s, uncompressed %s", blobDg.Digest(), diffDg.Digest()))
	}
	return nil
}

// corrupt removes a damaged blob and reports the image as needing a re-import.
func (s *Store) corrupt(ctx context.Context, img Image, d digest.Digest, cause error) error {
	if err := s.content.Delete(ctx, d); err != nil && !errdefs.IsNotFound(err) {
		s.log.Error("toolchain: cannot remove corrupt blob", "digest", d, "err", err)
	}
	s.log.Error("toolchain: corrupt layer blob removed", "image", img.Digest, "layer", d, "cause", cause)
	return status.Errorf(codes.FailedPrecondition,
		"rootfs %s: layer blob %s is corrupt on disk (%v) and was removed; re-import the image", img.Digest, d, cause)
}

// syncFS flushes the filesystem holding dir (one syncfs(2) instead of an fsync per file).
func syncFS(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Syncfs(int(f.Fd()))
}
