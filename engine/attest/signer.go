package attest

import (
	"context"
	"log/slog"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/engine/attest/tlog"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Options configures Open.
type Options struct {
	// DataDir is the data directory; PathsFor(DataDir) names everything inside it.
	DataDir string
	// CAS is the blob store envelopes are written to, so REAPI clients can fetch them
	// by the digest in the ActionResult (required).
	CAS cache.BlobStore
	// ExecutorKeyFile optionally names the operator's ed25519 private key (PKCS #8 PEM).
	ExecutorKeyFile string
	// Log tunes the transparency-log appender.
	Log tlog.Options
	// Now is the clock for key validity; nil means time.Now.
	Now func() time.Time
	// Logger receives attestation events; nil discards them.
	Logger *slog.Logger
}

// Signer writes the attestation of executed actions. It is safe for concurrent use, and
// other processes may attest into the same data directory at the same time.
type Signer struct {
	store *Store
	keys  *keys.Keyring
	log   *tlog.Log
	lg    *slog.Logger
}

// Linked is what Link produced for one action.
type Linked struct {
	// Envelope is the DSSE envelope (JSON) of the action's in-toto link.
	Envelope []byte
	// Digest is the envelope's digest: in the CAS, in the log, in the ActionResult.
	Digest cache.Digest
	// KeyID is the executor key that signed it.
	KeyID string
	// LogIndex is the envelope's entry in the transparency log.
	LogIndex uint64
}

// Open opens (creating on first use) the keyring, the log and the attestation store of
// opts.DataDir.
func Open(ctx context.Context, opts Options) (*Signer, error) {
	if opts.CAS == nil {
		return nil, status.Error(codes.InvalidArgument, "attest: a CAS is required")
	}
	p := PathsFor(opts.DataDir)
	lg := opts.Logger
	if lg == nil {
		lg = slog.New(slog.DiscardHandler)
	}
	s := &Signer{store: NewStore(p, opts.CAS), lg: lg}
	openLog := func(ctx context.Context) error {
		if s.log != nil {
			return nil
		}
		ls, err := keys.LoadLogSigner(p.Keys)
		if err != nil {
			return err
		}
		l, err := tlog.Open(ctx, p.Log, ls, opts.Log)
		if err != nil {
			return err
		}
		s.log = l
		return nil
	}
	kr, err := keys.Open(ctx, p.Keys, keys.Options{
		ExecutorKeyFile: opts.ExecutorKeyFile,
		Now:             opts.Now,
		// Retiring a key (adopting an operator key) records the log's size; the log
		// key exists by then, so the log can be opened from inside keys.Open.
		LogSize: func(ctx context.Context) (uint64, error) {
			if err := openLog(ctx); err != nil {
				return 0, err
			}
			return s.log.Size(ctx)
		},
	})
	if err == nil {
		err = openLog(ctx)
	}
	if err != nil {
		if s.log != nil {
			s.log.Close(ctx)
		}
		return nil, err
	}
	s.keys = kr
	return s, nil
}

// Keyring returns the signer's keyring.
func (s *Signer) Keyring() *keys.Keyring { return s.keys }

// Store returns the attestation store the signer writes to.
func (s *Signer) Store() *Store { return s.store }

// Close waits until a log checkpoint covers every link this signer appended (so a short
// CLI run leaves a provable log) and releases the log.
func (s *Signer) Close(ctx context.Context) error { return s.log.Close(ctx) }

// Link attests one executed action: it builds the in-toto link for a, signs it with the
// active executor key as a DSSE envelope, stores the envelope (CAS and durable copy),
// appends its digest to the transparency log (waiting until the entry is durably
// sequenced), and indexes it by action and by every product. Linking the same action
// again with the same key gives the same envelope and logs it only once.
func (s *Signer) Link(ctx context.Context, a Action) (Linked, error) {
	payload, err := a.Payload()
	if err != nil {
		return Linked{}, err
	}
	var out Linked
	// Under the shared keyring lock: a rotation waits for this link to be in the log,
	// so the retired key's log-size bound covers it.
	err = s.keys.SignLock(func() error {
		k, err := s.keys.Active()
		if err != nil {
			return err
		}
		env, err := SignEnvelope(ctx, k, payload)
		if err != nil {
			return err
		}
		d, err := s.store.PutEnvelope(ctx, env)
		if err != nil {
			return err
		}
		idx, ok := s.store.LogIndex(d)
		if !ok {
			if idx, err = s.log.Append(ctx, LinkLogEntry(d)); err != nil {
				return err
			}
			if err := s.store.SetLogIndex(d, idx); err != nil {
				return err
			}
		}
		out = Linked{Envelope: env, Digest: d, KeyID: k.ID(), LogIndex: idx}
		return nil
	})
	if err != nil {
		return Linked{}, status.Errorf(status.Code(err), "attest action %s: %v", a.ActionDigest, status.Convert(err).Message())
	}
	if err := s.index(a, out.Digest); err != nil {
		return Linked{}, err
	}
	s.lg.DebugContext(ctx, "attested action", "action", a.ActionDigest.String(), "envelope", out.Digest.String(), "log_index", out.LogIndex, "key", out.KeyID)
	return out, nil
}

func (s *Signer) index(a Action, env cache.Digest) error {
	if err := s.store.AddAction(a.ActionDigest.Hash, env); err != nil {
		return err
	}
	for _, f := range a.Outputs {
		alg, h := artifactHash(f)
		if err := s.store.AddProduct(alg, h, env); err != nil {
			return err
		}
	}
	return nil
}

// artifactHash returns the algorithm and hash a file is recorded under in a link.
func artifactHash(f File) (string, string) {
	if f.SymlinkTarget != "" {
		return AlgSymlink, symlinkHash(f.SymlinkTarget)
	}
	return AlgSHA256, f.Digest.Hash
}
