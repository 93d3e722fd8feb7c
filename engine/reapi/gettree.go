package reapi

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"strconv"
	"strings"
	"sync"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/limits"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// maxTreePage bounds the directories one GetTree response carries.
const maxTreePage = 1000

const (
	maxTreeCursors    = 64      // walks kept for their next page
	maxTreeCursorSeen = 500_000 // directories all kept walks may have seen together (~60 MB)
)

// treeWalk is a walk of a tree's distinct directories, stopped after n of them.
type treeWalk struct {
	root cache.Digest
	n    int
	walk *cache.Walk
	// mem is the charge of the page being read: each directory the walk reads is
	// charged to it before it is read.
	mem *limits.Charge
}

// newTreeWalk starts a walk of the distinct directories under root in cas.
func newTreeWalk(cas cache.BlobStore, root cache.Digest) *treeWalk {
	w := &treeWalk{root: root}
	w.walk = cache.NewWalk(root, func(ctx context.Context, d cache.Digest) (*repb.Directory, error) {
		cost := treeReadCost * min(d.Size, cache.MaxTreeSize)
		if err := w.mem.Grow(cost); err != nil {
			return nil, err
		}
		dir := &repb.Directory{}
		if err := cache.ReadProto(ctx, cas, d, dir, cache.MaxTreeSize); err != nil {
			w.mem.Shrink(cost)
			return nil, err
		}
		return dir, nil
	}, cache.WalkOptions{Distinct: true})
	return w
}

// treeCursors keeps the walks behind outstanding page tokens, so that each page
// continues where the last stopped instead of walking again from the root. A token
// also carries the walk's position, so a page whose walk is gone (evicted, or the
// server restarted) is still answered, by walking again.
type treeCursors struct {
	mu    sync.Mutex
	walks map[string]*treeWalk
	order []string // ids, oldest first
	seen  int      // w.walk.Seen() summed over walks
}

// take removes and returns the walk id of root stopped at n, if kept.
func (c *treeCursors) take(id string, root cache.Digest, n int) *treeWalk {
	c.mu.Lock()
	defer c.mu.Unlock()
	w := c.walks[id]
	if w == nil || w.root != root || w.n != n {
		return nil
	}
	c.drop(id)
	return w
}

// drop forgets walk id; callers hold c.mu.
func (c *treeCursors) drop(id string) {
	if w := c.walks[id]; w != nil {
		c.seen -= w.walk.Seen()
		delete(c.walks, id)
	}
}

// put keeps w and returns the page token that resumes it.
func (c *treeCursors) put(w *treeWalk) string {
	var b [12]byte
	rand.Read(b[:])
	id := hex.EncodeToString(b[:])
	if w.walk.Seen() <= maxTreeCursorSeen/4 { // a larger walk is not kept: its next page walks again
		c.mu.Lock()
		if c.walks == nil {
			c.walks = map[string]*treeWalk{}
		}
		for len(c.order) > 0 && (len(c.walks) >= maxTreeCursors || c.seen+w.walk.Seen() > maxTreeCursorSeen) {
			c.drop(c.order[0])
			c.order = c.order[1:]
		}
		c.walks[id] = w
		c.seen += w.walk.Seen()
		c.order = append(c.order, id)
		if len(c.order) > 4*maxTreeCursors { // drop ids already taken
			kept := c.order[:0]
			for _, o := range c.order {
				if c.walks[o] != nil {
					kept = append(kept, o)
				}
			}
			c.order = kept
		}
		c.mu.Unlock()
	}
	return base64.RawURLEncoding.EncodeToString([]byte(strconv.Itoa(w.n) + "." + id))
}

// parseTreeToken returns the position and walk id a page token names.
func parseTreeToken(tok string) (n int, id string, err error) {
	b, err := base64.RawURLEncoding.DecodeString(tok)
	if err == nil {
		pos, rest, _ := strings.Cut(string(b), ".")
		id = rest
		n, err = strconv.Atoi(pos)
	}
	if err != nil || n < 0 {
		return 0, "", status.Errorf(codes.InvalidArgument, "bad page token %q", trunc(tok))
	}
	return n, id, nil
}

