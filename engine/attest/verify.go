package attest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/in-toto/in-toto-golang/in_toto"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/engine/attest/tlog"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	"golang.org/x/mod/sumdb/note"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Subject is the artifact whose history is verified or described: a name (the file path
// given, or the digest) and its SHA-256.
type Subject struct {
	Name   string
	SHA256 string
}

// ParseSubject reads arg as a file (hashing it) or, if no such file exists, as a digest:
// "sha256:<hex>", "<hex>" or "<hex>/<size>".
func ParseSubject(arg string) (Subject, error) {
	f, err := os.Open(arg)
	if err == nil {
		defer f.Close()
		if fi, err := f.Stat(); err == nil && fi.IsDir() {
			return Subject{}, status.Errorf(codes.InvalidArgument, "subject %s is a directory; name a file or a digest", arg)
		}
		h := sha256.New()
		if _, err := io.Copy(h, f); err != nil {
			return Subject{}, status.Errorf(codes.InvalidArgument, "subject %s: %v", arg, err)
		}
		return Subject{Name: arg, SHA256: hex.EncodeToString(h.Sum(nil))}, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return Subject{}, status.Errorf(codes.InvalidArgument, "subject %s: %v", arg, err)
	}
	return ParseDigestSubject(arg)
}

// ParseDigestSubject reads arg as a digest only ("sha256:<hex>", "<hex>" or
// "<hex>/<size>"), never as a file: for subjects named by a remote client.
func ParseDigestSubject(arg string) (Subject, error) {
	s := strings.TrimPrefix(arg, "sha256:")
	if i := strings.IndexByte(s, '/'); i >= 0 {
		s = s[:i]
	}
	if _, err := cache.NewDigest(s, 0); err != nil {
		return Subject{}, status.Errorf(codes.InvalidArgument, "subject %q is neither a file nor a sha256 digest", arg)
	}
	return Subject{Name: "sha256:" + s, SHA256: s}, nil
}

// VerifiedLink is a link whose signature, key validity and log inclusion checked out.
type VerifiedLink struct {
	Envelope cache.Digest
	KeyID    string
	Link     in_toto.Link
	LogIndex uint64
	// Raw is the envelope as stored.
	Raw []byte
}

// Failure is one reason verification failed, naming the link it concerns.
type Failure struct {
	// Link names the link: its action digest hash, or the envelope digest when the link
	// could not be read; empty for failures of the subject or the log as a whole.
	Link   string
	Reason string
}

func (f Failure) String() string {
	if f.Link == "" {
		return f.Reason
	}
	return "link " + f.Link + ": " + f.Reason
}

// VerifierOptions configures NewVerifier.
type VerifierOptions struct {
	// Trust holds the executor keys whose links are accepted (required).
	Trust keys.Trust
	// LogVerifier checks the log's checkpoints (required).
	LogVerifier note.Verifier
	// Pinned, if set, is a checkpoint trusted earlier: the log's latest checkpoint must
	// be consistent with it (the log was only appended to since).
	Pinned *tlog.Checkpoint
	// WaitCheckpoint is how long to wait, in all, for links that are still on their
	// way into the log (pending in a running kiln, or logged but not yet covered by a
	// checkpoint; checkpoints follow appends within about 200ms).
	WaitCheckpoint time.Duration
	// Cache, if set, keeps what link envelopes' signatures established across
	// verifiers (keyed by envelope digest and the trust set); inclusion in the log is
	// proved again by each verifier.
	Cache *VerifyCache
}

// Verifier checks links against trusted keys and the transparency log. It is safe for
// concurrent use.
type Verifier struct {
	store *Store
	log   *tlog.Reader
	opts  VerifierOptions
	// trustID is opts.Trust's fingerprint, the cache's key with an envelope digest.
	trustID [32]byte

	mu   sync.Mutex // guards cp, pv, done and hints
	cp   *tlog.Checkpoint
	pv   *tlog.Prover
	done map[cache.Digest]LinkCheck
	// hints are log indexes of envelopes from signed provenance (HintLogIndexes).
	hints map[cache.Digest]uint64
	// deadline ends all waiting for links still on their way into the log.
	deadline time.Time
}

// NewVerifier reads the log's latest checkpoint (and, with a pinned checkpoint, proves
// the log consistent with it); an error here means the log itself does not verify.
func NewVerifier(ctx context.Context, store *Store, opts VerifierOptions) (*Verifier, error) {
	if len(opts.Trust.Keys) == 0 {
		return nil, status.Error(codes.InvalidArgument, "verify: no trusted executor keys")
	}
	if opts.LogVerifier == nil {
		return nil, status.Error(codes.InvalidArgument, "verify: no log key")
	}
	v := &Verifier{store: store, log: store.LogReader(opts.LogVerifier), opts: opts, done: map[cache.Digest]LinkCheck{}, deadline: time.Now().Add(opts.WaitCheckpoint)}
	if opts.Cache != nil {
		v.trustID = opts.Trust.Fingerprint()
	}
	v.settle(ctx)
	if err := v.loadCheckpoint(ctx); err != nil {
		return nil, err
	}
	return v, nil
}

// settle waits (until the deadline) for the links that running kiln processes have
// signed but not yet logged and indexed when verification starts, so that verifying
// right after a build sees all of it. Links signed later are not waited for.
func (v *Verifier) settle(ctx context.Context) {
	files := v.store.PendingFiles()
	for len(files) > 0 && time.Now().Before(v.deadline) {
		select {
		case <-ctx.Done():
			return
		case <-time.After(20 * time.Millisecond):
		}
		kept := files[:0]
		for _, f := range files {
			if _, err := os.Stat(f); err == nil {
				kept = append(kept, f)
			}
		}
		files = kept
	}
}

func (v *Verifier) loadCheckpoint(ctx context.Context) error {
	cp, err := v.log.Checkpoint(ctx)
	if err != nil {
		return grpcerr.Wrap(err, "log")
	}
	pv, err := v.log.Prover(ctx, cp.Size)
	if err != nil {
		return err
	}
	// A log kept elsewhere (a cluster's, in shared storage): index what it holds that
	// this data dir has not seen, so links are found.
	if err := v.store.IndexLog(ctx, v.log, cp.Size); err != nil {
		return err
	}
	if p := v.opts.Pinned; p != nil {
		if p.Size > cp.Size {
			return status.Errorf(codes.DataLoss, "log: latest checkpoint (size %d) is older than the pinned one (size %d): the log was rolled back", cp.Size, p.Size)
		}
		proof, err := pv.Consistency(ctx, p.Size, cp.Size)
		if err != nil {
			return status.Errorf(codes.DataLoss, "log: %v", status.Convert(err).Message())
		}
		if err := tlog.VerifyConsistency(p.Size, p.Root, cp.Size, cp.Root, proof); err != nil {
			return status.Errorf(codes.DataLoss, "log: not consistent with the pinned checkpoint: %v", status.Convert(err).Message())
		}
	}
	v.mu.Lock()
	v.cp, v.pv = cp, pv
	v.mu.Unlock()
	return nil
}

// Checkpoint returns the checkpoint the verifier proves inclusion against.
func (v *Verifier) Checkpoint() *tlog.Checkpoint {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.cp
}

// LinkCheck is what verifying one link established, step by step: which trusted key
// signed it, whether it is in the log and where, and whether the key was valid at that
// log index. Callers that report each fact (kiln gate) read the fields; Err is the first
// failure, nil when Link is set.
type LinkCheck struct {
	Envelope cache.Digest
	// Claims is the action the payload names, read before any check (for messages).
	Claims string
	// Key is the trusted key whose signature verified; nil if none did.
	Key *keys.PublicKey
	// Logged says the envelope's entry is in the log under the verifier's checkpoint,
	// at LogIndex (its inclusion proof verified).
	Logged   bool
	LogIndex uint64
	// KeyValid says Key was not retired before LogIndex (checked only when Logged).
	KeyValid bool
	// Link is the verified link when every check passed.
	Link *VerifiedLink
	Err  error
}

// Check verifies the link in envelope env like Link, recording each fact it establishes.
func (v *Verifier) Check(ctx context.Context, env cache.Digest) LinkCheck {
	v.mu.Lock()
	r, ok := v.done[env]
	v.mu.Unlock()
	if ok {
		return r
	}
	var c LinkCheck
	if s, ok := v.cached(env); ok {
		// The envelope with this digest verified before under this trust set: its
		// bytes need not be read and checked again.
		c = v.checkLogged(ctx, s)
	} else if raw, err := v.store.Envelope(ctx, env); err != nil {
		c = LinkCheck{Envelope: env, Err: err}
	} else {
		c = v.checkNew(ctx, cache.DigestOf(raw), raw)
	}
	v.mu.Lock()
	v.done[env] = c
	v.mu.Unlock()
	return c
}

// CheckAll verifies the links in envs with up to workers goroutines (signature checks
// dominate; they parallelize), so that Check and Link answer them from memory after.
func (v *Verifier) CheckAll(ctx context.Context, envs []cache.Digest, workers int) {
	next := make(chan cache.Digest)
	var wg sync.WaitGroup
	for range max(workers, 1) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for e := range next {
				v.Check(ctx, e)
			}
		}()
	}
	for _, e := range envs {
		next <- e
	}
	close(next)
	wg.Wait()
}

