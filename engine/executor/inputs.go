package executor

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/limits"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Limits on input trees, so a hostile or broken client cannot make the executor expand
// a small DAG into an unbounded tree or walk forever.
const (
	// MaxTreeDepth bounds the nesting of input trees and output directories.
	MaxTreeDepth     = 128
	maxTreeNodes     = 1_000_000
	maxDirectorySize = 16 << 20
	maxSymlinkHops   = 40
)

// inputFile is one file of an input tree, by path relative to the exec root.
type inputFile struct {
	path       string
	digest     cache.Digest
	executable bool
}

// inputSymlink is one symlink of an input tree.
type inputSymlink struct {
	path, target string
}

// inputTree is an input root, flattened and validated.
type inputTree struct {
	dirs     []string       // every directory, parents first ("" is the root)
	dirBlobs []cache.Digest // every distinct Directory message
	files    []inputFile
	symlinks []inputSymlink
}

// fetchTree reads and validates the Directory tree under root. Problems with the tree
// are INVALID_ARGUMENT; absent blobs (directories or files) are FAILED_PRECONDITION
// with a MISSING violation for each, so the client uploads them and retries.
func fetchTree(ctx context.Context, cas cache.BlobStore, root cache.Digest) (*inputTree, error) {
	return fetchTreeCharged(ctx, cas, root, nil)
}

// maxTreeBytes bounds the Directory bytes one input tree may consist of, and with
// maxTreeNodes the work one request can make the server do.
const maxTreeBytes = 512 << 20

// Memory charged while a tree is read: each distinct Directory treeDirCost times its
// size (blob and parsed message), each node of the flattened tree treeNodeCost.
const (
	treeDirCost  = 3
	treeNodeCost = 160
)

