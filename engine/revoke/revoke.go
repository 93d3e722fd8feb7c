// Package revoke keeps the revocations of a data dir: caller identities a running kiln
// serve must refuse from now on, and executor keys that must sign nothing more and
// whose links since a time no longer vouch for their products (those artifacts are
// quarantined, package engine/quarantine).
//
// The list is one file, DATA/revocations.json, replaced atomically under a lock by
// `kiln revoke`; servers re-read it when it changes (a stat per check), so a
// revocation takes effect at the next call, without a restart. Every change is
// appended to the audit log (package engine/audit).
package revoke

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/engine/audit"
	"github.com/kilnbuild/kiln/engine/quarantine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Entry is one revocation.
type Entry struct {
	ID string `json:"id"` // "rv-" and 8 hex digits
	// Identity is a pattern over identities' string forms (package engine/auth:
	// "cert:CN", "spiffe://td/path", "oidc:ISSUER#SUBJECT"); '*' matches any run of
	// characters, '/' included.
	Identity string `json:"identity,omitempty"`
	// Key is a revoked executor key's id; Since bounds the links whose products were
	// quarantined (zero: all of them).
	Key   string    `json:"key,omitempty"`
	Since time.Time `json:"since,omitzero"`
	At    time.Time `json:"at"`
	By    string    `json:"by"`
	// Reason says why (required).
	Reason string `json:"reason"`
	// Quarantined are the artifacts this revocation quarantined (sha256:HEX); undoing
	// it releases those still quarantined by it.
	Quarantined []string `json:"quarantined,omitempty"`
}

// What names the revoked thing: the identity pattern or "key KEYID".
func (e Entry) What() string {
	if e.Key != "" {
		return "executor key " + e.Key
	}
	return e.Identity
}

type listFile struct {
	Revocations []Entry `json:"revocations"`
}

// List is the revocation list of one data dir.
type List struct {
	data  string
	path  string
	audit *audit.Log
	now   func() time.Time

	mu     sync.Mutex
	stamp  stamp
	readAt time.Time
	snap   *snapshot
}

// snapshot is the list as last read, with the identity patterns compiled.
type snapshot struct {
	entries  []Entry
	patterns []*regexp.Regexp // per entry; nil for key entries
	err      error            // the file could not be read or parsed
}

type stamp struct {
	ino, size uint64
	mtime     time.Time
}

// racyWindow: a file changed within this long of its last read is read again (mtimes
// are coarse; a second change in the same tick keeps the stamp).
const racyWindow = time.Second

// Open returns the revocation list of dataDir (the file is created by the first
// revocation).
func Open(dataDir string) *List {
	return &List{data: dataDir, path: filepath.Join(dataDir, "revocations.json"), audit: audit.Open(dataDir), now: time.Now}
}

// Path is the list file's path.
func (l *List) Path() string { return l.path }

// current returns the list as it is on disk, reading the file only when it changed.
func (l *List) current() *snapshot {
	var st stamp
	fi, err := os.Stat(l.path)
	if err == nil {
		st = stamp{size: uint64(fi.Size()), mtime: fi.ModTime()}
		if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
			st.ino = sys.Ino
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.snap != nil && st == l.stamp && l.readAt.Sub(st.mtime) >= racyWindow {
		return l.snap
	}
	readAt := l.now()
	l.snap, l.stamp, l.readAt = load(l.path), st, readAt
	return l.snap
}

// load reads and compiles the list file; an absent file is an empty list.
func load(path string) *snapshot {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return &snapshot{}
	}
	if err != nil {
		return &snapshot{err: err}
	}
	var f listFile
	if err := json.Unmarshal(b, &f); err != nil {
		return &snapshot{err: fmt.Errorf("%s: %v", path, err)}
	}
	s := &snapshot{entries: f.Revocations}
	for _, e := range f.Revocations {
		var re *regexp.Regexp
		if e.Identity != "" {
			if re, err = compile(e.Identity); err != nil {
				return &snapshot{err: fmt.Errorf("%s: %v", path, err)}
			}
		}
		s.patterns = append(s.patterns, re)
	}
	return s
}

// identityKinds are the prefixes of identity string forms (package engine/auth).
var identityKinds = []string{"cert:", "spiffe://", "oidc:"}

