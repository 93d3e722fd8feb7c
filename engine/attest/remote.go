package attest

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest/tlog"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	"golang.org/x/mod/sumdb/note"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// RemoteLog is a transparency log kept elsewhere than this data dir: a cluster's, which
// its sequencer publishes to shared storage (tlog.Publisher) for verifiers anywhere.
type RemoteLog struct {
	Source tlog.Source
	// Pending reports whether envelope d is still waiting to be appended there (a
	// verifier then waits for it); nil: never known.
	Pending func(ctx context.Context, d cache.Digest) bool
}

// WithLog returns the store reading its transparency log from r instead of the data
// dir's own log; its indexes stay the data dir's, and IndexLog fills them from r.
func (s *Store) WithLog(r *RemoteLog) *Store {
	c := *s
	c.remote = r
	return &c
}

// LogSource is where the store's transparency log is read.
func (s *Store) LogSource() tlog.Source {
	if s.remote != nil {
		return s.remote.Source
	}
	return tlog.DirSource(s.p.Log)
}

// LogReader reads the store's transparency log, trusting checkpoints signed by v.
func (s *Store) LogReader(v note.Verifier) *tlog.Reader { return tlog.NewReaderFrom(s.LogSource(), v) }

// Remote reports whether the store's log is kept elsewhere (WithLog).
func (s *Store) Remote() bool { return s.remote != nil }

// pendingAnywhere reports whether envelope d waits to be logged: in a process of this
// data dir, or in the remote log's queue.
func (s *Store) pendingAnywhere(ctx context.Context, d cache.Digest) bool {
	if s.Pending(d) {
		return true
	}
	return s.remote != nil && s.remote.Pending != nil && s.remote.Pending(ctx, d)
}

// indexFetchers bounds the envelopes IndexLog reads at once.
const indexFetchers = 32

// IndexLog indexes the links among the first size entries of the remote log r reads
// that this data dir has not indexed yet: by action, by product and by log index, as
// the signer indexes its own (reading each envelope from the store's CAS, which with
// shared storage is the bucket, and keeping a durable copy), so that verification and
// the web UI find them. It remembers how far it got, per log. The indexes are hints:
// verification checks every link it finds through them. For the data dir's own log it
// does nothing: its signer indexes every link it appends.
func (s *Store) IndexLog(ctx context.Context, r *tlog.Reader, size uint64) error {
	if s.remote == nil {
		return nil
	}
	s.indexMu.Lock()
	defer s.indexMu.Unlock()
	h := sha256.Sum256([]byte(r.Verifier().Name()))
	mark := filepath.Join(s.p.Attest, "logidx", "indexed-"+hex.EncodeToString(h[:8]))
	var from uint64
	if b, err := os.ReadFile(mark); err == nil {
		from, _ = strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	}
	for from < size {
		end := min(size, from+4096)
		type link struct {
			index uint64
			env   cache.Digest
		}
		var links []link
		err := r.ScanFrom(ctx, from, end, func(i uint64, e []byte) bool {
			if d, ok := ParseLinkLogEntry(e); ok {
				links = append(links, link{i, d})
			}
			return true
		})
		if err != nil {
			return grpcerr.Wrap(err, "index the log")
		}
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(indexFetchers)
		for _, l := range links {
			g.Go(func() error { return s.indexRemote(gctx, l.env, l.index) })
		}
		if err := g.Wait(); err != nil {
			return grpcerr.Wrap(err, "index the log")
		}
		if err := writeAtomic(mark, []byte(strconv.FormatUint(end, 10)+"\n")); err != nil {
			return err
		}
		from = end
	}
	return nil
}

// indexRemote indexes one link of a remote log. An envelope that cannot be found or
// decoded is skipped (a link that cannot be read cannot verify either); an unreachable
// store is an error, so the entry is indexed on the next try.
func (s *Store) indexRemote(ctx context.Context, d cache.Digest, index uint64) error {
	if idx, ok := s.LogIndex(d); ok && idx == index && s.HasEnvelope(d) {
		return nil
	}
	raw, err := s.Envelope(ctx, d)
	switch status.Code(err) {
	case codes.OK:
	case codes.NotFound, codes.DataLoss:
		return nil
	default:
		return err
	}
	payload, err := EnvelopePayload(raw)
	if err != nil {
		return nil
	}
	l, err := DecodeLink(payload)
	if err != nil {
		return nil
	}
	if !s.HasEnvelope(d) {
		if err := writeAtomic(s.envelopePath(d.Hash), raw); err != nil {
			return err
		}
	}
	if err := s.AddAction(l.Name, d); err != nil {
		return err
	}
	for _, h := range l.Products {
		if alg, hash := artifactOf(h); alg != "" {
			if err := s.AddProduct(alg, hash, d); err != nil {
				return err
			}
		}
	}
	return s.SetLogIndex(d, index)
}
