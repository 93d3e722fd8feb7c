package reapi

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"strconv"
	"strings"
	"sync"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
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

// treeWalk is a breadth-first walk of a tree, stopped after n directories.
type treeWalk struct {
	root  cache.Digest
	n     int
	queue []cache.Digest
	seen  map[cache.Digest]bool
}

// treeCursors keeps the walks behind outstanding page tokens, so that each page
// continues where the last stopped instead of walking again from the root. A token
// also carries the walk's position, so a page whose walk is gone (evicted, or the
// server restarted) is still answered, by walking again.
type treeCursors struct {
	mu    sync.Mutex
	walks map[string]*treeWalk
	order []string // ids, oldest first
	seen  int      // len(w.seen) summed over walks
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
		c.seen -= len(w.seen)
		delete(c.walks, id)
	}
}

// put keeps w and returns the page token that resumes it.
func (c *treeCursors) put(w *treeWalk) string {
	var b [12]byte
	rand.Read(b[:])
	id := hex.EncodeToString(b[:])
	if len(w.seen) <= maxTreeCursorSeen/4 { // a larger walk is not kept: its next page walks again
		c.mu.Lock()
		if c.walks == nil {
			c.walks = map[string]*treeWalk{}
		}
		for len(c.order) > 0 && (len(c.walks) >= maxTreeCursors || c.seen+len(w.seen) > maxTreeCursorSeen) {
			c.drop(c.order[0])
			c.order = c.order[1:]
		}
		c.walks[id] = w
		c.seen += len(w.seen)
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
// Each client may have DefaultClientTrees walks in progress, and what a walk holds is
// charged to the memory budget as it grows: directories go out as soon as a response
// message is full, not once the whole page is read.
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
	mem, err := c.s.opts.Memory.Charge(client, "GetTree", treeSeenCost)
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
		w = &treeWalk{root: root, seen: map[cache.Digest]bool{root: true}, queue: []cache.Digest{root}}
	}
	if err := mem.Grow(int64(len(w.seen)+len(w.queue)) * treeSeenCost); err != nil {
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
	for len(w.queue) > 0 && sent < pageSize {
		d := w.queue[0]
		w.queue = w.queue[1:]
		cost := treeReadCost * min(d.Size, cache.MaxTreeSize)
		if err := mem.Grow(cost); err != nil {
			return err
		}
		dir := &repb.Directory{}
		if err := cache.ReadProto(ctx, c.s.cas, d, dir, cache.MaxTreeSize); err != nil {
			mem.Shrink(cost)
			if d == root && status.Code(err) == codes.NotFound {
				return status.Errorf(codes.NotFound, "tree root %s not found", d)
			}
			if status.Code(err) == codes.NotFound || status.Code(err) == codes.DataLoss {
				continue // the spec: return the portion present, omit the rest
			}
			return err
		}
		added := 0
		for _, sub := range dir.GetDirectories() {
			sd, err := cache.FromProto(sub.GetDigest())
			if err != nil {
				return status.Errorf(codes.InvalidArgument, "directory %s: child %q: %s", d, sub.GetName(), status.Convert(err).Message())
			}
			if !w.seen[sd] {
				w.seen[sd] = true
				w.queue = append(w.queue, sd)
				added++
			}
		}
		if err := mem.Grow(int64(added) * treeSeenCost); err != nil {
			return err
		}
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
	if len(w.queue) > 0 {
		next = c.s.trees.put(w)
	}
	return flush(next)
}