// fetchTreeCharged is fetchTree with what it holds charged to mem (nil: to nothing).
// It reads and validates each distinct Directory once, and counts the nodes the tree
// expands to with each shared subtree counted once (by digest), so a small DAG that
// claims millions of nodes is refused after reading only its distinct blobs; only a
// tree within the bounds is then expanded, from the directories already read.
func fetchTreeCharged(ctx context.Context, cas cache.BlobStore, root cache.Digest, mem *limits.Charge) (*inputTree, error) {
	t := &inputTree{}
	read := cache.DirectoriesIn(cas, maxDirectorySize)
	dirs := map[cache.Digest]*repb.Directory{}
	var bytes int64
	get := func(ctx context.Context, d cache.Digest) (*repb.Directory, error) {
		if len(dirs) >= maxTreeNodes {
			return nil, status.Errorf(codes.InvalidArgument, "input tree has more than %d nodes", maxTreeNodes)
		}
		if bytes += d.Size; bytes > maxTreeBytes {
			return nil, status.Errorf(codes.InvalidArgument, "input tree's directories take more than %d bytes", maxTreeBytes)
		}
		if err := mem.Grow(treeDirCost * d.Size); err != nil {
			return nil, err
		}
		dir, err := read(ctx, d)
		if err == nil {
			err = validateDirectory(dir)
		}
		if err != nil {
			return nil, err
		}
		dirs[d] = dir
		t.dirBlobs = append(t.dirBlobs, d)
		return dir, nil
	}
	var missing []cache.Digest
	missingSeen := map[cache.Digest]bool{}
	// Each distinct directory once, at the first path that reaches it.
	w := cache.NewWalk(root, get, cache.WalkOptions{Distinct: true})
	for !w.Done() {
		it, _, err := w.Next(ctx)
		switch {
		case status.Code(err) == codes.NotFound || status.Code(err) == codes.DataLoss:
			missingSeen[it.Digest] = true
			missing = append(missing, it.Digest)
		case err != nil:
			return nil, grpcerr.Wrap(err, "input directory %q (%s)", displayPath(it.Path), it.Digest)
		}
	}
	// Count what the tree expands to, each distinct subtree once; a missing
	// directory counts as one node.
	counted := map[cache.Digest]int{}
	var count func(d cache.Digest, path string, depth int) (int, error)
	count = func(d cache.Digest, p string, depth int) (int, error) {
		if n, ok := counted[d]; ok {
			return n, nil
		}
		dir := dirs[d]
		n := 1 + len(dir.GetFiles()) + len(dir.GetSymlinks())
		for _, sub := range dir.GetDirectories() {
			sp := path.Join(p, sub.GetName())
			if depth+1 > MaxTreeDepth {
				return 0, status.Errorf(codes.InvalidArgument, "input tree deeper than %d levels at %q", MaxTreeDepth, sp)
			}
			sd, _ := cache.FromProto(sub.GetDigest()) // validated above
			k, err := count(sd, sp, depth+1)
			if err != nil {
				return 0, err
			}
			if n += k; n > maxTreeNodes {
				return 0, status.Errorf(codes.InvalidArgument, "input tree has more than %d nodes", maxTreeNodes)
			}
		}
		counted[d] = n
		return n, nil
	}
	nodes, err := count(root, "", 0)
	if err != nil {
		return nil, err
	}
	if err := mem.Grow(int64(nodes) * treeNodeCost); err != nil {
		return nil, err
	}
	// Expand: every path, not every distinct directory (the exec root holds the tree
	// expanded), from the directories read; missing ones are reported below.
	known := func(_ context.Context, d cache.Digest) (*repb.Directory, error) {
		if dir, ok := dirs[d]; ok {
			return dir, nil
		}
		return nil, status.Errorf(codes.NotFound, "directory %s not found", d)
	}
	w = cache.NewWalk(root, known, cache.WalkOptions{MaxDepth: MaxTreeDepth})
	for !w.Done() {
		it, dir, err := w.Next(ctx)
		switch {
		case status.Code(err) == codes.NotFound:
			continue
		case err != nil:
			return nil, grpcerr.Wrap(err, "input directory %q (%s)", displayPath(it.Path), it.Digest)
		}
		t.dirs = append(t.dirs, it.Path)
		for _, f := range dir.GetFiles() {
			d, _ := cache.FromProto(f.GetDigest()) // validated above
			t.files = append(t.files, inputFile{path.Join(it.Path, f.GetName()), d, f.GetIsExecutable()})
		}
		for _, s := range dir.GetSymlinks() {
			t.symlinks = append(t.symlinks, inputSymlink{path.Join(it.Path, s.GetName()), s.GetTarget()})
		}
	}
	// The Directory messages are no longer needed: keep only the expanded tree's charge.
	var held int64
	for _, d := range t.dirBlobs {
		held += d.Size
	}
	mem.Shrink(treeDirCost * held)
	if err := t.checkSymlinks(); err != nil {
		return nil, err
	}
	// Files absent from the CAS are reported together with absent directories.
	seen := map[cache.Digest]bool{}
	var want []cache.Digest
	for _, f := range t.files {
		if !seen[f.digest] && !f.digest.IsEmpty() {
			seen[f.digest] = true
			want = append(want, f.digest)
		}
	}
	m, err := cas.FindMissing(ctx, want)
	if err != nil {
		return nil, err
	}
	for _, d := range m {
		if !missingSeen[d] {
			missing = append(missing, d)
		}
	}
	if len(missing) > 0 {
		return nil, cache.MissingBlobsError("the input tree references blobs that are not in the CAS", missing)
	}
	return t, nil
}

func displayPath(p string) string {
	if p == "" {
		return "."
	}
	return p
}

// TreeBlobs validates the input tree under root (as Execute would) and returns every
// blob it consists of: its Directory messages and its files.
func TreeBlobs(ctx context.Context, cas cache.BlobStore, root cache.Digest) ([]cache.Digest, error) {
	t, err := fetchTree(ctx, cas, root)
	if err != nil {
		return nil, err
	}
	out := append([]cache.Digest(nil), t.dirBlobs...)
	seen := map[cache.Digest]bool{}
	for _, f := range t.files {
		if !seen[f.digest] {
			seen[f.digest] = true
			out = append(out, f.digest)
		}
	}
	return out, nil
}

