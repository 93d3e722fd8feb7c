package executor

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"io/fs"
	"os"
	"path"
	"sort"
	"strings"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// collector stores an action's outputs in the CAS. Every path is opened relative to
// the exec root without following symlinks: the action controlled that tree and could
// have planted links to host files.
type collector struct {
	cas   cache.BlobStore
	local cache.LocalFiles // nil: outputs are copied into cas
	root  *os.File         // the exec root
	// produced lists every output file by path relative to the working directory,
	// including the files inside output directories, for the action's link.
	produced []ProducedFile
}

// ProducedFile is one file (or symlink) of an action's inputs or outputs, by path.
type ProducedFile struct {
	Path          string
	Digest        cache.Digest
	SymlinkTarget string // set for symlinks
}

// storeFile hashes f and adopts (links) it into the store's local files, or copies it
// into the CAS. The action is dead when outputs are collected, so nothing can change
// the file between the hash and the store; an adopted inode is made root-owned and
// read-only first.
func (c *collector) storeFile(ctx context.Context, f *os.File) (cache.Digest, error) {
	d, err := hashReader(f)
	if err != nil {
		return cache.Digest{}, status.Errorf(codes.Internal, "read output: %v", err)
	}
	if d.IsEmpty() {
		return d, nil
	}
	if c.local != nil {
		if err := f.Chown(0, 0); err == nil {
			if err := f.Chmod(0o444); err == nil {
				if err := c.local.AdoptFile(ctx, d, f); err == nil {
					return d, nil
				}
			}
		}
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return cache.Digest{}, status.Errorf(codes.Internal, "rewind output: %v", err)
	}
	return d, c.cas.Put(ctx, d, f)
}

// hashReader returns the digest of everything r yields.
func hashReader(r io.Reader) (cache.Digest, error) {
	h := sha256.New()
	n, err := io.Copy(h, r)
	if err != nil {
		return cache.Digest{}, err
	}
	return cache.Digest{Hash: hex.EncodeToString(h.Sum(nil)), Size: n}, nil
}

// collect gathers the declared outputs under the working directory cwd (relative to
// the exec root) into r. REAPI 2.0 clients declare output_files and output_directories;
// 2.1+ clients declare output_paths and the type is whatever the action made. Missing
// outputs are simply absent from the result.
func (c *collector) collect(ctx context.Context, cwd string, cmd *repb.Command, r *repb.ActionResult) error {
	type decl struct {
		path string
		kind int // 0: any (output_paths), 1: file, 2: directory
	}
	var decls []decl
	if len(cmd.GetOutputPaths()) > 0 {
		for _, p := range cmd.GetOutputPaths() {
			decls = append(decls, decl{p, 0})
		}
	} else {
		for _, p := range cmd.GetOutputFiles() {
			decls = append(decls, decl{p, 1})
		}
		for _, p := range cmd.GetOutputDirectories() {
			decls = append(decls, decl{p, 2})
		}
	}
	for _, dcl := range decls {
		rel := path.Join(cwd, dcl.path)
		parent, err := openBeneath(c.root, path.Dir(rel), unix.O_PATH|unix.O_DIRECTORY)
		if err != nil {
			if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) {
				continue
			}
			if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.EXDEV) {
				return status.Errorf(codes.InvalidArgument, "output %q: a parent directory was replaced by a symlink", dcl.path)
			}
			return status.Errorf(codes.Internal, "output %q: %v", dcl.path, err)
		}
		err = c.collectOne(ctx, parent, path.Base(rel), dcl.path, dcl.kind, r)
		parent.Close()
		if err != nil {
			return err
		}
	}
	return c.checkSymlinkChains()
}

// checkSymlinkChains resolves every output symlink through all the others: one link
// at a time each stays inside, but a chain (o/b -> ., o/s -> b/b/../../..) can climb
// out of the working directory, and whoever follows it later lands on host files.
func (c *collector) checkSymlinkChains() error {
	links := map[string]string{}
	for _, f := range c.produced {
		if f.SymlinkTarget != "" {
			links[f.Path] = f.SymlinkTarget
		}
	}
	for p, target := range links {
		if _, err := resolveInTree(links, path.Dir(p), target, 0); err != nil {
			return status.Errorf(codes.InvalidArgument, "output symlink %q -> %q: %v", p, target, err)
		}
	}
	return nil
}