// Link verifies the link in envelope env: a signature by a trusted key, a well-formed
// link payload, inclusion in the log, and (for a retired key) a log index before the
// key's retirement.
func (v *Verifier) Link(ctx context.Context, env cache.Digest) (*VerifiedLink, error) {
	c := v.Check(ctx, env)
	return c.Link, c.Err
}

// LinkBytes verifies a link envelope given as bytes (see Link).
func (v *Verifier) LinkBytes(ctx context.Context, raw []byte) (*VerifiedLink, error) {
	c := v.CheckBytes(ctx, raw)
	return c.Link, c.Err
}

// CheckBytes verifies a link envelope given as bytes (see Check).
func (v *Verifier) CheckBytes(ctx context.Context, raw []byte) LinkCheck {
	d := cache.DigestOf(raw)
	if s, ok := v.cached(d); ok {
		return v.checkLogged(ctx, s)
	}
	return v.checkNew(ctx, d, raw)
}

// cached returns the signature facts of envelope d if the verifier's cache keeps them
// for its trust set.
func (v *Verifier) cached(d cache.Digest) (*signedLink, bool) {
	if v.opts.Cache == nil {
		return nil, false
	}
	s, ok := v.opts.Cache.Get(v.trustID, cacheLink, d)
	if !ok {
		return nil, false
	}
	return s.(*signedLink), true
}

