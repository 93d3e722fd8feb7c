package history

import (
	"context"
	"encoding/json"
	"sort"
	"time"

	"github.com/in-toto/in-toto-golang/in_toto"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/tlog"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Links is where the follower reads the log and the envelopes its entries name.
type Links struct {
	Log       *tlog.Reader
	Envelopes interface {
		Envelope(ctx context.Context, d cache.Digest) ([]byte, error)
	}
}

// followBatch is how many log entries one transaction indexes.
const followBatch = 1024

// CatchUp indexes every link the log's latest checkpoint covers beyond what the index
// holds, and returns how many entries it read. Links are indexed as their payload says,
// unverified: pages verify what they show.
func (x *Index) CatchUp(ctx context.Context, src Links) (int, error) {
	x.follow.Lock()
	defer x.follow.Unlock()
	cp, err := src.Log.Checkpoint(ctx)
	if status.Code(err) == codes.NotFound {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	start := x.LogSize()
	if cp.Size < start {
		return 0, status.Errorf(codes.DataLoss, "history: the log's checkpoint (size %d) is behind the index (size %d): the log was rolled back or replaced; remove the history file to rebuild it", cp.Size, start)
	}
	read := 0
	for start < cp.Size {
		end := min(start+followBatch, cp.Size)
		var runs []Run
		err := src.Log.ScanFrom(ctx, start, end, func(idx uint64, data []byte) bool {
			d, ok := attest.ParseLinkLogEntry(data)
			if !ok {
				return true // not a link (another kind of entry)
			}
			raw, err := src.Envelopes.Envelope(ctx, d)
			if err != nil {
				x.log.Warn("history: a logged link's envelope cannot be read; not indexed", "index", idx, "envelope", d.String(), "err", err)
				return true
			}
			r, err := linkRun(raw, d, idx)
			if err != nil {
				x.log.Warn("history: a logged link does not decode; not indexed", "index", idx, "envelope", d.String(), "err", err)
				return true
			}
			runs = append(runs, r)
			return ctx.Err() == nil
		})
		if err == nil {
			err = ctx.Err()
		}
		if err != nil {
			return read, err
		}
		x.keepProducedMaterials(runs)
		if err := x.addFromLog(runs, end); err != nil {
			return read, status.Errorf(codes.Internal, "history: %v", err)
		}
		read += int(end - start)
		start = end
	}
	return read, nil
}

// Follow indexes new links every interval until ctx ends.
func (x *Index) Follow(ctx context.Context, src Links, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if _, err := x.CatchUp(ctx, src); err != nil && ctx.Err() == nil {
			x.log.Warn("history: following the log", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// keepProducedMaterials keeps, of each run's materials, those some run produced
// (indexed before, or earlier in this batch): what makes it a consumer of an artifact.
func (x *Index) keepProducedMaterials(runs []Run) {
	var shas []string
	for _, r := range runs {
		for _, m := range r.Materials {
			shas = append(shas, m.SHA256)
		}
	}
	known := x.knownProducts(shas)
	for i := range runs {
		kept := runs[i].Materials[:0]
		for _, m := range runs[i].Materials {
			if known[m.SHA256] {
				kept = append(kept, m)
			}
		}
		runs[i].Materials = kept
		for _, o := range runs[i].Outputs {
			if o.SHA256 != "" {
				known[o.SHA256] = true
			}
		}
	}
}

// linkRun reads a run from a link envelope (not verified).
func linkRun(raw []byte, env cache.Digest, idx uint64) (Run, error) {
	p, err := attest.EnvelopePayload(raw)
	if err != nil {
		return Run{}, err
	}
	l, err := attest.DecodeLink(p)
	if err != nil {
		return Run{}, err
	}
	return RunFromLink(l, env, idx), nil
}

// RunFromLink is what a link says about its execution.
func RunFromLink(l in_toto.Link, env cache.Digest, idx uint64) Run {
	r := Run{Time: time.Now().UTC(), Source: FromLog, Envelope: env, LogIndex: idx, Logged: true}
	by := l.ByProducts
	if s, ok := by[attest.ByproductActionDigest].(string); ok {
		r.Action, _ = cache.ParseDigest(s)
	}
	if r.Action.Hash == "" {
		r.Action.Hash = l.Name
	}
	switch v := by[attest.ByproductReturnValue].(type) {
	case json.Number:
		n, _ := v.Int64()
		r.ExitCode = int(n)
	case float64:
		r.ExitCode = int(v)
	}
	r.Outcome = OK
	if r.ExitCode != 0 {
		r.Outcome = Failed
	}
	for _, k := range []struct {
		key string
		d   *cache.Digest
	}{{attest.ByproductStdout, &r.Stdout}, {attest.ByproductStderr, &r.Stderr}} {
		if s, ok := by[k.key].(string); ok {
			*k.d, _ = cache.ParseDigest(s)
		}
	}
	r.Reproducibility, _ = by[attest.ByproductReproducibility].(string)
	n := 0
	for _, a := range l.Command {
		n += len(a)
		if n > maxArgvBytes {
			r.Argv = append(r.Argv, "…")
			break
		}
		r.Argv = append(r.Argv, a)
	}
	if h := l.Materials[attest.MaterialToolchain][attest.AlgSHA256]; h != "" {
		r.Toolchain = "sha256:" + h
	}
	for path, h := range l.Products {
		r.Outputs = append(r.Outputs, Output{Path: path, SHA256: h[attest.AlgSHA256]})
	}
	sortOutputs(r.Outputs)
	for path, h := range l.Materials {
		if path == attest.MaterialAction || path == attest.MaterialCommand || path == attest.MaterialToolchain {
			continue
		}
		if s := h[attest.AlgSHA256]; s != "" {
			r.Materials = append(r.Materials, Output{Path: path, SHA256: s})
		}
	}
	sortOutputs(r.Materials)
	return r
}

func sortOutputs(os []Output) {
	sort.Slice(os, func(i, j int) bool { return os[i].Path < os[j].Path })
}
