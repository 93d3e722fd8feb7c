package attest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/internal/dirplace"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Store reads and writes what attestation keeps in a data directory besides the keyring
// and the log: envelopes (in the CAS, plus a durable copy the CAS's eviction cannot
// remove) and the indexes product -> links, action -> links and link -> log index.
//
// The indexes are append-only text files, one per key, each line an envelope digest
// "HASH/SIZE". Lines are appended with one O_APPEND write(2) each, which Linux keeps
// whole against concurrent appenders, so any number of processes can add to them
// without a lock; readers skip a torn or duplicate line.
type Store struct {
	p   Paths
	cas cache.BlobStore
	// remote is the log the store reads, when it is not the data dir's (WithLog).
	remote  *RemoteLog
	indexMu *sync.Mutex // one IndexLog at a time
}

// NewStore opens the attestation store of a data directory; cas may be nil (envelopes
// are then read and written only in the durable copy).
func NewStore(p Paths, cas cache.BlobStore) *Store {
	return &Store{p: p, cas: cas, indexMu: &sync.Mutex{}}
}

// Paths returns the data-dir paths the store uses.
func (s *Store) Paths() Paths { return s.p }

func shard(dir, hash string) string { return filepath.Join(dir, hash[:2], hash) }

func (s *Store) envelopePath(h string) string {
	return shard(filepath.Join(s.p.Attest, "envelopes"), h)
}
func (s *Store) productPath(alg, h string) string {
	return shard(filepath.Join(s.p.Attest, "index", alg), h)
}
func (s *Store) actionPath(h string) string { return shard(filepath.Join(s.p.Attest, "actions"), h) }
func (s *Store) logIdxPath(h string) string { return shard(filepath.Join(s.p.Attest, "logidx"), h) }
func (s *Store) summaryPath(h string) string {
	return shard(filepath.Join(s.p.Attest, "summaries"), h)
}

// PutEnvelope stores env in the CAS and in the durable copy and returns its digest.
func (s *Store) PutEnvelope(ctx context.Context, env []byte) (cache.Digest, error) {
	d := cache.DigestOf(env)
	if s.cas != nil {
		if err := s.cas.Put(ctx, d, bytes.NewReader(env)); err != nil {
			return cache.Digest{}, grpcerr.Wrap(err, "store envelope in CAS")
		}
	}
	p := s.envelopePath(d.Hash)
	if fi, err := os.Stat(p); err == nil && fi.Size() == d.Size {
		return d, nil
	}
	if err := writeAtomic(p, env); err != nil {
		return cache.Digest{}, err
	}
	return d, nil
}

// Pending reports whether some kiln process has signed envelope d but not yet logged
// and indexed it (its pending file exists).
func (s *Store) Pending(d cache.Digest) bool {
	m, _ := filepath.Glob(filepath.Join(s.p.Attest, "pending", "*", d.Hash+"_"+strconv.FormatInt(d.Size, 10)))
	return len(m) > 0
}

// PendingFiles lists the pending files of every process (see Signer).
func (s *Store) PendingFiles() []string {
	m, _ := filepath.Glob(filepath.Join(s.p.Attest, "pending", "*", "*_*"))
	return m
}

// SignedSince calls fn with every envelope this data dir's signers wrote at or after
// since, logged or still pending, each once. The signing time is the file's
// modification time: a link's pending file is written when it is signed and renamed,
// keeping that time, into the durable store (an envelope imported later carries the
// import's time, so it is included rather than missed). Pending files are read before
// the durable store, so one renamed during the walk is not missed either.
func (s *Store) SignedSince(since time.Time, fn func(env []byte, signed time.Time) error) error {
	seen := map[string]bool{}
	visit := func(p string) error {
		fi, err := os.Stat(p)
		if err != nil || !fi.Mode().IsRegular() || fi.ModTime().Before(since) {
			return nil // gone meanwhile (renamed: seen in the store), or older
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil
		}
		d := cache.DigestOf(b)
		if seen[d.Hash] {
			return nil
		}
		seen[d.Hash] = true
		return fn(b, fi.ModTime())
	}
	for _, p := range s.PendingFiles() {
		if err := visit(p); err != nil {
			return err
		}
	}
	err := filepath.WalkDir(filepath.Join(s.p.Attest, "envelopes"), func(p string, d fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return status.Errorf(codes.Internal, "attest store: %v", err)
		}
		if d.IsDir() {
			return nil
		}
		return visit(p)
	})
	return err
}

