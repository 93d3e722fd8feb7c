package tlog

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"sort"
	"strconv"
	"sync"

	"github.com/transparency-dev/formats/log"
	"github.com/transparency-dev/merkle/compact"
	"github.com/transparency-dev/merkle/proof"
	"github.com/transparency-dev/merkle/rfc6962"
	"github.com/transparency-dev/tessera/api"
	"github.com/transparency-dev/tessera/api/layout"
	"github.com/transparency-dev/tessera/client"
	"golang.org/x/mod/sumdb/note"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Checkpoint is a verified, signed statement of the log's size and root hash.
type Checkpoint struct {
	Origin string
	Size   uint64
	Root   []byte
	// Raw is the signed note as published (C2SP tlog-checkpoint).
	Raw []byte
}

// ParseCheckpoint verifies raw's signature with v (whose name is the log's origin) and
// parses it.
func ParseCheckpoint(raw []byte, v note.Verifier) (*Checkpoint, error) {
	cp, _, _, err := log.ParseCheckpoint(raw, v.Name(), v)
	if err != nil {
		return nil, errf(codes.DataLoss, "checkpoint does not verify with log key %s: %v", v.Name(), err)
	}
	return &Checkpoint{Origin: cp.Origin, Size: cp.Size, Root: cp.Hash, Raw: raw}, nil
}

// Reader reads a log without appending: checkpoints, entries, proofs. Its files come
// from a Source: the log's directory, or a copy published elsewhere (PublishTo).
type Reader struct {
	src Source
	v   note.Verifier
}

// NewReader reads the log in dir, trusting checkpoints signed by v.
func NewReader(dir string, v note.Verifier) *Reader { return NewReaderFrom(DirSource(dir), v) }

// NewReaderFrom reads the log whose files src holds, trusting checkpoints signed by v.
func NewReaderFrom(src Source, v note.Verifier) *Reader { return &Reader{src: src, v: v} }

// Source returns where the reader reads the log's files.
func (r *Reader) Source() Source { return r.src }

// Verifier returns the key checkpoints are checked with (its name is the log's origin).
func (r *Reader) Verifier() note.Verifier { return r.v }

// Checkpoint reads and verifies the latest published checkpoint.
func (r *Reader) Checkpoint(ctx context.Context) (*Checkpoint, error) {
	raw, err := r.src.ReadFile(ctx, layout.CheckpointPath)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, errf(codes.NotFound, "log %s has no checkpoint yet", r.src)
	}
	if err != nil {
		return nil, errf(sourceCode(err), "read checkpoint of log %s: %v", r.src, err)
	}
	return ParseCheckpoint(raw, r.v)
}

// LeafHash is the RFC 6962 leaf hash of an entry.
func LeafHash(data []byte) []byte { return rfc6962.DefaultHasher.HashLeaf(data) }

// Entry returns entry index of a tree of size treeSize.
func (r *Reader) Entry(ctx context.Context, index, treeSize uint64) ([]byte, error) {
	if index >= treeSize {
		return nil, errf(codes.OutOfRange, "entry %d is beyond tree size %d", index, treeSize)
	}
	b, err := client.GetEntryBundle(ctx, r.readBundle, index/layout.EntryBundleWidth, treeSize)
	if err != nil {
		return nil, errf(codes.DataLoss, "entry %d: %v", index, err)
	}
	i := index % layout.EntryBundleWidth
	if i >= uint64(len(b.Entries)) {
		return nil, errf(codes.DataLoss, "entry %d: its bundle holds only %d entries", index, len(b.Entries))
	}
	return b.Entries[i], nil
}

// Scan calls fn for every entry of a tree of size treeSize, in order, until fn returns
// false.
func (r *Reader) Scan(ctx context.Context, treeSize uint64, fn func(index uint64, data []byte) bool) error {
	return r.ScanFrom(ctx, 0, treeSize, fn)
}

