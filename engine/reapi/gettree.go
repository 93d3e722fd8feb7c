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

// treeWalk is a walk of a tree's distinct directories, stopped after n of them.
type treeWalk struct {
	root cache.Digest
	n    int
	walk *cache.Walk
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

// GetTree streams the Directory messages reachable from root_digest, each distinct
// directory once, breadth first. Directories absent from the CAS are left out, as the
// spec allows. A page token resumes the walk the previous page kept (treeCursors).
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
	pageSize := int(req.GetPageSize())
	if pageSize <= 0 || pageSize > maxTreePage {
		pageSize = maxTreePage
	}
	w := c.s.trees.take(id, root, skip)
	if w == nil { // a first page, or a walk no longer kept: walk from the root
		w = &treeWalk{root: root, walk: cache.NewWalk(root, cache.DirectoriesIn(c.s.cas, cache.MaxTreeSize), cache.WalkOptions{Distinct: true})}
	}
	var page []*repb.Directory
	for !w.walk.Done() && len(page) < pageSize {
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
		if w.n >= skip {
			page = append(page, dir)
		}
		w.n++
	}
	next := ""
	if !w.walk.Done() {
		next = c.s.trees.put(w)
	}
	// Split into messages that fit the gRPC limit.
	var batch []*repb.Directory
	size := 0
	for _, dir := range page {
		sz := proto.Size(dir)
		if len(batch) > 0 && size+sz > MaxBatchSize {
			if err := stream.Send(&repb.GetTreeResponse{Directories: batch}); err != nil {
				return err
			}
			batch, size = nil, 0
		}
		batch = append(batch, dir)
		size += sz
	}
	return stream.Send(&repb.GetTreeResponse{Directories: batch, NextPageToken: next})
}