// checkNew verifies envelope raw (whose digest is d) in full, and keeps its signature
// facts in the cache when they hold.
func (v *Verifier) checkNew(ctx context.Context, d cache.Digest, raw []byte) LinkCheck {
	s, c := v.checkSignature(ctx, d, raw)
	if s == nil {
		return c
	}
	v.opts.Cache.Put(v.trustID, cacheLink, d, s, linkCost(raw))
	return v.checkLogged(ctx, s)
}

// cacheLink is the VerifyCache kind of link envelopes.
const cacheLink = "link"

// checkSignature establishes what the envelope's bytes prove on their own: a signature
// by a trusted key over a well-formed link payload. On failure it returns nil and the
// failed check.
func (v *Verifier) checkSignature(ctx context.Context, d cache.Digest, raw []byte) (*signedLink, LinkCheck) {
	c := LinkCheck{Envelope: d}
	e, err := ParseEnvelope(raw)
	if err != nil {
		c.Err = err
		return nil, c
	}
	key, payload, err := VerifyEnvelope(ctx, e, v.opts.Trust)
	if err != nil {
		// Name the action the envelope claims to attest, so the failure says which
		// link (read from the unverified payload only for this message).
		if unverified, derr := base64.StdEncoding.DecodeString(e.Payload); derr == nil {
			if claimed, cerr := DecodeLink(unverified); cerr == nil {
				c.Claims = claimed.Name
			}
		}
		c.Err = claimsErr(c.Claims, err)
		return nil, c
	}
	l, err := DecodeLink(payload)
	if err != nil {
		c.Key, c.Err = &key, err
		return nil, c
	}
	c.Claims = l.Name
	return &signedLink{env: d, claims: c.Claims, key: key, link: l, raw: raw}, c
}

// checkLogged completes a link's check from its signature facts: its inclusion in the
// log under the verifier's checkpoint, and (for a retired key) a log index before the
// key's retirement. This is never cached: the log moves on, and so may the checkpoint.
func (v *Verifier) checkLogged(ctx context.Context, s *signedLink) LinkCheck {
	key := s.key
	c := LinkCheck{Envelope: s.env, Claims: s.claims, Key: &key}
	idx, err := v.include(ctx, s.env)
	if err != nil {
		c.Err = claimsErr(c.Claims, err)
		return c
	}
	c.Logged, c.LogIndex = true, idx
	if key.NotAfterLogSize != nil && idx >= *key.NotAfterLogSize {
		c.Err = claimsErr(c.Claims, status.Errorf(codes.PermissionDenied, "signed by key %s, retired at log size %d, but logged at index %d", short(key.KeyID), *key.NotAfterLogSize, idx))
		return c
	}
	c.KeyValid = true
	c.Link = &VerifiedLink{Envelope: s.env, KeyID: key.KeyID, Link: s.link, LogIndex: idx, Raw: s.raw}
	return c
}

