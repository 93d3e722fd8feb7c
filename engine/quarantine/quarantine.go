// Package quarantine keeps the artifacts kiln must no longer hand out: digests whose
// rebuild failed (or that an operator blocked), with the reason, and an append-only
// audit log of every quarantine and release.
//
// The list lives in the data dir, one file per digest, so `kiln rebuild` and
// `kiln quarantine` can change it while `kiln serve` runs; the server sees changes at
// its next check (it re-reads the directory when its mtime moves).
package quarantine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/audit"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Entry is one quarantined artifact.
type Entry struct {
	Digest  string    `json:"digest"` // sha256:HEX
	Subject string    `json:"subject,omitempty"`
	Reason  string    `json:"reason"`
	Since   time.Time `json:"since"`
	By      string    `json:"by"` // who: "kiln rebuild", "kiln quarantine add", ...
}

// AuditRecord is one line of the audit log (package engine/audit).
type AuditRecord = audit.Record

// List is the quarantine list of one data dir.
type List struct {
	dir   string // DATA/quarantine
	audit *audit.Log
	now   func() time.Time

	mu      sync.Mutex
	seenMod time.Time
	readAt  time.Time       // when set was read
	set     map[string]bool // hex digests
}

// racyWindow is how long after a directory change a snapshot of it is not trusted:
// directory mtimes come from a coarse kernel clock, so another change within the same
// tick leaves the mtime as it was (git's "racily clean" problem).
const racyWindow = time.Second

// Open opens (creating) the quarantine list under dataDir.
func Open(dataDir string) (*List, error) {
	l := &List{dir: filepath.Join(dataDir, "quarantine"), audit: audit.Open(dataDir), now: time.Now}
	if err := os.MkdirAll(l.dir, 0o755); err != nil {
		return nil, status.Errorf(codes.Internal, "quarantine: %v", err)
	}
	return l, nil
}

// hexOf accepts "sha256:HEX", "HEX" or "HEX/SIZE".
func hexOf(d string) (string, error) {
	h := strings.TrimPrefix(d, "sha256:")
	if i := strings.IndexByte(h, '/'); i >= 0 {
		h = h[:i]
	}
	if _, err := cache.NewDigest(h, 0); err != nil {
		return "", status.Errorf(codes.InvalidArgument, "bad digest %q: want sha256:HEX", d)
	}
	return h, nil
}

// Add quarantines digest with a reason and writes the audit record.
func (l *List) Add(digest, subject, reason, by string) (Entry, error) {
	h, err := hexOf(digest)
	if err != nil {
		return Entry{}, err
	}
	if strings.TrimSpace(reason) == "" {
		return Entry{}, status.Error(codes.InvalidArgument, "a quarantine needs a reason")
	}
	e := Entry{Digest: "sha256:" + h, Subject: subject, Reason: reason, Since: l.now().UTC(), By: by}
	b, _ := json.MarshalIndent(e, "", "  ")
	if err := writeAtomic(filepath.Join(l.dir, h+".json"), append(b, '\n')); err != nil {
		return Entry{}, err
	}
	return e, l.record(audit.EventQuarantine, e.Digest, subject, reason, by)
}

// Release lifts the quarantine of digest; the reason goes to the audit log.
func (l *List) Release(digest, reason, by string) (Entry, error) {
	h, err := hexOf(digest)
	if err != nil {
		return Entry{}, err
	}
	if strings.TrimSpace(reason) == "" {
		return Entry{}, status.Error(codes.InvalidArgument, "a release needs a reason (--reason)")
	}
	p := filepath.Join(l.dir, h+".json")
	e, err := readEntry(p)
	if err != nil {
		return Entry{}, err
	}
	if err := os.Remove(p); err != nil {
		return Entry{}, status.Errorf(codes.Internal, "release: %v", err)
	}
	return e, l.record(audit.EventRelease, e.Digest, e.Subject, reason, by)
}