// Memory a GetTree walk is charged for: each directory read costs treeReadCost times
// its size while it is held (the blob, the parsed message, the marshalled response),
// and each directory seen treeSeenCost for the rest of the walk.
const (
	treeReadCost = 6
	treeSeenCost = 160
	// DefaultClientTrees bounds the GetTree calls one client may have in progress.
	DefaultClientTrees = 8
)

// GetTree streams the Directory messages reachable from root_digest, each distinct
// directory once, breadth first. Directories absent from the CAS are left out, as the
// spec allows. A page token resumes the walk the previous page kept (treeCursors).
// Each client may have DefaultClientTrees walks in progress, what a walk holds is
// charged to the memory budget as it grows (directories go out as soon as a response
// message is full, not once the whole page is read), and the walk is the client's work.
func (c casServer) GetTree(req *repb.GetTreeRequest, stream repb.ContentAddressableStorage_GetTreeServer) error {
	ctx := stream.Context()
	if err := CheckInstance(req.GetInstanceName()); err != nil {
		return err
	}
	if err := checkDigestFunction(req.GetDigestFunction()); err != nil {
		return err
	}
	root, err := cache.FromProto(req.GetRootDigest())
	if err != nil {
		return err
	}
	skip, id := 0, ""
	if tok := req.GetPageToken(); tok != "" {
		if skip, id, err = parseTreeToken(tok); err != nil {
			return err
		}
	}
	if req.GetPageSize() < 0 {
		return status.Errorf(codes.InvalidArgument, "negative page_size %d", req.GetPageSize())
	}
	pageSize := int(req.GetPageSize())
	if pageSize == 0 || pageSize > maxTreePage {
		pageSize = maxTreePage
	}
	client := ClientID(ctx)
	release, err := c.s.treeSlots.Acquire(client)
	if err != nil {
		return err
	}
	defer release()
	mem, err := c.s.opts.Memory.Charge(client, "GetTree", 0)
	if err != nil {
		return err
	}
	defer mem.Release()
	// Reading, parsing and sending the directories is the client's work, all of it.
	done, err := c.s.opts.Work.Acquire(ctx, client)
	if err != nil {
		return err
	}
	defer done()
	w := c.s.trees.take(id, root, skip)
	if w == nil { // a first page, or a walk no longer kept: walk from the root
		w = newTreeWalk(c.s.cas, root)
	}
	w.mem = mem
	seen := w.walk.Seen()
	if err := mem.Grow(int64(seen) * treeSeenCost); err != nil {
		return err
	}
	var batch []*repb.Directory
	size, held, sent := 0, int64(0), 0
	flush := func(next string) error {
		err := stream.Send(&repb.GetTreeResponse{Directories: batch, NextPageToken: next})
		batch, size = nil, 0
		mem.Shrink(held)
		held = 0
		return err
	}
	for !w.walk.Done() && sent < pageSize {
		it, dir, err := w.walk.Next(ctx)
		if err != nil {
			if it.Digest == root && status.Code(err) == codes.NotFound {
				return status.Errorf(codes.NotFound, "tree root %s not found", root)
			}
			if status.Code(err) == codes.NotFound || status.Code(err) == codes.DataLoss {
				continue // the spec: return the portion present, omit the rest
			}
			return err
		}
		if err := mem.Grow(int64(w.walk.Seen()-seen) * treeSeenCost); err != nil {
			return err
		}
		seen = w.walk.Seen()
		cost := treeReadCost * min(it.Digest.Size, cache.MaxTreeSize)
		if w.n >= skip {
			sz := proto.Size(dir)
			if len(batch) > 0 && size+sz > MaxBatchSize {
				if err := flush(""); err != nil {
					return err
				}
			}
			batch = append(batch, dir)
			size += sz
			held += cost
			sent++
		} else {
			mem.Shrink(cost)
		}
		w.n++
	}
	next := ""
	if !w.walk.Done() {
		w.mem = nil // kept between pages: the next page charges its own
		next = c.s.trees.put(w)
	}
	return flush(next)
}