// ScanFrom is Scan from entry start on (a follower reading only what is new).
func (r *Reader) ScanFrom(ctx context.Context, start, treeSize uint64, fn func(index uint64, data []byte) bool) error {
	for bi := start / layout.EntryBundleWidth; bi*layout.EntryBundleWidth < treeSize; bi++ {
		b, err := client.GetEntryBundle(ctx, r.readBundle, bi, treeSize)
		if err != nil {
			return errf(codes.DataLoss, "entry bundle %d: %v", bi, err)
		}
		for i, e := range b.Entries {
			idx := bi*layout.EntryBundleWidth + uint64(i)
			if idx < start {
				continue
			}
			if idx >= treeSize {
				return nil
			}
			if !fn(idx, e) {
				return nil
			}
		}
	}
	return nil
}

// Find returns the index of the first entry equal to data in a tree of size treeSize.
func (r *Reader) Find(ctx context.Context, data []byte, treeSize uint64) (uint64, bool, error) {
	var found uint64
	ok := false
	err := r.Scan(ctx, treeSize, func(i uint64, e []byte) bool {
		if bytes.Equal(e, data) {
			found, ok = i, true
			return false
		}
		return true
	})
	return found, ok, err
}

// Prover builds proofs against one tree size, caching what it reads: entry bundles,
// and every node of each tile it fetched (hashed once), so proving many entries of one
// tree costs little more than reading its tiles once.
type Prover struct {
	r    *Reader
	size uint64
	pb   *client.ProofBuilder

	mu      sync.Mutex
	tiles   map[[2]uint64][][][]byte // (level, index) -> nodes by level inside the tile
	bundles map[uint64]api.EntryBundle
}

// Prover returns a proof builder for a tree of the given size.
func (r *Reader) Prover(ctx context.Context, size uint64) (*Prover, error) {
	pb, err := client.NewProofBuilder(ctx, size, r.prefixTile)
	if err != nil {
		return nil, errf(codes.Internal, "proof builder: %v", err)
	}
	return &Prover{r: r, size: size, pb: pb, tiles: map[[2]uint64][][][]byte{}, bundles: map[uint64]api.EntryBundle{}}, nil
}

// Inclusion returns the inclusion proof of entry index in the prover's tree.
func (p *Prover) Inclusion(ctx context.Context, index uint64) ([][]byte, error) {
	if index >= p.size {
		return nil, errf(codes.OutOfRange, "entry %d is not covered by a tree of size %d", index, p.size)
	}
	nodes, err := proof.Inclusion(index, p.size)
	if err != nil {
		return nil, errf(codes.Internal, "inclusion proof for entry %d: %v", index, err)
	}
	hashes := make([][]byte, len(nodes.IDs))
	p.mu.Lock()
	defer p.mu.Unlock()
	for i, id := range nodes.IDs {
		if hashes[i], err = p.node(ctx, id); err != nil {
			return nil, errf(codes.DataLoss, "inclusion proof for entry %d: %v", index, err)
		}
	}
	if hashes, err = nodes.Rehash(hashes, rfc6962.DefaultHasher.HashChildren); err != nil {
		return nil, errf(codes.DataLoss, "inclusion proof for entry %d: %v", index, err)
	}
	return hashes, nil
}

// node returns the hash of a perfect subtree from the tile holding it; every node of a
// tile is hashed when the tile is first read. Caller holds p.mu.
func (p *Prover) node(ctx context.Context, id compact.NodeID) ([]byte, error) {
	tl, ti, nl, ni := layout.NodeCoordsToTileAddress(uint64(id.Level), id.Index)
	key := [2]uint64{tl, ti}
	levels, ok := p.tiles[key]
	if !ok {
		raw, err := p.r.prefixTile(ctx, tl, ti, layout.PartialTileSize(tl, ti, p.size))
		if err != nil {
			return nil, fmt.Errorf("tile %d/%d: %v", tl, ti, err)
		}
		var t api.HashTile
		if err := t.UnmarshalText(raw); err != nil {
			return nil, fmt.Errorf("tile %d/%d: %v", tl, ti, err)
		}
		levels = [][][]byte{t.Nodes}
		for prev := t.Nodes; len(prev) >= 2; prev = levels[len(levels)-1] {
			next := make([][]byte, len(prev)/2)
			for i := range next {
				next[i] = rfc6962.DefaultHasher.HashChildren(prev[2*i], prev[2*i+1])
			}
			levels = append(levels, next)
		}
		p.tiles[key] = levels
	}
	if int(nl) >= len(levels) || ni >= uint64(len(levels[nl])) {
		return nil, fmt.Errorf("node %d/%d is not in tile %d/%d", id.Level, id.Index, tl, ti)
	}
	return levels[nl][ni], nil
}

