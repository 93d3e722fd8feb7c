package attest

import (
	"context"
	"path"
	"sort"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// maxDirectoryBlob bounds the Directory and Tree blobs read while flattening.
const maxDirectoryBlob = 64 << 20

// NewAction fills an Action from the REAPI messages of an executed action: digests,
// inputs (the input root read from cas), outputs (from r, output directories read from
// cas), argv, exit code, stdout/stderr and platform. The engine adds what REAPI does not
// say: Toolchain, PolicyDigest, KilnVersion (and Reproducibility).
//
// Output paths are made relative to the input root (joined to the Command's working
// directory), the namespace inputs are in, so a product of one action matches the
// material of the next by path as well as by digest.
func NewAction(ctx context.Context, cas cache.BlobStore, actionDigest cache.Digest, a *repb.Action, cmd *repb.Command, r *repb.ActionResult) (Action, error) {
	cd, err := cache.FromProto(a.GetCommandDigest())
	if err != nil {
		return Action{}, status.Errorf(codes.InvalidArgument, "action %s: command digest: %v", actionDigest, status.Convert(err).Message())
	}
	root, err := cache.FromProto(a.GetInputRootDigest())
	if err != nil {
		return Action{}, status.Errorf(codes.InvalidArgument, "action %s: input root digest: %v", actionDigest, status.Convert(err).Message())
	}
	ins, err := InputFiles(ctx, cas, root)
	if err != nil {
		return Action{}, err
	}
	outs, err := OutputFiles(ctx, cas, r, cmd.GetWorkingDirectory())
	if err != nil {
		return Action{}, err
	}
	plat := a.GetPlatform()
	if len(plat.GetProperties()) == 0 {
		//lint:ignore SA1019 REAPI before v2.2 (Bazel 4.2 speaks 2.0) puts the platform on the Command.
		plat = cmd.GetPlatform()
	}
	var props []Property
	for _, p := range plat.GetProperties() {
		props = append(props, Property{Name: p.GetName(), Value: p.GetValue()})
	}
	return Action{
		ActionDigest:  actionDigest,
		CommandDigest: cd,
		Inputs:        ins,
		Outputs:       outs,
		Argv:          append([]string(nil), cmd.GetArguments()...),
		ExitCode:      int(r.GetExitCode()),
		Stdout:        streamDigest(r.GetStdoutDigest(), r.GetStdoutRaw()),
		Stderr:        streamDigest(r.GetStderrDigest(), r.GetStderrRaw()),
		Platform:      props,
	}, nil
}

func streamDigest(d *repb.Digest, raw []byte) cache.Digest {
	if d != nil {
		return cache.Digest{Hash: d.GetHash(), Size: d.GetSizeBytes()}
	}
	return cache.DigestOf(raw)
}

// InputFiles flattens the input root with digest root (Directory blobs in cas) into its
// files and symlinks, sorted by path.
func InputFiles(ctx context.Context, cas cache.BlobStore, root cache.Digest) ([]File, error) {
	dirs := map[cache.Digest]*repb.Directory{}
	get := func(d cache.Digest) (*repb.Directory, error) {
		if dir, ok := dirs[d]; ok {
			return dir, nil
		}
		dir := &repb.Directory{}
		if err := cache.ReadProto(ctx, cas, d, dir, maxDirectoryBlob); err != nil {
			return nil, status.Errorf(status.Code(err), "input directory %s: %v", d, status.Convert(err).Message())
		}
		dirs[d] = dir
		return dir, nil
	}
	var out []File
	if err := flatten("", root, get, &out, 0); err != nil {
		return nil, err
	}
	sortFiles(out)
	return out, nil
}

// OutputFiles flattens r's outputs into files and symlinks (output directories read
// from their Tree blobs in cas), with paths joined to workingDir, sorted by path.
func OutputFiles(ctx context.Context, cas cache.BlobStore, r *repb.ActionResult, workingDir string) ([]File, error) {
	var out []File
	join := func(p string) string { return path.Join(workingDir, p) }
	for _, f := range r.GetOutputFiles() {
		d, err := cache.FromProto(f.GetDigest())
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "output %s: %v", f.GetPath(), status.Convert(err).Message())
		}
		out = append(out, File{Path: join(f.GetPath()), Digest: d})
	}
	seen := map[string]bool{}
	//lint:ignore SA1019 REAPI 2.0 servers and clients report symlinks in the older fields.
	for _, group := range [][]*repb.OutputSymlink{r.GetOutputSymlinks(), r.GetOutputFileSymlinks(), r.GetOutputDirectorySymlinks()} {
		for _, s := range group {
			if p := join(s.GetPath()); !seen[p] {
				seen[p] = true
				out = append(out, File{Path: p, SymlinkTarget: s.GetTarget()})
			}
		}
	}
	for _, od := range r.GetOutputDirectories() {
		td, err := cache.FromProto(od.GetTreeDigest())
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "output directory %s: %v", od.GetPath(), status.Convert(err).Message())
		}
		tree := &repb.Tree{}
		if err := cache.ReadProto(ctx, cas, td, tree, maxDirectoryBlob); err != nil {
			return nil, status.Errorf(status.Code(err), "output directory %s: %v", od.GetPath(), status.Convert(err).Message())
		}
		dirs := map[cache.Digest]*repb.Directory{}
		for _, c := range tree.GetChildren() {
			_, d, err := cache.DigestOfProto(c)
			if err != nil {
				return nil, err
			}
			dirs[d] = c
		}
		_, rootD, err := cache.DigestOfProto(tree.GetRoot())
		if err != nil {
			return nil, err
		}
		dirs[rootD] = tree.GetRoot()
		get := func(d cache.Digest) (*repb.Directory, error) {
			if dir, ok := dirs[d]; ok {
				return dir, nil
			}
			return nil, status.Errorf(codes.InvalidArgument, "output directory %s: tree %s lacks directory %s", od.GetPath(), td, d)
		}
		if err := flatten(join(od.GetPath()), rootD, get, &out, 0); err != nil {
			return nil, err
		}
	}
	sortFiles(out)
	return out, nil
}

// maxDepth bounds directory nesting (and so cycles in a hostile tree).
const maxDepth = 1024

func flatten(prefix string, d cache.Digest, get func(cache.Digest) (*repb.Directory, error), out *[]File, depth int) error {
	if depth > maxDepth {
		return status.Errorf(codes.InvalidArgument, "directory %s is nested more than %d deep", prefix, maxDepth)
	}
	dir, err := get(d)
	if err != nil {
		return err
	}
	for _, f := range dir.GetFiles() {
		fd, err := cache.FromProto(f.GetDigest())
		if err != nil {
			return status.Errorf(codes.InvalidArgument, "file %s: %v", path.Join(prefix, f.GetName()), status.Convert(err).Message())
		}
		*out = append(*out, File{Path: path.Join(prefix, f.GetName()), Digest: fd})
	}
	for _, s := range dir.GetSymlinks() {
		*out = append(*out, File{Path: path.Join(prefix, s.GetName()), SymlinkTarget: s.GetTarget()})
	}
	for _, sub := range dir.GetDirectories() {
		sd, err := cache.FromProto(sub.GetDigest())
		if err != nil {
			return status.Errorf(codes.InvalidArgument, "directory %s: %v", path.Join(prefix, sub.GetName()), status.Convert(err).Message())
		}
		if err := flatten(path.Join(prefix, sub.GetName()), sd, get, out, depth+1); err != nil {
			return err
		}
	}
	return nil
}

func sortFiles(fs []File) { sort.Slice(fs, func(i, j int) bool { return fs[i].Path < fs[j].Path }) }
