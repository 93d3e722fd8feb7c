package executor

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

// LocalSpec describes an action given on the command line (kiln exec, kiln verify).
type LocalSpec struct {
	Toolchain  string   // container-image reference; "" for the default toolchain
	InputDir   string   // host directory that becomes the input root; "" for none
	Cwd        string   // working directory relative to the input root
	Outputs    []string // output paths relative to Cwd
	Env        []string // NAME=VALUE
	Timeout    time.Duration
	Args       []string
	DoNotCache bool
	Properties []*repb.Platform_Property // further platform properties
}

// BuildAction uploads the input directory, Command and Action of spec and returns the
// Action's digest. The same spec always gives the same digest.
func BuildAction(ctx context.Context, cas cache.BlobStore, spec LocalSpec) (cache.Digest, error) {
	root := cache.Digest{}
	var err error
	if spec.InputDir != "" {
		root, err = UploadDir(ctx, cas, spec.InputDir)
	} else {
		root, err = cache.PutProto(ctx, cas, &repb.Directory{})
	}
	if err != nil {
		return cache.Digest{}, err
	}
	cmd := &repb.Command{Arguments: spec.Args, WorkingDirectory: spec.Cwd, OutputPaths: append([]string(nil), spec.Outputs...)}
	sort.Strings(cmd.OutputPaths)
	seen := map[string]bool{}
	for _, kv := range spec.Env {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return cache.Digest{}, status.Errorf(codes.InvalidArgument, "--env %q: want NAME=VALUE", kv)
		}
		if seen[k] {
			return cache.Digest{}, status.Errorf(codes.InvalidArgument, "--env %s given twice", k)
		}
		seen[k] = true
		cmd.EnvironmentVariables = append(cmd.EnvironmentVariables, &repb.Command_EnvironmentVariable{Name: k, Value: v})
	}
	sort.Slice(cmd.EnvironmentVariables, func(i, j int) bool {
		return cmd.EnvironmentVariables[i].Name < cmd.EnvironmentVariables[j].Name
	})
	if err := validateCommand(cmd); err != nil {
		return cache.Digest{}, err
	}
	plat := &repb.Platform{Properties: append([]*repb.Platform_Property(nil), spec.Properties...)}
	if spec.Toolchain != "" {
		plat.Properties = append(plat.Properties, &repb.Platform_Property{Name: PropContainerImage, Value: spec.Toolchain})
	}
	sort.Slice(plat.Properties, func(i, j int) bool { return plat.Properties[i].Name < plat.Properties[j].Name })
	// REAPI 2.0 servers read the platform from the Command, 2.2+ from the Action: set both.
	cmd.Platform = plat
	cd, err := cache.PutProto(ctx, cas, cmd)
	if err != nil {
		return cache.Digest{}, err
	}
	a := &repb.Action{CommandDigest: cd.Proto(), InputRootDigest: root.Proto(), DoNotCache: spec.DoNotCache, Platform: plat}
	if spec.Timeout > 0 {
		a.Timeout = durationpb.New(spec.Timeout)
	}
	return cache.PutProto(ctx, cas, a)
}

// UploadDir stores a host directory tree in the CAS and returns its root Directory's
// digest. Symlinks are kept if they stay inside the tree; other file types are refused.
func UploadDir(ctx context.Context, cas cache.BlobStore, dir string) (cache.Digest, error) {
	var walk func(p, rel string) (cache.Digest, error)
	walk = func(p, rel string) (cache.Digest, error) {
		ents, err := os.ReadDir(p)
		if err != nil {
			return cache.Digest{}, status.Errorf(codes.InvalidArgument, "read input dir: %v", err)
		}
		out := &repb.Directory{}
		for _, e := range ents { // ReadDir sorts by name
			full := filepath.Join(p, e.Name())
			erel := path.Join(rel, e.Name())
			switch {
			case e.Type().IsRegular():
				info, err := e.Info()
				if err != nil {
					return cache.Digest{}, status.Errorf(codes.InvalidArgument, "input %s: %v", erel, err)
				}
				d, err := putFile(ctx, cas, full)
				if err != nil {
					return cache.Digest{}, err
				}
				out.Files = append(out.Files, &repb.FileNode{Name: e.Name(), Digest: d.Proto(), IsExecutable: info.Mode()&0o111 != 0})
			case e.IsDir():
				d, err := walk(full, erel)
				if err != nil {
					return cache.Digest{}, err
				}
				out.Directories = append(out.Directories, &repb.DirectoryNode{Name: e.Name(), Digest: d.Proto()})
			case e.Type()&fs.ModeSymlink != 0:
				target, err := os.Readlink(full)
				if err != nil {
					return cache.Digest{}, status.Errorf(codes.InvalidArgument, "input %s: %v", erel, err)
				}
				out.Symlinks = append(out.Symlinks, &repb.SymlinkNode{Name: e.Name(), Target: target})
			default:
				return cache.Digest{}, status.Errorf(codes.InvalidArgument, "input %s is not a file, directory or symlink", erel)
			}
		}
		if err := validateDirectory(out); err != nil {
			return cache.Digest{}, grpcerr.Wrap(err, "input dir %s", displayPath(rel))
		}
		return cache.PutProto(ctx, cas, out)
	}
	info, err := os.Stat(dir)
	if err != nil || !info.IsDir() {
		return cache.Digest{}, status.Errorf(codes.InvalidArgument, "input %s is not a directory", dir)
	}
	d, err := walk(dir, "")
	if err != nil {
		return cache.Digest{}, err
	}
	// Symlinks must stay inside the tree, as the executor requires.
	if _, err := fetchTree(ctx, cas, d); err != nil {
		return cache.Digest{}, err
	}
	return d, nil
}