// claimsErr names the action a link claims (when known) in its failure.
func claimsErr(claims string, err error) error {
	if claims != "" {
		return grpcerr.Wrap(err, "claims action %s", claims)
	}
	return err
}

// HintLogIndexes records where envelopes' log entries are said to be (a provenance's
// LogIndexes), so that finding them reads no index file of the store. A hint is only
// where to look: the entry there must be the envelope's, and its inclusion is proved
// under the checkpoint like any other; a wrong hint falls back to the store's record.
func (v *Verifier) HintLogIndexes(hints map[cache.Digest]uint64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.hints == nil {
		v.hints = make(map[cache.Digest]uint64, len(hints))
	}
	maps.Copy(v.hints, hints)
}

// logHint returns where envelope d's log entry (entry) should be: at its hinted index
// if the entry there is it, else where the store recorded it, if it did.
func (v *Verifier) logHint(ctx context.Context, d cache.Digest, entry []byte, cp *tlog.Checkpoint, pv *tlog.Prover) (uint64, bool) {
	v.mu.Lock()
	i, ok := v.hints[d]
	v.mu.Unlock()
	if ok && i < cp.Size && pv != nil {
		if e, err := pv.Entry(ctx, i); err == nil && bytes.Equal(e, entry) {
			return i, true
		}
	}
	return v.store.LogIndex(d)
}

// include proves the inclusion of envelope d's log entry. A link that is still
// pending in some process (signed, not yet appended) or logged beyond the current
// checkpoint is waited for, until the verifier's deadline (WaitCheckpoint after it was
// created, shared by all links so failures stay fast).
func (v *Verifier) include(ctx context.Context, d cache.Digest) (uint64, error) {
	entry := LinkLogEntry(d)
	for {
		v.mu.Lock()
		cp, pv := v.cp, v.pv
		v.mu.Unlock()
		hint, hasHint := v.logHint(ctx, d, entry, cp, pv)
		idx, _, err := v.log.Include(ctx, entry, hint, hasHint, cp, pv)
		if err == nil {
			return idx, nil
		}
		inFlight := (hasHint && hint >= cp.Size) || (!hasHint && v.store.pendingAnywhere(ctx, d))
		if !inFlight || time.Now().After(v.deadline) {
			if status.Code(err) == codes.NotFound {
				return 0, status.Errorf(codes.NotFound, "not in the transparency log (checkpoint size %d)", cp.Size)
			}
			return 0, grpcerr.Wrap(err, "transparency log")
		}
		select {
		case <-ctx.Done():
			return 0, status.FromContextError(ctx.Err()).Err()
		case <-time.After(50 * time.Millisecond):
		}
		if err := v.loadCheckpoint(ctx); err != nil {
			return 0, err
		}
	}
}

// Artifact is one source or dependency found in a chain: a path and its hash.
type Artifact struct {
	Path string
	Alg  string // AlgSHA256 or AlgSymlink
	Hash string
}

// Chain is the verified history of a subject: the links that produced it and,
// transitively, its materials; the sources (materials no link produced) and the
// toolchains the links ran in.
type Chain struct {
	Subject Subject
	// Top are the links that produced the subject, sorted by action.
	Top []*VerifiedLink
	// Links are all links of the chain (Top included), sorted by action then envelope.
	Links []*VerifiedLink
	// Sources are materials that no link produced, sorted by path.
	Sources []Artifact
	// Toolchains are the toolchain manifests' SHA-256s, sorted.
	Toolchains []string
	// Failures lists every problem found; the chain is verified only if it is empty.
	Failures []Failure
}

// OK reports whether the chain verified without failures.
func (c *Chain) OK() bool { return len(c.Failures) == 0 && len(c.Top) > 0 }

func (c *Chain) fail(link, format string, args ...any) {
	c.Failures = append(c.Failures, Failure{Link: link, Reason: fmt.Sprintf(format, args...)})
}