// validateDirectory checks one Directory: names valid, each list sorted and unique,
// no name used twice across files, directories and symlinks, digests well formed,
// symlink targets relative.
func validateDirectory(dir *repb.Directory) error {
	names := map[string]bool{}
	check := func(kind string, list []string) error {
		for i, n := range list {
			if err := validName(n); err != nil {
				return status.Errorf(codes.InvalidArgument, "%s %q: %v", kind, n, err)
			}
			if i > 0 && list[i-1] >= n {
				return status.Errorf(codes.InvalidArgument, "%s names not sorted or not unique at %q", kind, n)
			}
			if names[n] {
				return status.Errorf(codes.InvalidArgument, "name %q used twice", n)
			}
			names[n] = true
		}
		return nil
	}
	var fs, ds, ss []string
	for _, f := range dir.GetFiles() {
		if _, err := cache.FromProto(f.GetDigest()); err != nil {
			return grpcerr.Wrap(err, "file %q", f.GetName())
		}
		fs = append(fs, f.GetName())
	}
	for _, d := range dir.GetDirectories() {
		if _, err := cache.FromProto(d.GetDigest()); err != nil {
			return grpcerr.Wrap(err, "directory %q", d.GetName())
		}
		ds = append(ds, d.GetName())
	}
	for _, s := range dir.GetSymlinks() {
		tg := s.GetTarget()
		if tg == "" || strings.HasPrefix(tg, "/") || strings.ContainsRune(tg, 0) {
			return status.Errorf(codes.InvalidArgument, "symlink %q: target %q must be a non-empty relative path (absolute symlinks are not allowed)", s.GetName(), tg)
		}
		ss = append(ss, s.GetName())
	}
	if err := check("file", fs); err != nil {
		return err
	}
	if err := check("directory", ds); err != nil {
		return err
	}
	return check("symlink", ss)
}

// validName refuses names that are empty, '.', '..', or contain '/' or NUL.
func validName(n string) error {
	switch {
	case n == "":
		return errors.New("empty name")
	case n == "." || n == "..":
		return errors.New("'.' and '..' are not names")
	case strings.ContainsAny(n, "/\x00"):
		return errors.New("names may not contain '/' or NUL")
	}
	return nil
}

// checkSymlinks resolves every symlink through the tree, following other symlinks, and
// refuses targets that leave the input root or loop.
func (t *inputTree) checkSymlinks() error {
	if len(t.symlinks) == 0 {
		return nil
	}
	links := make(map[string]string, len(t.symlinks))
	for _, s := range t.symlinks {
		links[s.path] = s.target
	}
	for _, s := range t.symlinks {
		if _, err := resolveInTree(links, path.Dir(s.path), s.target, 0); err != nil {
			return status.Errorf(codes.InvalidArgument, "input symlink %q -> %q: %v", s.path, s.target, err)
		}
	}
	return nil
}

// resolveInTree resolves target relative to dir ("." is the root) through the symlinks
// of the tree, lexically, and returns the resolved path.
func resolveInTree(links map[string]string, dir, target string, hops int) (string, error) {
	if dir == "." {
		dir = ""
	}
	cur := dir
	parts := strings.Split(target, "/")
	for i, p := range parts {
		switch p {
		case "", ".":
			continue
		case "..":
			if cur == "" {
				return "", errors.New("target leaves the input root")
			}
			cur = path.Dir(cur)
			if cur == "." {
				cur = ""
			}
			continue
		}
		next := path.Join(cur, p)
		if tg, ok := links[next]; ok {
			if hops+1 > maxSymlinkHops {
				return "", errors.New("too many levels of symlinks (a loop?)")
			}
			r, err := resolveInTree(links, cur, tg, hops+1)
			if err != nil {
				return "", err
			}
			rest := strings.Join(parts[i+1:], "/")
			if rest == "" {
				return r, nil
			}
			return resolveInTree(links, r, rest, hops+1)
		}
		cur = next
	}
	return cur, nil
}

// materializer lays out an input tree in an exec root.
type materializer struct {
	cas      cache.BlobStore
	local    cache.LocalFiles // nil: every input is copied from cas
	uid, gid int              // owner of directories, so the action can create and remove files
}