func readEntry(p string) (Entry, error) {
	b, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return Entry{}, status.Errorf(codes.NotFound, "%s is not quarantined", strings.TrimSuffix(filepath.Base(p), ".json"))
	}
	if err != nil {
		return Entry{}, status.Errorf(codes.Internal, "quarantine: %v", err)
	}
	var e Entry
	if err := json.Unmarshal(b, &e); err != nil {
		return Entry{}, status.Errorf(codes.DataLoss, "quarantine entry %s: %v", p, err)
	}
	return e, nil
}

// List returns every quarantined artifact, oldest first.
func (l *List) List() ([]Entry, error) {
	ents, err := os.ReadDir(l.dir)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "quarantine: %v", err)
	}
	var out []Entry
	for _, d := range ents {
		if !strings.HasSuffix(d.Name(), ".json") {
			continue
		}
		e, err := readEntry(filepath.Join(l.dir, d.Name()))
		if err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Since.Before(out[j].Since) })
	return out, nil
}

// Quarantined reports whether the blob with this hex digest is quarantined.
func (l *List) Quarantined(hash string) bool { return l.snapshot()[hash] }

// snapshot returns the set of quarantined hex digests, re-reading the directory when
// its mtime moved, or when the last read was too close to the last change to be sure
// it saw every change (racyWindow), so a check mostly costs one stat.
func (l *List) snapshot() map[string]bool {
	var st unix.Stat_t
	mod := time.Time{}
	if unix.Stat(l.dir, &st) == nil {
		mod = time.Unix(st.Mtim.Unix())
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.set == nil || !mod.Equal(l.seenMod) || l.readAt.Sub(mod) < racyWindow {
		readAt := l.now()
		set := map[string]bool{}
		if ents, err := os.ReadDir(l.dir); err == nil {
			for _, d := range ents {
				if h, ok := strings.CutSuffix(d.Name(), ".json"); ok {
					set[h] = true
				}
			}
		}
		l.set, l.seenMod, l.readAt = set, mod, readAt
	}
	return l.set
}

// record appends one line to the audit log.
func (l *List) record(event, digest, subject, reason, by string) error {
	return l.audit.WithClock(l.now).Append(audit.Record{Event: event, Digest: digest, Subject: subject, Reason: reason, By: by})
}

// Audit returns the audit log's quarantines and releases.
func (l *List) Audit() ([]AuditRecord, error) {
	return l.audit.Records(audit.EventQuarantine, audit.EventRelease)
}

func writeAtomic(p string, b []byte) error {
	tmp := fmt.Sprintf("%s.tmp-%d", p, os.Getpid())
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return status.Errorf(codes.Internal, "quarantine: %v", err)
	}
	if err := os.Rename(tmp, p); err != nil {
		os.Remove(tmp)
		return status.Errorf(codes.Internal, "quarantine: %v", err)
	}
	return nil
}

// FirstQuarantined returns the first quarantined blob an ActionResult hands out
// (output files, files inside output Trees), or "" if none.
func (l *List) FirstQuarantined(ctx context.Context, cas cache.BlobStore, r *repb.ActionResult) (string, error) {
	ds, err := cache.ReferencedDigests(ctx, cas, r)
	if err != nil {
		return "", err
	}
	set := l.snapshot()
	for _, d := range ds {
		if set[d.Hash] {
			return "sha256:" + d.Hash, nil
		}
	}
	return "", nil
}

// actionCache hides results that would hand out a quarantined artifact.
type actionCache struct {
	cache.ActionCache
	l   *List
	cas cache.BlobStore
}

// WrapActionCache returns ac such that Get answers NOT_FOUND for a result that
// references a quarantined blob.
func (l *List) WrapActionCache(ac cache.ActionCache, cas cache.BlobStore) cache.ActionCache {
	return actionCache{ActionCache: ac, l: l, cas: cas}
}

func (a actionCache) Get(ctx context.Context, key cache.ActionKey) (*repb.ActionResult, error) {
	r, err := a.ActionCache.Get(ctx, key)
	if err != nil {
		return nil, err
	}
	q, err := a.l.FirstQuarantined(ctx, a.cas, r)
	if err != nil {
		return nil, err
	}
	if q != "" {
		return nil, status.Errorf(codes.NotFound, "action %s: its result includes quarantined artifact %s", key.Action, q)
	}
	return r, nil
}