// Entry returns entry index of the prover's tree, reading each entry bundle once.
func (p *Prover) Entry(ctx context.Context, index uint64) ([]byte, error) {
	if index >= p.size {
		return nil, errf(codes.OutOfRange, "entry %d is beyond tree size %d", index, p.size)
	}
	bi := index / layout.EntryBundleWidth
	p.mu.Lock()
	b, ok := p.bundles[bi]
	p.mu.Unlock()
	if !ok {
		var err error
		if b, err = client.GetEntryBundle(ctx, p.r.readBundle, bi, p.size); err != nil {
			return nil, errf(codes.DataLoss, "entry %d: %v", index, err)
		}
		p.mu.Lock()
		p.bundles[bi] = b
		p.mu.Unlock()
	}
	i := index % layout.EntryBundleWidth
	if i >= uint64(len(b.Entries)) {
		return nil, errf(codes.DataLoss, "entry %d: its bundle holds only %d entries", index, len(b.Entries))
	}
	return b.Entries[i], nil
}

// Consistency returns the proof that the tree of size from is a prefix of the prover's
// tree (to must not exceed its size).
func (p *Prover) Consistency(ctx context.Context, from, to uint64) ([][]byte, error) {
	if from > to || to > p.size {
		return nil, errf(codes.InvalidArgument, "consistency from %d to %d: need from <= to <= %d", from, to, p.size)
	}
	h, err := p.pb.ConsistencyProof(ctx, from, to)
	if err != nil {
		return nil, errf(codes.DataLoss, "consistency proof %d..%d: %v", from, to, err)
	}
	return h, nil
}

// RootAt computes the root hash of the log's first size entries from its tiles. Only as
// trustworthy as the tiles: compare it with a signed checkpoint before relying on it.
func (r *Reader) RootAt(ctx context.Context, size uint64) ([]byte, error) {
	if size == 0 {
		return rfc6962.DefaultHasher.EmptyRoot(), nil
	}
	nodes, err := client.FetchRangeNodes(ctx, size, r.prefixTile)
	if err != nil {
		return nil, errf(codes.DataLoss, "root at size %d: %v", size, err)
	}
	rf := compact.RangeFactory{Hash: rfc6962.DefaultHasher.HashChildren}
	rng, err := rf.NewRange(0, size, nodes)
	if err != nil {
		return nil, errf(codes.DataLoss, "root at size %d: %v", size, err)
	}
	root, err := rng.GetRootHash(nil)
	if err != nil {
		return nil, errf(codes.DataLoss, "root at size %d: %v", size, err)
	}
	return root, nil
}

// prefixTile reads the first p hashes of a tile (all 256 for p = 0). The tile for
// exactly p may never have been written (a batch takes the tree from below p to above
// it in one step), or may have been removed since (superseded by a wider one), but
// any later version of the tile, partial or full, starts with the same p hashes: tiles
// only grow.
func (r *Reader) prefixTile(ctx context.Context, level, index uint64, p uint8) ([]byte, error) {
	b, err := readAtLeast(ctx, r.src, layout.TilePath(level, index, 0), p)
	if err != nil {
		return nil, err
	}
	want := int(p) * sha256.Size
	if p == 0 {
		want = layout.TileWidth * sha256.Size
	}
	if len(b) < want {
		return nil, fmt.Errorf("tile %d/%d holds %d bytes, want %d", level, index, len(b), want)
	}
	return b[:want], nil
}

