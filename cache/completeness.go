package cache

import (
	"context"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// MaxTreeSize bounds the Tree messages the completeness check reads.
const MaxTreeSize = 64 << 20

// completenessChecking hides action-cache entries whose outputs are not all in the CAS,
// so a client never gets a hit it cannot download.
type completenessChecking struct {
	ActionCache
	cas BlobStore
}

// WithCompletenessCheck wraps ac so that Get answers NOT_FOUND for a result that
// references a blob (output file, Tree or a file in it, stdout, stderr) cas lacks.
func WithCompletenessCheck(ac ActionCache, cas BlobStore) ActionCache {
	return completenessChecking{ActionCache: ac, cas: cas}
}

func (c completenessChecking) Get(ctx context.Context, key ActionKey) (*repb.ActionResult, error) {
	r, err := c.ActionCache.Get(ctx, key)
	if err != nil {
		return nil, err
	}
	ds, err := ReferencedDigests(ctx, c.cas, r)
	if err != nil {
		return nil, status.Errorf(codes.NotFound, "action %s: cached result is incomplete: %v", key.Action, status.Convert(err).Message())
	}
	missing, err := c.cas.FindMissing(ctx, ds)
	if err != nil {
		return nil, err
	}
	if len(missing) > 0 {
		return nil, status.Errorf(codes.NotFound, "action %s: cached result references %d missing blob(s), e.g. %s", key.Action, len(missing), missing[0])
	}
	return r, nil
}

// ReferencedDigests lists every blob r needs: output files, Trees and the files in them,
// stdout and stderr. It reads each Tree from cas.
func ReferencedDigests(ctx context.Context, cas BlobStore, r *repb.ActionResult) ([]Digest, error) {
	var ds []Digest
	add := func(p *repb.Digest) error {
		if p == nil {
			return nil
		}
		d, err := FromProto(p)
		if err != nil {
			return err
		}
		ds = append(ds, d)
		return nil
	}
	for _, f := range r.GetOutputFiles() {
		if err := add(f.GetDigest()); err != nil {
			return nil, err
		}
	}
	for _, dir := range r.GetOutputDirectories() {
		td, err := FromProto(dir.GetTreeDigest())
		if err != nil {
			return nil, err
		}
		ds = append(ds, td)
		tree := &repb.Tree{}
		if err := ReadProto(ctx, cas, td, tree, MaxTreeSize); err != nil {
			return nil, err
		}
		root, dirs, err := TreeDirectories(tree)
		if err != nil {
			return nil, err
		}
		err = WalkAll(ctx, root, dirs, WalkOptions{Distinct: true}, func(_ WalkItem, d *repb.Directory) error {
			for _, f := range d.GetFiles() {
				if err := add(f.GetDigest()); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	if err := add(r.GetStdoutDigest()); err != nil {
		return nil, err
	}
	if err := add(r.GetStderrDigest()); err != nil {
		return nil, err
	}
	return ds, nil
}

// namespaced keeps a set of action-cache entries apart from all others.
type namespaced struct {
	ActionCache
	ns string
}

// WithNamespace partitions ac: entries written and read through the result live under
// ns and are invisible to ac used directly (e.g. results clients uploaded, which an
// executor must never serve as its own). ns must not be a valid instance name; start
// it with a NUL byte.
func WithNamespace(ac ActionCache, ns string) ActionCache { return namespaced{ac, ns} }

func (n namespaced) key(k ActionKey) ActionKey {
	k.Instance = n.ns + "\x00" + k.Instance
	return k
}

func (n namespaced) Get(ctx context.Context, k ActionKey) (*repb.ActionResult, error) {
	return n.ActionCache.Get(ctx, n.key(k))
}

func (n namespaced) Put(ctx context.Context, k ActionKey, r *repb.ActionResult) error {
	return n.ActionCache.Put(ctx, n.key(k), r)
}