func (c *collector) collectOne(ctx context.Context, parent *os.File, name, rel string, kind int, r *repb.ActionResult) error {
	var st unix.Stat_t
	if err := unix.Fstatat(int(parent.Fd()), name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return status.Errorf(codes.Internal, "output %q: %v", rel, err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		if kind == 2 {
			// REAPI: an output_directories entry that is not a directory is FAILED_PRECONDITION.
			return status.Errorf(codes.FailedPrecondition, "output directory %q is a file", rel)
		}
		f, err := openAt(parent, name, unix.O_RDONLY)
		if err != nil {
			return status.Errorf(codes.Internal, "output %q: %v", rel, err)
		}
		defer f.Close()
		d, err := c.storeFile(ctx, f)
		if err != nil {
			return grpcerr.Wrap(err, "output %q", rel)
		}
		r.OutputFiles = append(r.OutputFiles, &repb.OutputFile{Path: rel, Digest: d.Proto(), IsExecutable: st.Mode&0o111 != 0})
		c.produced = append(c.produced, ProducedFile{Path: rel, Digest: d})
	case unix.S_IFDIR:
		if kind == 1 {
			// REAPI: an output_files entry that is a directory is FAILED_PRECONDITION.
			return status.Errorf(codes.FailedPrecondition, "output file %q is a directory", rel)
		}
		dir, err := openAt(parent, name, unix.O_RDONLY|unix.O_DIRECTORY)
		if err != nil {
			return status.Errorf(codes.Internal, "output %q: %v", rel, err)
		}
		defer dir.Close()
		tree, err := c.tree(ctx, dir, rel)
		if err != nil {
			return grpcerr.Wrap(err, "output directory %q", rel)
		}
		td, err := cache.PutProto(ctx, c.cas, tree)
		if err != nil {
			return err
		}
		_, rootD, _ := cache.DigestOfProto(tree.GetRoot())
		r.OutputDirectories = append(r.OutputDirectories, &repb.OutputDirectory{Path: rel, TreeDigest: td.Proto(), RootDirectoryDigest: rootD.Proto()})
	case unix.S_IFLNK:
		target, err := readlinkAt(parent, name)
		if err != nil {
			return status.Errorf(codes.Internal, "output %q: %v", rel, err)
		}
		if err := checkOutputSymlink(rel, target); err != nil {
			return err
		}
		s := &repb.OutputSymlink{Path: rel, Target: target}
		c.produced = append(c.produced, ProducedFile{Path: rel, SymlinkTarget: target})
		switch kind {
		case 0:
			r.OutputSymlinks = append(r.OutputSymlinks, s)
		case 1:
			r.OutputFileSymlinks = append(r.OutputFileSymlinks, s)
		case 2:
			r.OutputDirectorySymlinks = append(r.OutputDirectorySymlinks, s)
		}
	default:
		return status.Errorf(codes.InvalidArgument, "output %q is neither a file, a directory nor a symlink", rel)
	}
	return nil
}

// checkOutputSymlink refuses symlinks that are absolute (the advertised strategy is
// DISALLOWED, under which REAPI makes that FAILED_PRECONDITION) or that climb out of
// the working directory.
func checkOutputSymlink(p, target string) error {
	if target == "" || strings.HasPrefix(target, "/") {
		return status.Errorf(codes.FailedPrecondition, "output symlink %q -> %q: absolute targets are not allowed (SymlinkAbsolutePathStrategy DISALLOWED)", p, target)
	}
	if resolved := path.Join(path.Dir(p), target); resolved == ".." || strings.HasPrefix(resolved, "../") {
		return status.Errorf(codes.InvalidArgument, "output symlink %q -> %q points outside the working directory", p, target)
	}
	return nil
}

// tree builds the REAPI Tree of the open directory dir, storing its files.
func (c *collector) tree(ctx context.Context, dir *os.File, rel string) (*repb.Tree, error) {
	t := &repb.Tree{}
	seen := map[cache.Digest]bool{}
	var walk func(dir *os.File, rel string, depth int) (*repb.Directory, error)
	walk = func(dir *os.File, rel string, depth int) (*repb.Directory, error) {
		if depth > MaxTreeDepth {
			return nil, status.Errorf(codes.InvalidArgument, "deeper than %d levels", MaxTreeDepth)
		}
		ents, err := dir.ReadDir(-1)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "read %q: %v", rel, err)
		}
		sort.Slice(ents, func(i, j int) bool { return ents[i].Name() < ents[j].Name() })
		out := &repb.Directory{}
		for _, e := range ents {
			erel := path.Join(rel, e.Name())
			switch {
			case e.Type().IsRegular():
				f, err := openAt(dir, e.Name(), unix.O_RDONLY)
				if err != nil {
					return nil, status.Errorf(codes.Internal, "open %q: %v", erel, err)
				}
				info, err := f.Stat()
				var d cache.Digest
				if err == nil {
					d, err = c.storeFile(ctx, f)
				}
				f.Close()
				if err != nil {
					return nil, grpcerr.Wrap(err, "%q", erel)
				}
				out.Files = append(out.Files, &repb.FileNode{Name: e.Name(), Digest: d.Proto(), IsExecutable: info.Mode()&0o111 != 0})
				c.produced = append(c.produced, ProducedFile{Path: erel, Digest: d})
			case e.IsDir():
				sf, err := openAt(dir, e.Name(), unix.O_RDONLY|unix.O_DIRECTORY)
				if err != nil {
					return nil, status.Errorf(codes.Internal, "open %q: %v", erel, err)
				}
				sub, err := walk(sf, erel, depth+1)
				sf.Close()
				if err != nil {
					return nil, err
				}
				_, sd, err := cache.DigestOfProto(sub)
				if err != nil {
					return nil, err
				}
				if !seen[sd] {
					seen[sd] = true
					t.Children = append(t.Children, sub)
				}
				out.Directories = append(out.Directories, &repb.DirectoryNode{Name: e.Name(), Digest: sd.Proto()})
			case e.Type()&fs.ModeSymlink != 0:
				target, err := readlinkAt(dir, e.Name())
				if err != nil {
					return nil, status.Errorf(codes.Internal, "readlink %q: %v", erel, err)
				}
				if err := checkOutputSymlink(erel, target); err != nil {
					return nil, err
				}
				out.Symlinks = append(out.Symlinks, &repb.SymlinkNode{Name: e.Name(), Target: target})
				c.produced = append(c.produced, ProducedFile{Path: erel, SymlinkTarget: target})
			default:
				return nil, status.Errorf(codes.InvalidArgument, "%q is neither a file, a directory nor a symlink", erel)
			}
		}
		return out, nil
	}
	root, err := walk(dir, rel, 0)
	if err != nil {
		return nil, err
	}
	t.Root = root
	return t, nil
}
