package cache

import (
	"context"
	"path"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Directories finds a Directory message by its digest: in the CAS (an input root) or
// among a Tree's children (an output directory). One absent from the CAS is NOT_FOUND
// (or DATA_LOSS when its copy was damaged); one a Tree lacks, INVALID_ARGUMENT.
type Directories func(ctx context.Context, d Digest) (*repb.Directory, error)

// DirectoriesIn reads Directory messages from cas, refusing any over limit bytes.
func DirectoriesIn(cas BlobStore, limit int64) Directories {
	return func(ctx context.Context, d Digest) (*repb.Directory, error) {
		dir := &repb.Directory{}
		if err := ReadProto(ctx, cas, d, dir, limit); err != nil {
			return nil, err
		}
		return dir, nil
	}
}

// TreeDirectories indexes a Tree message by the digests of its directories and returns
// its root's digest. A directory the Tree lacks is INVALID_ARGUMENT: the Tree is broken.
func TreeDirectories(t *repb.Tree) (Digest, Directories, error) {
	byDigest := make(map[Digest]*repb.Directory, len(t.GetChildren())+1)
	for _, c := range t.GetChildren() {
		_, d, err := DigestOfProto(c)
		if err != nil {
			return Digest{}, nil, err
		}
		byDigest[d] = c
	}
	root := t.GetRoot()
	if root == nil {
		root = &repb.Directory{}
	}
	_, rd, err := DigestOfProto(root)
	if err != nil {
		return Digest{}, nil, err
	}
	byDigest[rd] = root
	return rd, func(_ context.Context, d Digest) (*repb.Directory, error) {
		if dir, ok := byDigest[d]; ok {
			return dir, nil
		}
		return nil, status.Errorf(codes.InvalidArgument, "the tree lacks directory %s", d)
	}, nil
}

// WalkItem is one directory of a walk.
type WalkItem struct {
	Path   string // slash path from the walk's root ("" for the root itself)
	Digest Digest
	Depth  int // 0 for the root
}

// WalkOptions shape a Walk.
type WalkOptions struct {
	// Distinct visits each distinct directory once, at the first path that reaches it
	// (the DAG's nodes); otherwise every path is visited (the tree the DAG expands to).
	Distinct bool
	// MaxDepth, if positive, makes a directory nested deeper INVALID_ARGUMENT.
	MaxDepth int
}

// Walk reads a directory DAG breadth first from its root, one directory per Next: the
// one way kiln walks input roots, output Trees and GetTree pages. It can stop after
// any directory and go on later (GetTree's pages keep it between calls).
type Walk struct {
	get   Directories
	opts  WalkOptions
	queue []WalkItem
	seen  map[Digest]bool            // Distinct: every digest queued so far
	dirs  map[Digest]*repb.Directory // not Distinct: directories read, for other paths to them
}

// NewWalk starts a walk at root.
func NewWalk(root Digest, get Directories, opts WalkOptions) *Walk {
	w := &Walk{get: get, opts: opts, queue: []WalkItem{{Digest: root}}}
	if opts.Distinct {
		w.seen = map[Digest]bool{root: true}
	} else {
		w.dirs = map[Digest]*repb.Directory{}
	}
	return w
}

// Done reports whether every directory has been visited.
func (w *Walk) Done() bool { return len(w.queue) == 0 }

// Seen is how many distinct directories a Distinct walk has queued so far (its memory).
func (w *Walk) Seen() int { return len(w.seen) }

// Next visits the next directory and queues its subdirectories. An error reading it
// (absent: NOT_FOUND or DATA_LOSS) comes with its item and leaves the walk usable: the
// caller decides whether an absent directory ends the walk or is skipped. A directory
// deeper than MaxDepth, or with a malformed child digest, is INVALID_ARGUMENT.
func (w *Walk) Next(ctx context.Context) (WalkItem, *repb.Directory, error) {
	it := w.queue[0]
	w.queue = w.queue[1:]
	if w.opts.MaxDepth > 0 && it.Depth > w.opts.MaxDepth {
		return it, nil, status.Errorf(codes.InvalidArgument, "nested deeper than %d levels", w.opts.MaxDepth)
	}
	dir, ok := w.dirs[it.Digest]
	if !ok {
		var err error
		if dir, err = w.get(ctx, it.Digest); err != nil {
			return it, nil, err
		}
		if w.dirs != nil {
			w.dirs[it.Digest] = dir
		}
	}
	for _, sub := range dir.GetDirectories() {
		p := path.Join(it.Path, sub.GetName())
		d, err := FromProto(sub.GetDigest())
		if err != nil {
			return it, nil, status.Errorf(codes.InvalidArgument, "directory %q: child %q: %s", it.Path, sub.GetName(), status.Convert(err).Message())
		}
		if w.seen != nil {
			if w.seen[d] {
				continue
			}
			w.seen[d] = true
		}
		w.queue = append(w.queue, WalkItem{Path: p, Digest: d, Depth: it.Depth + 1})
	}
	return it, dir, nil
}

// WalkAll visits every directory under root with visit; any error ends the walk.
func WalkAll(ctx context.Context, root Digest, get Directories, opts WalkOptions, visit func(WalkItem, *repb.Directory) error) error {
	w := NewWalk(root, get, opts)
	for !w.Done() {
		it, dir, err := w.Next(ctx)
		if err == nil {
			err = visit(it, dir)
		}
		if err != nil {
			return err
		}
	}
	return nil
}