func putFile(ctx context.Context, cas cache.BlobStore, p string) (cache.Digest, error) {
	f, err := os.Open(p)
	if err != nil {
		return cache.Digest{}, status.Errorf(codes.InvalidArgument, "input: %v", err)
	}
	defer f.Close()
	d, err := hashReader(f)
	if err != nil {
		return cache.Digest{}, status.Errorf(codes.Internal, "read %s: %v", p, err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return cache.Digest{}, status.Errorf(codes.Internal, "rewind %s: %v", p, err)
	}
	if err := cas.Put(ctx, d, f); err != nil {
		return cache.Digest{}, grpcerr.Wrap(err, "store %s (did it change while being read?)", p)
	}
	return d, nil
}

// WriteOutputs writes an ActionResult's outputs from the CAS under dest (relative to
// the working directory, as the result names them).
func WriteOutputs(ctx context.Context, cas cache.BlobStore, r *repb.ActionResult, dest string) error {
	writeFile := func(rel string, d *repb.Digest, exec bool) error {
		dg, err := cache.FromProto(d)
		if err != nil {
			return err
		}
		p := filepath.Join(dest, filepath.FromSlash(rel))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		mode := os.FileMode(0o644)
		if exec {
			mode = 0o755
		}
		rc, err := cas.Get(ctx, dg, 0)
		if err != nil {
			return err
		}
		defer rc.Close()
		tmp := p + ".kiln-tmp"
		f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, mode)
		if err != nil {
			return err
		}
		_, err = io.Copy(f, rc)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(tmp)
			return err
		}
		return os.Rename(tmp, p)
	}
	for _, f := range r.GetOutputFiles() {
		if err := writeFile(f.GetPath(), f.GetDigest(), f.GetIsExecutable()); err != nil {
			return fmt.Errorf("write output %s: %w", f.GetPath(), err)
		}
	}
	for _, s := range append(append(append([]*repb.OutputSymlink{}, r.GetOutputSymlinks()...), r.GetOutputFileSymlinks()...), r.GetOutputDirectorySymlinks()...) {
		p := filepath.Join(dest, filepath.FromSlash(s.GetPath()))
		os.MkdirAll(filepath.Dir(p), 0o755)
		os.Remove(p)
		if err := os.Symlink(s.GetTarget(), p); err != nil {
			return fmt.Errorf("write output symlink %s: %w", s.GetPath(), err)
		}
	}
	for _, od := range r.GetOutputDirectories() {
		td, err := cache.FromProto(od.GetTreeDigest())
		if err != nil {
			return err
		}
		tree := &repb.Tree{}
		if err := cache.ReadProto(ctx, cas, td, tree, cache.MaxTreeSize); err != nil {
			return err
		}
		root, dirs, err := cache.TreeDirectories(tree)
		if err != nil {
			return err
		}
		err = cache.WalkAll(ctx, root, dirs, cache.WalkOptions{MaxDepth: MaxTreeDepth}, func(it cache.WalkItem, dir *repb.Directory) error {
			rel := path.Join(od.GetPath(), it.Path)
			if err := os.MkdirAll(filepath.Join(dest, filepath.FromSlash(rel)), 0o755); err != nil {
				return err
			}
			for _, f := range dir.GetFiles() {
				if err := writeFile(path.Join(rel, f.GetName()), f.GetDigest(), f.GetIsExecutable()); err != nil {
					return err
				}
			}
			for _, s := range dir.GetSymlinks() {
				p := filepath.Join(dest, filepath.FromSlash(path.Join(rel, s.GetName())))
				os.Remove(p)
				if err := os.Symlink(s.GetTarget(), p); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("write output directory %s: %w", od.GetPath(), err)
		}

	}
	return nil
}