// producedBy returns the verified links recorded as producing (alg, hash), preferring
// those that produced it at path. Index entries whose link does not verify, or does not
// list the product, are reported through bad.
func (v *Verifier) producedBy(ctx context.Context, alg, hash, path string, bad func(who, why string)) ([]*VerifiedLink, error) {
	envs, err := v.store.Producers(alg, hash)
	if err != nil {
		return nil, err
	}
	var same, other []*VerifiedLink
	for _, e := range envs {
		l, err := v.Link(ctx, e)
		if err != nil {
			bad(e.String(), status.Convert(err).Message())
			continue
		}
		found, samePath := false, false
		for p, h := range l.Link.Products {
			if h[alg] == hash {
				found = true
				samePath = samePath || p == path
			}
		}
		switch {
		case !found:
			bad(l.Link.Name, fmt.Sprintf("the product index says it produced %s:%s, but its signed products do not include it", alg, hash))
		case samePath:
			same = append(same, l)
		default:
			other = append(other, l)
		}
	}
	return append(same, other...), nil
}

// Chain walks from the links that produced the subject back through their materials to
// sources and toolchains, verifying every link on the way. Problems are collected in
// Chain.Failures; the error is for failures to read the store at all.
func (v *Verifier) Chain(ctx context.Context, subj Subject) (*Chain, error) {
	ch := &Chain{Subject: subj}
	// Index entries whose link does not verify matter only if no verified link
	// explains the subject: another executor's link (signed by a key not trusted
	// here) for the same artifact is not an error.
	var claims []Failure
	top, err := v.producedBy(ctx, AlgSHA256, subj.SHA256, subj.Name, func(who, why string) {
		claims = append(claims, Failure{Link: who, Reason: why})
	})
	if err != nil {
		return nil, err
	}
	if len(top) == 0 {
		ch.Failures = append(ch.Failures, claims...)
		ch.fail("", "subject %s (sha256 %s): no verified link produced it", subj.Name, subj.SHA256)
		return ch, nil
	}
	ch.Top = top
	seen := map[cache.Digest]bool{}
	queue := append([]*VerifiedLink(nil), top...)
	for _, l := range top {
		seen[l.Envelope] = true
	}
	sources := map[Artifact]bool{}
	toolchains := map[string]bool{}
	for len(queue) > 0 {
		l := queue[0]
		queue = queue[1:]
		ch.Links = append(ch.Links, l)
		for _, path := range sortedKeys(l.Link.Materials) {
			h := l.Link.Materials[path]
			switch path {
			case MaterialAction, MaterialCommand:
				continue
			case MaterialToolchain:
				toolchains[h[AlgSHA256]] = true
				continue
			}
			alg, hash := artifactOf(h)
			if alg == "" {
				ch.fail(l.Link.Name, "material %s has no sha256 or symlink hash", path)
				continue
			}
			var claims []string
			prods, err := v.producedBy(ctx, alg, hash, path, func(who, why string) {
				claims = append(claims, who+" ("+why+")")
			})
			if err != nil {
				return nil, err
			}
			var producer *VerifiedLink
			for _, p := range prods {
				if p.Envelope != l.Envelope {
					producer = p
					break
				}
			}
			switch {
			case producer != nil:
				if !seen[producer.Envelope] {
					seen[producer.Envelope] = true
					queue = append(queue, producer)
				}
			case len(claims) > 0:
				ch.fail(l.Link.Name, "material %s (%s %s) is claimed by links that do not verify: %s", path, alg, hash, strings.Join(claims, "; "))
			default:
				sources[Artifact{Path: path, Alg: alg, Hash: hash}] = true
			}
		}
	}
	for a := range sources {
		ch.Sources = append(ch.Sources, a)
	}
	sortArtifacts(ch.Sources)
	for t := range toolchains {
		ch.Toolchains = append(ch.Toolchains, t)
	}
	sort.Strings(ch.Toolchains)
	sortLinks(ch.Top)
	sortLinks(ch.Links)
	return ch, nil
}

// artifactOf returns the hash a material is matched by: its content sha256, or for a
// symlink its target hash.
func artifactOf(h in_toto.HashObj) (string, string) {
	if x := h[AlgSHA256]; x != "" {
		return AlgSHA256, x
	}
	if x := h[AlgSymlink]; x != "" {
		return AlgSymlink, x
	}
	return "", ""
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

func sortArtifacts(as []Artifact) {
	sort.Slice(as, func(i, j int) bool {
		if as[i].Path != as[j].Path {
			return as[i].Path < as[j].Path
		}
		if as[i].Alg != as[j].Alg {
			return as[i].Alg < as[j].Alg
		}
		return as[i].Hash < as[j].Hash
	})
}

func sortLinks(ls []*VerifiedLink) {
	sort.Slice(ls, func(i, j int) bool {
		if ls[i].Link.Name != ls[j].Link.Name {
			return ls[i].Link.Name < ls[j].Link.Name
		}
		return ls[i].Envelope.Hash < ls[j].Envelope.Hash
	})
}
