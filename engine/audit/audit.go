// Package audit is the append-only audit log of a data dir (DATA/audit.log): one JSON
// line per security-relevant event (a quarantine or release, a revocation, an Execute
// call), each with when, who asked, from which host and user.
//
// Several processes append at once (kiln serve, kiln quarantine, kiln revoke): every
// line is one O_APPEND write(2), which Linux keeps whole, and is fsynced before Append
// returns, so the trail survives a crash.
package audit

import (
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Events the log records.
const (
	EventQuarantine = "quarantine" // an artifact quarantined (Digest, Reason)
	EventRelease    = "release"    // a quarantine lifted (Digest, Reason)
	EventRevoke     = "revoke"     // an identity or executor key revoked (Revocation, Identity or Key)
	EventUnrevoke   = "unrevoke"   // a revocation undone (Revocation)
	EventExecute    = "execute"    // an Execute call (Identity, Action, Operation, Peer)
)

// Record is one line of the audit log. Time, Host and User are filled by Append.
type Record struct {
	Time    time.Time `json:"time"`
	Event   string    `json:"event"`
	Digest  string    `json:"digest,omitempty"`
	Subject string    `json:"subject,omitempty"`
	Reason  string    `json:"reason,omitempty"`
	By      string    `json:"by"` // the command or service that acted: "kiln revoke", "kiln serve", ...
	Host    string    `json:"host,omitempty"`
	User    int       `json:"uid"`
	// Identity is the caller's identity (package engine/auth's string form) or, for a
	// revocation, the identity pattern revoked.
	Identity   string `json:"identity,omitempty"`
	Key        string `json:"key,omitempty"`        // a revoked executor key id
	Revocation string `json:"revocation,omitempty"` // a revocation's id
	Action     string `json:"action,omitempty"`     // an executed action's digest
	Operation  string `json:"operation,omitempty"`  // its operation name
	Peer       string `json:"peer,omitempty"`       // the caller's network address
}

// Log is the audit log of one data dir.
type Log struct {
	path string
	now  func() time.Time
	host string
}

// Open returns the audit log of dataDir (the file is created at the first append).
func Open(dataDir string) *Log {
	host, _ := os.Hostname()
	return &Log{path: filepath.Join(dataDir, "audit.log"), now: time.Now, host: host}
}

// WithClock returns the log with another clock (tests).
func (l *Log) WithClock(now func() time.Time) *Log {
	c := *l
	c.now = now
	return &c
}

// Path is the log file's path.
func (l *Log) Path() string { return l.path }

// Append writes r as one line (with Time, Host and User set) and syncs it.
func (l *Log) Append(r Record) error {
	r.Time, r.Host, r.User = l.now().UTC(), l.host, os.Getuid()
	b, err := json.Marshal(r)
	if err != nil {
		return status.Errorf(codes.Internal, "audit log: %v", err)
	}
	f, err := os.OpenFile(l.path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return status.Errorf(codes.Internal, "audit log: %v", err)
	}
	defer f.Close()
	if _, err := f.Write(append(b, '\n')); err != nil {
		return status.Errorf(codes.Internal, "audit log: %v", err)
	}
	if err := f.Sync(); err != nil {
		return status.Errorf(codes.Internal, "audit log: %v", err)
	}
	return nil
}

// Records returns the log's records of the given events (all events if none given),
// oldest first.
func (l *Log) Records(events ...string) ([]Record, error) {
	b, err := os.ReadFile(l.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, status.Errorf(codes.Internal, "audit log: %v", err)
	}
	want := map[string]bool{}
	for _, e := range events {
		want[e] = true
	}
	var out []Record
	for i, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if line == "" {
			continue
		}
		var r Record
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			return nil, status.Errorf(codes.DataLoss, "audit log line %d: %v", i+1, err)
		}
		if len(want) == 0 || want[r.Event] {
			out = append(out, r)
		}
	}
	return out, nil
}
