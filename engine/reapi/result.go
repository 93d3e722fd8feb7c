package reapi

import (
	"context"
	"errors"
	"path"
	"strings"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// checkResultPaths refuses a client-written ActionResult whose outputs a client could
// not safely materialize: paths that are absolute, unclean or climb out of the working
// directory (../../etc/passwd), paths used twice, and symlinks whose targets are
// absolute (Capabilities says DISALLOWED) or climb out.
func checkResultPaths(r *repb.ActionResult) error {
	seen := map[string]bool{}
	check := func(kind, p string, emptyOK bool) error {
		if err := CheckRelPath(p, emptyOK); err != nil {
			return status.Errorf(codes.InvalidArgument, "action result: %s %q: %s", kind, p, err)
		}
		if seen[p] {
			return status.Errorf(codes.InvalidArgument, "action result: output path %q used twice", p)
		}
		seen[p] = true
		return nil
	}
	for _, f := range r.GetOutputFiles() {
		if err := check("output file", f.GetPath(), false); err != nil {
			return err
		}
	}
	// The spec allows "" for an output directory: the whole working directory.
	for _, d := range r.GetOutputDirectories() {
		if err := check("output directory", d.GetPath(), true); err != nil {
			return err
		}
	}
	for _, list := range [][]*repb.OutputSymlink{r.GetOutputFileSymlinks(), r.GetOutputDirectorySymlinks(), r.GetOutputSymlinks()} {
		for _, s := range list {
			if err := check("output symlink", s.GetPath(), false); err != nil {
				return err
			}
			if err := symlinkTarget(s.GetPath(), s.GetTarget()); err != nil {
				return status.Errorf(codes.InvalidArgument, "action result: output symlink %q -> %q: %s", s.GetPath(), s.GetTarget(), err)
			}
		}
	}
	return nil
}

// checkResultTrees reads the Tree of every output directory and refuses entries whose
// names or symlink targets would let a client that materializes them write outside the
// directory. Missing Trees are left to the completeness check.
func (s *Server) checkResultTrees(ctx context.Context, r *repb.ActionResult) error {
	for _, od := range r.GetOutputDirectories() {
		td, err := cache.FromProto(od.GetTreeDigest())
		if err != nil {
			return grpcerr.Wrap(err, "action result: output directory %q: tree_digest", od.GetPath())
		}
		mem, err := s.opts.Memory.Charge(ClientID(ctx), "reading an output directory's Tree", 2*min(td.Size, cache.MaxTreeSize))
		if err != nil {
			return err
		}
		tree := &repb.Tree{}
		err = cache.ReadProto(ctx, s.cas, td, tree, cache.MaxTreeSize)
		if err == nil {
			for _, dir := range append([]*repb.Directory{tree.GetRoot()}, tree.GetChildren()...) {
				if err = checkTreeNames(dir); err != nil {
					err = status.Errorf(codes.InvalidArgument, "action result: output directory %q: %s", od.GetPath(), status.Convert(err).Message())
					break
				}
			}
		}
		mem.Release()
		if err != nil && status.Code(err) != codes.NotFound {
			return err
		}
	}
	return nil
}

// checkTreeNames refuses a Directory of a Tree whose entry names are not single path
// components, or whose symlinks point outside the tree's root.
func checkTreeNames(dir *repb.Directory) error {
	var names []string
	for _, f := range dir.GetFiles() {
		names = append(names, f.GetName())
	}
	for _, d := range dir.GetDirectories() {
		names = append(names, d.GetName())
	}
	for _, l := range dir.GetSymlinks() {
		names = append(names, l.GetName())
		if t := l.GetTarget(); t == "" || strings.HasPrefix(t, "/") || strings.ContainsRune(t, 0) {
			return status.Errorf(codes.InvalidArgument, "symlink %q -> %q: the target must be a relative path", l.GetName(), t)
		}
	}
	for _, n := range names {
		if n == "" || n == "." || n == ".." || strings.ContainsAny(n, "/\x00") {
			return status.Errorf(codes.InvalidArgument, "entry %q is not a single path component", n)
		}
	}
	return nil
}

// CheckRelPath accepts clean relative slash paths that stay inside their root (the
// empty path too, if emptyOK): the paths of a Command's and an ActionResult's outputs.
func CheckRelPath(p string, emptyOK bool) error {
	switch {
	case p == "":
		if emptyOK {
			return nil
		}
		return errors.New("empty")
	case strings.HasPrefix(p, "/"):
		return errors.New("absolute")
	case strings.ContainsRune(p, 0):
		return errors.New("contains NUL")
	case path.Clean(p) != p || p == ".":
		return errors.New("not a clean relative path")
	case p == ".." || strings.HasPrefix(p, "../"):
		return errors.New("leaves the exec root")
	}
	return nil
}

// symlinkTarget accepts a relative target that, resolved from the link's directory,
// stays inside the working directory.
func symlinkTarget(link, target string) error {
	if target == "" || strings.HasPrefix(target, "/") || strings.ContainsRune(target, 0) {
		return status.Error(codes.InvalidArgument, "the target must be a non-empty relative path (absolute symlinks are DISALLOWED)")
	}
	if r := path.Join(path.Dir(link), target); r == ".." || strings.HasPrefix(r, "../") {
		return status.Error(codes.InvalidArgument, "the target points outside the working directory")
	}
	return nil
}