// readBundle reads an entry bundle holding at least p entries (all 256 for p = 0);
// callers stop at the tree size they read, so more entries do no harm.
func (r *Reader) readBundle(ctx context.Context, index uint64, p uint8) ([]byte, error) {
	return readAtLeast(ctx, r.src, layout.EntriesPath(index, 0), p)
}

// readAtLeast reads the version of the tile or bundle whose full path is full that
// holds at least p items: the partial one for exactly p, else the full one, else the
// narrowest wider partial one.
func readAtLeast(ctx context.Context, src Source, full string, p uint8) ([]byte, error) {
	if p == 0 {
		return src.ReadFile(ctx, full)
	}
	b, err := src.ReadFile(ctx, full+".p/"+strconv.Itoa(int(p)))
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return b, err
	}
	if b, err := src.ReadFile(ctx, full); err == nil || !errors.Is(err, fs.ErrNotExist) {
		return b, err
	}
	widths, lerr := src.Partials(ctx, full)
	if lerr != nil {
		return nil, lerr
	}
	sort.Ints(widths)
	for _, w := range widths {
		if w > int(p) {
			if b, err := src.ReadFile(ctx, full+".p/"+strconv.Itoa(w)); err == nil {
				return b, nil
			}
		}
	}
	return nil, err
}

// VerifyInclusion checks that data is entry index of the tree cp signs.
func VerifyInclusion(data []byte, index uint64, cp *Checkpoint, p [][]byte) error {
	if err := proof.VerifyInclusion(rfc6962.DefaultHasher, index, cp.Size, LeafHash(data), p, cp.Root); err != nil {
		return errf(codes.DataLoss, "entry %d is not included in the tree of size %d: %v", index, cp.Size, err)
	}
	return nil
}

// VerifyConsistency checks that the tree (size1, root1) is a prefix of (size2, root2).
func VerifyConsistency(size1 uint64, root1 []byte, size2 uint64, root2 []byte, p [][]byte) error {
	if err := proof.VerifyConsistency(rfc6962.DefaultHasher, size1, size2, p, root1, root2); err != nil {
		return errf(codes.DataLoss, "the tree of size %d is not a prefix of the tree of size %d: %v", size1, size2, err)
	}
	return nil
}

// Include finds data's inclusion in the tree cp signs: index is where the caller
// expects it (from a local hint), or, if hint is false, the log is scanned for it. The
// returned proof is already verified.
func (r *Reader) Include(ctx context.Context, data []byte, index uint64, hint bool, cp *Checkpoint, pv *Prover) (uint64, [][]byte, error) {
	if pv == nil || pv.size != cp.Size {
		var err error
		if pv, err = r.Prover(ctx, cp.Size); err != nil {
			return 0, nil, err
		}
	}
	if hint {
		if index >= cp.Size {
			return 0, nil, errf(codes.Unavailable, "entry %d is not yet covered by the latest checkpoint (size %d)", index, cp.Size)
		}
		e, err := pv.Entry(ctx, index)
		if err != nil {
			return 0, nil, err
		}
		if !bytes.Equal(e, data) {
			hint = false // stale or wrong hint: fall back to a scan
		}
	}
	if !hint {
		i, ok, err := r.Find(ctx, data, cp.Size)
		if err != nil {
			return 0, nil, err
		}
		if !ok {
			return 0, nil, errf(codes.NotFound, "not in the log (checkpoint size %d)", cp.Size)
		}
		index = i
	}
	p, err := pv.Inclusion(ctx, index)
	if err != nil {
		return 0, nil, err
	}
	if err := VerifyInclusion(data, index, cp, p); err != nil {
		return 0, nil, err
	}
	return index, p, nil
}

func errf(c codes.Code, format string, args ...any) error {
	return status.Error(c, fmt.Sprintf(format, args...))
}