// compile turns an identity pattern into a regular expression anchored at both ends,
// '*' matching any run of characters.
func compile(pattern string) (*regexp.Regexp, error) {
	ok := false
	for _, k := range identityKinds {
		ok = ok || strings.HasPrefix(pattern, k)
	}
	if !ok {
		return nil, status.Errorf(codes.InvalidArgument, "identity pattern %q: want cert:CN, spiffe://TRUST-DOMAIN/PATH or oidc:ISSUER#SUBJECT ('*' matches anything)", pattern)
	}
	parts := strings.Split(pattern, "*")
	for i, p := range parts {
		parts[i] = regexp.QuoteMeta(p)
	}
	return regexp.Compile("^" + strings.Join(parts, ".*") + "$")
}

// CheckIdentity returns an error (UNAUTHENTICATED) if identity, in its string form, is
// revoked, or if the list cannot be read (refusing is the safe answer).
func (l *List) CheckIdentity(identity string) error {
	s := l.current()
	if s.err != nil {
		return status.Errorf(codes.Unauthenticated, "the revocation list cannot be read, so no identity is accepted: %v", s.err)
	}
	for i, re := range s.patterns {
		if re != nil && re.MatchString(identity) {
			e := s.entries[i]
			return status.Errorf(codes.Unauthenticated, "revoked at %s by %s (%s, `kiln revoke ls`): %s", e.At.Format(time.RFC3339), e.By, e.ID, e.Reason)
		}
	}
	return nil
}

// CheckKey returns an error (FAILED_PRECONDITION) if executor key id is revoked or the
// list cannot be read.
func (l *List) CheckKey(id string) error {
	s := l.current()
	if s.err != nil {
		return status.Errorf(codes.FailedPrecondition, "the revocation list cannot be read, so no key may sign: %v", s.err)
	}
	for _, e := range s.entries {
		if e.Key != "" && e.Key == id {
			return status.Errorf(codes.FailedPrecondition, "executor key %s was revoked at %s (%s): %s; rotate it (`kiln attest key rotate`)", short(id), e.At.Format(time.RFC3339), e.ID, e.Reason)
		}
	}
	return nil
}

// List returns the revocations, oldest first.
func (l *List) List() ([]Entry, error) {
	s := l.current()
	if s.err != nil {
		return nil, status.Errorf(codes.DataLoss, "revocation list: %v", s.err)
	}
	return append([]Entry(nil), s.entries...), nil
}