// HasEnvelope reports whether the durable store holds envelope d.
func (s *Store) HasEnvelope(d cache.Digest) bool {
	fi, err := os.Stat(s.envelopePath(d.Hash))
	return err == nil && fi.Size() == d.Size
}

// MoveEnvelope renames file, which holds envelope d, into the durable store.
func (s *Store) MoveEnvelope(file string, d cache.Digest) error {
	p := s.envelopePath(d.Hash)
	if err := mkdirShard(filepath.Dir(p)); err != nil {
		return status.Errorf(codes.Internal, "attest store: %v", err)
	}
	if err := os.Rename(file, p); err != nil {
		if errors.Is(err, fs.ErrNotExist) && s.HasEnvelope(d) {
			return nil // moved already (the same link twice in one batch)
		}
		return status.Errorf(codes.Internal, "attest store: %v", err)
	}
	return nil
}

// Envelope returns the envelope with digest d, from the durable copy or else the CAS,
// checked against d.
func (s *Store) Envelope(ctx context.Context, d cache.Digest) ([]byte, error) {
	p := s.envelopePath(d.Hash)
	if b, ok := readSized(p, d); ok {
		return b, nil
	}
	b, err := os.ReadFile(p)
	if err == nil && cache.DigestOf(b) == d {
		return b, nil
	}
	if s.cas != nil {
		b, cerr := cache.ReadAll(ctx, s.cas, d, 64<<20)
		if cerr == nil {
			return b, nil
		}
		if status.Code(cerr) != codes.NotFound {
			return nil, cerr
		}
	}
	if err == nil {
		return nil, status.Errorf(codes.DataLoss, "envelope %s: stored copy does not match its digest", d)
	}
	return nil, status.Errorf(codes.NotFound, "envelope %s is in neither the attestation store nor the CAS", d)
}

// readSized reads the file at p expecting d: one read(2) of d.Size+1 bytes rather than
// os.ReadFile's stat and reads to EOF (a gate decision reads 1,000 envelopes). ok only
// if exactly d.Size bytes came back and they have digest d: they are the envelope,
// whatever else the file may hold (the caller then reads it in full for its error).
func readSized(p string, d cache.Digest) ([]byte, bool) {
	if d.Size < 0 || d.Size > 64<<20 {
		return nil, false
	}
	f, err := os.Open(p)
	if err != nil {
		return nil, false
	}
	defer f.Close()
	b := make([]byte, d.Size+1)
	n, _ := f.Read(b)
	return b[:n], int64(n) == d.Size && cache.DigestOf(b[:n]) == d
}

// AddProduct records that the link in envelope env produced an artifact with hash h
// (hex) under algorithm alg.
func (s *Store) AddProduct(alg, h string, env cache.Digest) error {
	return appendLine(s.productPath(alg, h), env.String())
}

// Producers returns the envelopes of links that produced an artifact with hash h under
// alg, sorted, without duplicates.
func (s *Store) Producers(alg, h string) ([]cache.Digest, error) {
	return readDigests(s.productPath(alg, h))
}

// AddAction records that envelope env is a link for the action with digest hash h.
func (s *Store) AddAction(h string, env cache.Digest) error {
	return appendLine(s.actionPath(h), env.String())
}

// ActionLinks returns the envelopes recorded for the action with digest hash h.
func (s *Store) ActionLinks(h string) ([]cache.Digest, error) { return readDigests(s.actionPath(h)) }

