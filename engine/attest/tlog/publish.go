package tlog

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"sync"

	"github.com/transparency-dev/tessera/api/layout"
	"golang.org/x/mod/sumdb/note"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Publisher copies a log's tiles, entry bundles and signed checkpoint from its
// directory to object storage, where ObjectSource reads them (C2SP tlog-tiles is made
// to be served as static files). Each Publish uploads what a reader of the local
// checkpoint's tree needs beyond the tree published before, then the checkpoint last,
// so a reader never sees a checkpoint whose tiles are missing; only then does it
// delete the partial tiles the new ones supersede (a reader still on the previous
// checkpoint finds a wider version, see Reader). The published checkpoint never goes
// backwards and is always one the log itself signed.
type Publisher struct {
	local  *Reader
	o      Objects
	prefix string

	mu        sync.Mutex
	published *Checkpoint // nil: nothing published yet
}

// NewPublisher publishes the log in dir (checkpoints signed by v) under prefix of o. A
// log published there already must be this one and not longer than the local one
// (FAILED_PRECONDITION otherwise: another log, or a data dir that lost entries).
func NewPublisher(ctx context.Context, dir string, v note.Verifier, o Objects, prefix string) (*Publisher, error) {
	p := &Publisher{local: NewReader(dir, v), o: o, prefix: prefix}
	raw, err := o.GetObject(ctx, prefix+layout.CheckpointPath, maxLogObject)
	if status.Code(err) == codes.NotFound {
		return p, nil
	}
	if err != nil {
		return nil, err
	}
	cp, err := ParseCheckpoint(raw, v)
	if err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "the log published at %s%s is not this log (%s): %s", o, prefix, v.Name(), status.Convert(err).Message())
	}
	root, err := p.local.RootAt(ctx, cp.Size)
	if err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "the log published at %s%s has %d entries, which the log in %s does not hold: %s", o, prefix, cp.Size, dir, status.Convert(err).Message())
	}
	if !bytes.Equal(root, cp.Root) {
		return nil, status.Errorf(codes.DataLoss, "the log published at %s%s (size %d) is not a prefix of the log in %s", o, prefix, cp.Size, dir)
	}
	p.published = cp
	return p, nil
}

// Published returns the checkpoint published last (nil if none).
func (p *Publisher) Published() *Checkpoint {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.published
}

// Publish publishes the local log's latest checkpoint and what it covers, unless it is
// published already, and returns the checkpoint published now.
func (p *Publisher) Publish(ctx context.Context) (*Checkpoint, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	cp, err := p.local.Checkpoint(ctx)
	if status.Code(err) == codes.NotFound {
		return p.published, nil
	}
	if err != nil {
		return nil, err
	}
	var from uint64
	if p.published != nil {
		from = p.published.Size
	}
	if cp.Size <= from {
		return p.published, nil
	}
	var stale []string
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	put := func(path string, read func() ([]byte, error)) {
		g.Go(func() error {
			b, err := read()
			if err != nil {
				return status.Errorf(codes.DataLoss, "publish %s: %v", path, err)
			}
			return p.o.PutObject(gctx, p.prefix+path, b)
		})
	}
	// Entry bundles: from the one the published tree ends in.
	for bi := from / layout.EntryBundleWidth; bi*layout.EntryBundleWidth < cp.Size; bi++ {
		w := layout.PartialTileSize(0, bi, cp.Size)
		put(layout.EntriesPath(bi, w), func() ([]byte, error) {
			b, err := p.local.readBundle(gctx, bi, w)
			if err != nil || w == 0 {
				return b, err
			}
			return firstEntries(b, int(w))
		})
		if ow := layout.PartialTileSize(0, bi, from); ow != 0 && bi*layout.EntryBundleWidth < from {
			stale = append(stale, layout.EntriesPath(bi, ow))
		}
	}
	// Hash tiles, level by level: those whose width changed.
	for level := uint64(0); cp.Size>>(layout.TileHeight*level) > 0; level++ {
		n, on := cp.Size>>(layout.TileHeight*level), from>>(layout.TileHeight*level)
		for ti := on / layout.TileWidth; ti*layout.TileWidth < n; ti++ {
			w, ow := layout.PartialTileSize(level, ti, cp.Size), layout.PartialTileSize(level, ti, from)
			existed := ti*layout.TileWidth < on
			if existed && w == ow {
				continue
			}
			put(layout.TilePath(level, ti, w), func() ([]byte, error) { return p.local.prefixTile(gctx, level, ti, w) })
			if existed && ow != 0 {
				stale = append(stale, layout.TilePath(level, ti, ow))
			}
		}
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	if err := p.o.PutObject(ctx, p.prefix+layout.CheckpointPath, cp.Raw); err != nil {
		return nil, err
	}
	p.published = cp
	for _, s := range stale {
		p.o.DeleteObject(ctx, p.prefix+s) // a left-over partial only costs its bytes
	}
	return cp, nil
}

// firstEntries cuts an entry bundle (each entry a 2-byte big-endian length, then the
// entry) after its first n entries.
func firstEntries(b []byte, n int) ([]byte, error) {
	off := 0
	for i := 0; i < n; i++ {
		if off+2 > len(b) {
			return nil, fmt.Errorf("entry bundle holds %d entries, want %d", i, n)
		}
		off += 2 + int(binary.BigEndian.Uint16(b[off:]))
		if off > len(b) {
			return nil, fmt.Errorf("entry bundle is truncated in entry %d", i)
		}
	}
	return b[:off], nil
}