// update runs fn on the list read under an exclusive lock and writes back what it
// returns (atomically: temporary file, fsync, rename).
func (l *List) update(fn func([]Entry) ([]Entry, error)) error {
	lk, err := os.OpenFile(l.path+".lock", os.O_CREATE|os.O_RDWR|syscall.O_CLOEXEC, 0o644)
	if err != nil {
		return status.Errorf(codes.Internal, "revocation list: %v", err)
	}
	defer lk.Close()
	if err := syscall.Flock(int(lk.Fd()), syscall.LOCK_EX); err != nil {
		return status.Errorf(codes.Internal, "revocation list: %v", err)
	}
	s := load(l.path)
	if s.err != nil {
		return status.Errorf(codes.DataLoss, "revocation list: %v", s.err)
	}
	out, err := fn(append([]Entry(nil), s.entries...))
	if err != nil {
		return err
	}
	b, _ := json.MarshalIndent(listFile{Revocations: out}, "", "  ")
	tmp := fmt.Sprintf("%s.tmp-%d", l.path, os.Getpid())
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err == nil {
		_, err = f.Write(append(b, '\n'))
		if serr := f.Sync(); err == nil {
			err = serr
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err == nil {
		err = os.Rename(tmp, l.path)
	}
	if err != nil {
		os.Remove(tmp)
		return status.Errorf(codes.Internal, "revocation list: %v", err)
	}
	return nil
}

func newID() string {
	var b [4]byte
	rand.Read(b[:])
	return "rv-" + hex.EncodeToString(b[:])
}

// RevokeIdentity revokes every identity matching pattern from now on.
func (l *List) RevokeIdentity(pattern, reason, by string) (Entry, error) {
	if _, err := compile(pattern); err != nil {
		return Entry{}, err
	}
	if strings.TrimSpace(reason) == "" {
		return Entry{}, status.Error(codes.InvalidArgument, "a revocation needs a reason (--reason)")
	}
	e := Entry{ID: newID(), Identity: pattern, At: l.now().UTC(), By: by, Reason: reason}
	err := l.update(func(es []Entry) ([]Entry, error) {
		for _, o := range es {
			if o.Identity == pattern {
				return nil, status.Errorf(codes.AlreadyExists, "%s is already revoked (%s)", pattern, o.ID)
			}
		}
		return append(es, e), nil
	})
	if err != nil {
		return Entry{}, err
	}
	return e, l.audit.WithClock(l.now).Append(audit.Record{Event: audit.EventRevoke, Revocation: e.ID, Identity: pattern, Reason: reason, By: by})
}

// ResolveKey finds the executor key named by id (its full id, or a prefix of at least
// 8 hex digits that names one key) among ks.
func ResolveKey(ks []keys.PublicKey, id string) (keys.PublicKey, error) {
	id = strings.ToLower(strings.TrimSpace(id))
	if len(id) < 8 {
		return keys.PublicKey{}, status.Errorf(codes.InvalidArgument, "key id %q: give at least 8 hex digits (`kiln attest pubkey --all`)", id)
	}
	var found []keys.PublicKey
	for _, k := range ks {
		if strings.HasPrefix(k.KeyID, id) {
			found = append(found, k)
		}
	}
	switch len(found) {
	case 0:
		return keys.PublicKey{}, status.Errorf(codes.NotFound, "no executor key %s in this data dir's keyring (`kiln attest pubkey --all`)", id)
	case 1:
		return found[0], nil
	}
	return keys.PublicKey{}, status.Errorf(codes.InvalidArgument, "key id %s names %d keys; give more digits", id, len(found))
}

// KeyResult is what revoking an executor key did.
type KeyResult struct {
	Entry Entry
	// Links are the envelopes signed by the key since Since that were found.
	Links int
	// Quarantined are the artifacts quarantined now; AlreadyQuarantined were so before.
	Quarantined        []string
	AlreadyQuarantined []string
}

// rescanDelay is how long RevokeKey waits before looking for links again: a signer
// that checked the list just before the revocation was written may still be writing
// one (its check and its signature are not atomic with the revocation).
const rescanDelay = time.Second

// RevokeKey revokes executor key k: from now on no kiln process on this data dir signs
// with it (they check the list before signing), and every artifact a link signed by k
// at or after since names as a product is quarantined (the empty file's digest
// excepted: anyone can make it). Running it again for the same key scans again (from
// the earlier since) and adds what it finds, so an interrupted revocation completes.
func (l *List) RevokeKey(ctx context.Context, k keys.PublicKey, since time.Time, reason, by string, q *quarantine.List) (KeyResult, error) {
	if strings.TrimSpace(reason) == "" {
		return KeyResult{}, status.Error(codes.InvalidArgument, "a revocation needs a reason (--reason)")
	}
	e := Entry{ID: newID(), Key: k.KeyID, Since: since.UTC(), At: l.now().UTC(), By: by, Reason: reason}
	again := false
	err := l.update(func(es []Entry) ([]Entry, error) {
		for i, o := range es {
			if o.Key == k.KeyID {
				if since.Before(o.Since) {
					es[i].Since = since.UTC()
				}
				e, again = es[i], true
				return es, nil
			}
		}
		return append(es, e), nil
	})
	if err != nil {
		return KeyResult{}, err
	}
	if !again {
		if err := l.audit.WithClock(l.now).Append(audit.Record{Event: audit.EventRevoke, Revocation: e.ID, Key: k.KeyID, Reason: reason, By: by}); err != nil {
			return KeyResult{}, err
		}
	}
	res := KeyResult{Entry: e}
	store := attest.NewStore(attest.PathsFor(l.data), nil)
	products := map[string]string{} // hex -> a path it was produced at
	seen := map[string]bool{}       // envelopes looked at
	scan := func() error {
		return store.SignedSince(e.Since, func(env []byte, _ time.Time) error {
			d := cache.DigestOf(env)
			if seen[d.Hash] {
				return nil
			}
			seen[d.Hash] = true
			ps, ok := signedProducts(ctx, env, k)
			if !ok {
				return nil
			}
			res.Links++
			for h, p := range ps {
				if _, dup := products[h]; !dup {
					products[h] = p
				}
			}
			return nil
		})
	}
	if err := scan(); err != nil {
		return res, err
	}
	select {
	case <-time.After(rescanDelay):
	case <-ctx.Done():
		return res, ctx.Err()
	}
	if err := scan(); err != nil {
		return res, err
	}
	hexes := make([]string, 0, len(products))
	for h := range products {
		hexes = append(hexes, h)
	}
	sort.Strings(hexes)
	tag := by + " " + e.ID
	for _, h := range hexes {
		if h == cache.EmptyDigest.Hash {
			continue
		}
		if q.Quarantined(h) {
			res.AlreadyQuarantined = append(res.AlreadyQuarantined, "sha256:"+h)
			continue
		}
		qe, err := q.Add("sha256:"+h, products[h], fmt.Sprintf("signed by revoked executor key %s (%s): %s", short(k.KeyID), e.ID, reason), tag)
		if err != nil {
			return res, err
		}
		res.Quarantined = append(res.Quarantined, qe.Digest)
	}
	err = l.update(func(es []Entry) ([]Entry, error) {
		for i := range es {
			if es[i].ID == e.ID {
				es[i].Quarantined = mergeSorted(es[i].Quarantined, res.Quarantined)
				res.Entry = es[i]
			}
		}
		return es, nil
	})
	return res, err
}

// signedProducts returns the sha256 products (hex -> path) of env's link if env is a
// link that k validly signed.
func signedProducts(ctx context.Context, raw []byte, k keys.PublicKey) (map[string]string, bool) {
	env, err := attest.ParseEnvelope(raw)
	if err != nil {
		return nil, false
	}
	named := false
	for _, s := range env.Signatures {
		named = named || s.KeyID == k.KeyID
	}
	if !named {
		return nil, false
	}
	_, payload, err := attest.VerifyEnvelope(ctx, env, keys.Trust{Keys: []keys.PublicKey{k}})
	if err != nil {
		return nil, false // names the key but does not verify: not signed by it
	}
	link, err := attest.DecodeLink(payload)
	if err != nil {
		return nil, false
	}
	out := map[string]string{}
	for p, hs := range link.Products {
		if h, ok := hs[attest.AlgSHA256]; ok {
			out[h] = p
		}
	}
	return out, true
}

func mergeSorted(a, b []string) []string {
	set := map[string]bool{}
	for _, s := range append(append([]string{}, a...), b...) {
		set[s] = true
	}
	out := make([]string, 0, len(set))
	for s := range set {
		out = append(out, s)
	}
	sort.Strings(out)
	return out
}

// Undo lifts revocation id (an "rv-" id, an identity pattern or a key id): the
// identity is accepted again, or the key may sign again and the artifacts this
// revocation quarantined are released (those another cause quarantined stay).
func (l *List) Undo(id, reason, by string, q *quarantine.List) (Entry, []string, error) {
	if strings.TrimSpace(reason) == "" {
		return Entry{}, nil, status.Error(codes.InvalidArgument, "undoing a revocation needs a reason (--reason)")
	}
	var e Entry
	err := l.update(func(es []Entry) ([]Entry, error) {
		for i, o := range es {
			if o.ID == id || o.Identity == id || o.Key != "" && o.Key == id {
				e = o
				return append(es[:i:i], es[i+1:]...), nil
			}
		}
		return nil, status.Errorf(codes.NotFound, "no revocation %q (`kiln revoke ls`)", id)
	})
	if err != nil {
		return Entry{}, nil, err
	}
	var released []string
	if len(e.Quarantined) > 0 {
		qs, err := q.List()
		if err != nil {
			return e, nil, err
		}
		mine := map[string]bool{}
		for _, qe := range qs {
			if strings.HasSuffix(qe.By, " "+e.ID) {
				mine[qe.Digest] = true
			}
		}
		for _, d := range e.Quarantined {
			if !mine[d] {
				continue
			}
			if _, err := q.Release(d, fmt.Sprintf("revocation %s undone: %s", e.ID, reason), by); err != nil {
				return e, released, err
			}
			released = append(released, d)
		}
	}
	return e, released, l.audit.WithClock(l.now).Append(audit.Record{Event: audit.EventUnrevoke, Revocation: e.ID, Identity: e.Identity, Key: e.Key, Reason: reason, By: by})
}

func short(id string) string {
	if len(id) > 16 {
		return id[:16]
	}
	return id
}
