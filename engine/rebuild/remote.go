package rebuild

import (
	"context"
	"path"

	"github.com/bazelbuild/remote-apis-sdks/go/pkg/client"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/digest"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/uploadinfo"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// RemoteExecutor re-executes actions on a REAPI server (another kiln): it uploads what
// the server lacks and executes with skip_cache_lookup, so the server runs the action
// afresh instead of answering from its cache.
type RemoteExecutor struct {
	c *client.Client
}

// DialRemote connects to a REAPI server at addr (plaintext gRPC, host:port).
func DialRemote(ctx context.Context, addr, instance string) (*RemoteExecutor, error) {
	c, err := client.NewClient(ctx, instance, client.DialParams{Service: addr, NoSecurity: true}, client.RetryTransient())
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "connect to %s: %v", addr, err)
	}
	return &RemoteExecutor{c: c}, nil
}

// Close closes the connection.
func (r *RemoteExecutor) Close() error { return r.c.Close() }

// Execute implements Executor.
func (r *RemoteExecutor) Execute(ctx context.Context, ad cache.Digest, src cache.BlobStore) (map[string]string, int, error) {
	ds, err := actionBlobs(ctx, src, ad)
	if err != nil {
		return nil, 0, err
	}
	var sdk []digest.Digest
	for _, d := range ds {
		sdk = append(sdk, digest.Digest{Hash: d.Hash, Size: d.Size})
	}
	missing, err := r.c.MissingBlobs(ctx, sdk)
	if err != nil {
		return nil, 0, err
	}
	var entries []*uploadinfo.Entry
	for _, d := range missing {
		b, err := cache.ReadAll(ctx, src, cache.Digest{Hash: d.Hash, Size: d.Size}, 0)
		if err != nil {
			return nil, 0, cache.PrefixError(err, "blob %s", d)
		}
		entries = append(entries, uploadinfo.EntryFromBlob(b))
	}
	if _, _, err := r.c.UploadIfMissing(ctx, entries...); err != nil {
		return nil, 0, err
	}
	op, err := r.c.ExecuteAndWait(ctx, &repb.ExecuteRequest{InstanceName: r.c.InstanceName, ActionDigest: ad.Proto(), SkipCacheLookup: true})
	if err != nil {
		return nil, 0, err
	}
	if e := op.GetError(); e != nil {
		return nil, 0, status.ErrorProto(e)
	}
	resp := &repb.ExecuteResponse{}
	if err := op.GetResponse().UnmarshalTo(resp); err != nil {
		return nil, 0, status.Errorf(codes.Internal, "execute response: %v", err)
	}
	if s := resp.GetStatus(); s.GetCode() != 0 {
		return nil, 0, status.ErrorProto(s)
	}
	res := resp.GetResult()
	out := map[string]string{}
	for _, f := range res.GetOutputFiles() {
		out[f.GetPath()] = "sha256:" + f.GetDigest().GetHash()
	}
	for _, s := range append(append(res.GetOutputSymlinks(), res.GetOutputFileSymlinks()...), res.GetOutputDirectorySymlinks()...) {
		out[s.GetPath()] = symlinkProduct(s.GetTarget())
	}
	for _, od := range res.GetOutputDirectories() {
		tree := &repb.Tree{}
		td := od.GetTreeDigest()
		if _, err := r.c.ReadProto(ctx, digest.Digest{Hash: td.GetHash(), Size: td.GetSizeBytes()}, tree); err != nil {
			return nil, 0, err
		}
		children := map[string]*repb.Directory{}
		for _, c := range tree.GetChildren() {
			_, d, _ := cache.DigestOfProto(c)
			children[d.Hash] = c
		}
		var walk func(d *repb.Directory, rel string)
		walk = func(d *repb.Directory, rel string) {
			for _, f := range d.GetFiles() {
				out[path.Join(rel, f.GetName())] = "sha256:" + f.GetDigest().GetHash()
			}
			for _, s := range d.GetSymlinks() {
				out[path.Join(rel, s.GetName())] = symlinkProduct(s.GetTarget())
			}
			for _, sd := range d.GetDirectories() {
				if c, ok := children[sd.GetDigest().GetHash()]; ok {
					walk(c, path.Join(rel, sd.GetName()))
				}
			}
		}
		walk(tree.GetRoot(), od.GetPath())
	}
	return out, int(res.GetExitCode()), nil
}

func symlinkProduct(target string) string {
	return Products([]engine.ProducedFile{{Path: "x", SymlinkTarget: target}})["x"]
}