// AddSummary keeps a signed verification summary (a VSA envelope, as kiln rebuild
// signs it) of the artifact with SHA-256 subject, so it can be shown with the artifact.
func (s *Store) AddSummary(ctx context.Context, subject string, env []byte) (cache.Digest, error) {
	if _, err := cache.NewDigest(subject, 0); err != nil {
		return cache.Digest{}, status.Errorf(codes.InvalidArgument, "summary subject %q: want a sha256 hex digest", subject)
	}
	d, err := s.PutEnvelope(ctx, env)
	if err != nil {
		return cache.Digest{}, err
	}
	return d, appendLine(s.summaryPath(subject), d.String())
}

// Summaries returns the verification summaries kept for the artifact with SHA-256
// subject (envelope digests, read with Envelope).
func (s *Store) Summaries(subject string) ([]cache.Digest, error) {
	if _, err := cache.NewDigest(subject, 0); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "summary subject %q: want a sha256 hex digest", subject)
	}
	return readDigests(s.summaryPath(subject))
}

// SetLogIndex records where envelope env was appended to the log.
func (s *Store) SetLogIndex(env cache.Digest, index uint64) error {
	return writeAtomic(s.logIdxPath(env.Hash), []byte(strconv.FormatUint(index, 10)+"\n"))
}

// LogIndex returns the recorded log index of envelope env, if any. It is a hint:
// verification reads the entry there and proves its inclusion.
func (s *Store) LogIndex(env cache.Digest) (uint64, bool) {
	b, err := os.ReadFile(s.logIdxPath(env.Hash))
	if err != nil {
		return 0, false
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	return n, err == nil
}

func appendLine(path, line string) error {
	existing, err := readDigests(path)
	if err != nil {
		return err
	}
	for _, d := range existing {
		if d.String() == line {
			return nil
		}
	}
	if err := mkdirShard(filepath.Dir(path)); err != nil {
		return status.Errorf(codes.Internal, "attest index: %v", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return status.Errorf(codes.Internal, "attest index: %v", err)
	}
	// One write(2): appends by other processes cannot interleave inside it.
	_, werr := f.Write([]byte(line + "\n"))
	cerr := f.Close()
	if werr != nil || cerr != nil {
		return status.Errorf(codes.Internal, "attest index %s: %v", path, errors.Join(werr, cerr))
	}
	return nil
}

// mkdirShard creates dir (a shard, such as envelopes/ab) if it is missing, its parent
// first marked so that ext2/3/4 place the shards apart (package dirplace): each new
// file the store writes then shares its block group with a 256th of the store's
// files, and of the inodes freed there.
func mkdirShard(dir string) error {
	if _, err := os.Stat(dir); err == nil {
		return nil
	}
	parent := filepath.Dir(dir)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return err
	}
	_ = dirplace.Spread(parent) // a hint: where it cannot be given, nothing else changes
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	return nil
}

func readDigests(path string) ([]cache.Digest, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, status.Errorf(codes.Internal, "attest index: %v", err)
	}
	seen := map[cache.Digest]bool{}
	var out []cache.Digest
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		d, err := cache.ParseDigest(sc.Text())
		if err != nil || seen[d] {
			continue // a torn line from a crashed writer, or a duplicate
		}
		seen[d] = true
		out = append(out, d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Hash < out[j].Hash })
	return out, nil
}

// writeAtomic writes data to path through a temporary file and a rename.
func writeAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	if err := mkdirShard(dir); err != nil {
		return status.Errorf(codes.Internal, "attest store: %v", err)
	}
	f, err := os.CreateTemp(dir, ".tmp-*")
	if err != nil {
		return status.Errorf(codes.Internal, "attest store: %v", err)
	}
	defer os.Remove(f.Name())
	_, werr := f.Write(data)
	cerr := f.Close()
	if werr != nil || cerr != nil {
		return status.Errorf(codes.Internal, "attest store: write %s: %v", path, errors.Join(werr, cerr))
	}
	if err := os.Chmod(f.Name(), 0o644); err != nil {
		return status.Errorf(codes.Internal, "attest store: %v", err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return status.Errorf(codes.Internal, "attest store: %v", err)
	}
	return nil
}
