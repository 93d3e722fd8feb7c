package toolchains

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// GCStats says what a GC removed.
type GCStats struct {
	Roots     int   `json:"roots"`     // unpacked roots (and leftovers of interrupted unpacks)
	Blobs     int   `json:"blobs"`     // content blobs no image references
	BlobBytes int64 `json:"blobBytes"` // their size
	Staging   int   `json:"staging"`   // leftovers of interrupted imports and builds
	InUse     int   `json:"inUse"`     // roots of removed images kept because a mount still uses them
}

// staleAge is how old a foreign ingest or torn temp file must be before GC removes it.
const staleAge = time.Hour

// GC removes what no image record references: unpacked roots of removed images, their
// blobs, names and aliases pointing nowhere, and leftovers of interrupted imports,
// builds and unpacks. It holds the store lock exclusively (waiting for in-flight
// commits); roots being unpacked right now (image lock held), and roots a mount
// still uses (a sandbox overlay of a running kiln), are left alone.
func (s *Store) GC(ctx context.Context) (GCStats, error) {
	ctx = s.withLog(ctx)
	var st GCStats
	l, err := lockFile(ctx, s.storeLock(), false)
	if err != nil {
		return st, status.FromContextError(err).Err()
	}
	defer l.Unlock()

	live := map[digest.Digest]bool{}
	blobs := map[digest.Digest]bool{}
	ents, err := s.List(ctx)
	if err != nil {
		return st, err
	}
	for _, e := range ents {
		live[e.Digest] = true
		blobs[e.Digest], blobs[e.Config.Digest] = true, true
		for _, l := range e.Layers {
			blobs[l.Digest] = true
		}
	}
	if err := s.dropDangling(); err != nil {
		return st, err
	}

	// Roots.
	rootsDir := filepath.Join(s.dir, "roots")
	rents, err := os.ReadDir(rootsDir)
	if err != nil {
		return st, status.Errorf(codes.Internal, "gc: %v", err)
	}
	for _, e := range rents {
		name := e.Name()
		hex := strings.TrimPrefix(name, ".tmp-")
		tmp := hex != name
		if tmp {
			hex, _, _ = strings.Cut(hex, "-")
		}
		d := digest.NewDigestFromEncoded(digest.SHA256, hex)
		if d.Validate() != nil {
			continue
		}
		if !tmp && live[d] && s.rootComplete(d) {
			continue
		}
		il, ok, err := tryLockFile(s.imageLock(d))
		if err != nil {
			return st, status.Errorf(codes.Internal, "gc: %v", err)
		}
		if !ok {
			continue // being unpacked right now
		}
		if tmp || !live[d] || !s.rootComplete(d) {
			// mountinfo is read right before each removal, to keep the window in which
			// a sandbox can mount the root unseen as short as possible.
			inUse, err := mountedPaths()
			if err != nil {
				il.Unlock()
				return st, status.Errorf(codes.Internal, "gc: %v", err)
			}
			if !tmp && inUse.uses(filepath.Join(rootsDir, name)) {
				s.log.Warn("gc: keeping the root of a removed image: a mount still uses it", "digest", d)
				st.InUse++
				il.Unlock()
				continue
			}
			if err := removeTree(filepath.Join(rootsDir, name)); err != nil {
				il.Unlock()
				return st, status.Errorf(codes.Internal, "gc: remove root %s: %v", name, err)
			}
			st.Roots++
		}
		il.Unlock()
	}

	// Blobs.
	var dead []content.Info
	if err := s.content.Walk(ctx, func(info content.Info) error {
		if !blobs[info.Digest] {
			dead = append(dead, info)
		}
		return nil
	}); err != nil {
		return st, status.Errorf(codes.Internal, "gc: walk content: %v", err)
	}
	for _, info := range dead {
		if err := s.content.Delete(ctx, info.Digest); err != nil {
			return st, status.Errorf(codes.Internal, "gc: delete blob %s: %v", info.Digest, err)
		}
		st.Blobs++
		st.BlobBytes += info.Size
	}

	// Ingests and staging of txns whose process is gone (their txn lock is free).
	statuses, err := s.content.ListStatuses(ctx)
	if err != nil {
		return st, status.Errorf(codes.Internal, "gc: list ingests: %v", err)
	}
	for _, is := range statuses {
		id := txnOfRef(is.Ref)
		stale := false
		if id == "" {
			stale = time.Since(is.UpdatedAt) > staleAge
		} else {
			stale = s.txnDead(id)
		}
		if stale {
			_ = s.content.Abort(ctx, is.Ref)
			st.Staging++
		}
	}
	tents, err := os.ReadDir(filepath.Join(s.dir, "tmp"))
	if err != nil {
		return st, status.Errorf(codes.Internal, "gc: %v", err)
	}
	for _, e := range tents {
		id := strings.TrimSuffix(e.Name(), ".lock")
		if !e.IsDir() || !s.txnDead(id) {
			continue
		}
		if err := removeTree(filepath.Join(s.dir, "tmp", id)); err == nil {
			st.Staging++
		}
		_ = os.Remove(filepath.Join(s.dir, "tmp", id+".lock"))
	}

	// Torn atomic writes of records.
	for _, sub := range []string{"images", "indexes", "names"} {
		ents, _ := os.ReadDir(filepath.Join(s.dir, sub))
		for _, e := range ents {
			if !strings.HasPrefix(e.Name(), ".tmp-") {
				continue
			}
			if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) > staleAge {
				_ = os.Remove(filepath.Join(s.dir, sub, e.Name()))
			}
		}
	}
	s.log.Info("toolchain gc", "roots", st.Roots, "blobs", st.Blobs, "blobBytes", st.BlobBytes, "staging", st.Staging)
	return st, nil
}

// txnDead reports whether no live process holds the lock of txn id.
func (s *Store) txnDead(id string) bool {
	p := filepath.Join(s.dir, "tmp", id+".lock")
	if _, err := os.Stat(p); err != nil {
		return true
	}
	l, ok, err := tryLockFile(p)
	if err != nil || !ok {
		return false
	}
	l.Unlock()
	return true
}