// materialize creates the tree under root. Read-only inputs are hardlinked from the
// store's local files when it has them: the files are root-owned and mode 0444, so an
// action (never root, never their owner) can delete or replace its link but not write
// the blob. Executable inputs are copied: one inode must not be both 0444 and 0555.
func (m *materializer) materialize(ctx context.Context, root string, t *inputTree) error {
	for _, d := range t.dirs {
		p := filepath.Join(root, filepath.FromSlash(d))
		if d != "" {
			if err := os.Mkdir(p, 0o755); err != nil {
				return status.Errorf(codes.Internal, "create input dir %q: %v", d, err)
			}
		}
		if err := os.Lchown(p, m.uid, m.gid); err != nil {
			return status.Errorf(codes.Internal, "chown input dir %q: %v", d, err)
		}
	}
	for _, f := range t.files {
		if err := ctx.Err(); err != nil {
			return status.FromContextError(err).Err()
		}
		dst := filepath.Join(root, filepath.FromSlash(f.path))
		if f.digest.Size == 0 {
			if err := writeEmpty(dst, f.executable); err != nil {
				return err
			}
			continue
		}
		if m.local != nil && !f.executable {
			// BlobFile verifies the file: a hardlink is never read through the store.
			src, err := m.local.BlobFile(ctx, f.digest)
			if status.Code(err) == codes.ResourceExhausted {
				// Too large for the local tier of shared storage: copied through the store.
				if err := m.copyBlob(ctx, f, dst); err != nil {
					return err
				}
				continue
			}
			if err != nil {
				if status.Code(err) == codes.NotFound {
					return cache.MissingBlobsError("an input blob was missing or damaged", []cache.Digest{f.digest})
				}
				return err
			}
			err = os.Link(src, dst)
			if err == nil {
				continue
			}
			if errors.Is(err, fs.ErrNotExist) {
				return cache.MissingBlobsError("an input blob was evicted while the action was prepared", []cache.Digest{f.digest})
			}
			// EMLINK (too many links) or EXDEV: fall back to a copy.
			var errno syscall.Errno
			if !errors.As(err, &errno) || (errno != syscall.EMLINK && errno != syscall.EXDEV) {
				return status.Errorf(codes.Internal, "link input %q: %v", f.path, err)
			}
		}
		if err := m.copyBlob(ctx, f, dst); err != nil {
			return err
		}
	}
	for _, s := range t.symlinks {
		dst := filepath.Join(root, filepath.FromSlash(s.path))
		if err := os.Symlink(s.target, dst); err != nil {
			return status.Errorf(codes.Internal, "create input symlink %q: %v", s.path, err)
		}
		os.Lchown(dst, m.uid, m.gid)
		setTimes(dst, true)
	}
	// Directories last, deepest first: creating their entries moved their mtimes.
	for i := len(t.dirs) - 1; i >= 0; i-- {
		setTimes(filepath.Join(root, filepath.FromSlash(t.dirs[i])), false)
	}
	return nil
}

// setTimes gives p (not following a symlink) cache.InputMtime as its access and
// modification time, so an action sees the same timestamps on every run.
func setTimes(p string, symlink bool) error {
	ts := []unix.Timespec{unix.NsecToTimespec(cache.InputMtime.UnixNano()), unix.NsecToTimespec(cache.InputMtime.UnixNano())}
	flags := 0
	if symlink {
		flags = unix.AT_SYMLINK_NOFOLLOW
	}
	return unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, flags)
}

func writeEmpty(dst string, exec bool) error {
	mode := os.FileMode(0o444)
	if exec {
		mode = 0o555
	}
	f, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, mode)
	if err != nil {
		return status.Errorf(codes.Internal, "create input %q: %v", dst, err)
	}
	f.Close()
	return setTimes(dst, false)
}

// copyBlob writes a fresh, root-owned, read-only copy of an input; the store verifies
// the blob as it is read.
func (m *materializer) copyBlob(ctx context.Context, f inputFile, dst string) error {
	mode := os.FileMode(0o444)
	if f.executable {
		mode = 0o555
	}
	r, err := m.cas.Get(ctx, f.digest, 0)
	if err != nil {
		if status.Code(err) == codes.NotFound {
			return cache.MissingBlobsError("an input blob was evicted while the action was prepared", []cache.Digest{f.digest})
		}
		return err
	}
	defer r.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, mode)
	if err != nil {
		return status.Errorf(codes.Internal, "create input %q: %v", f.path, err)
	}
	_, err = io.Copy(out, r)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		if status.Code(err) == codes.DataLoss {
			return cache.MissingBlobsError("an input blob failed verification and was removed", []cache.Digest{f.digest})
		}
		return status.Errorf(codes.Internal, "copy input %q: %v", f.path, err)
	}
	return setTimes(dst, false)
}
