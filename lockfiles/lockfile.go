// Package lockfiles holds kiln.lock, the file that pins every external input of a build
// by digest (toolchain images and downloaded dependencies), and the fetcher that brings
// dependencies into the CAS only once they match the digest pinned for them.
package lockfiles

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/kilnbuild/kiln/cache"
	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// SchemaVersion is the kiln.lock format this package reads and writes.
const SchemaVersion = 1

// DefaultName is the lockfile's conventional file name.
const DefaultName = "kiln.lock"

// maxFileSize bounds what Load reads, so a hostile file cannot exhaust memory.
const maxFileSize = 64 << 20

// Lockfile is the parsed kiln.lock: toolchains and dependencies, each keyed by name.
type Lockfile struct {
	Version      int                    `json:"version"`
	Toolchains   map[string]*Toolchain  `json:"toolchains"`
	Dependencies map[string]*Dependency `json:"dependencies"`
}

// Toolchain pins a toolchain name or image tag to a manifest digest.
type Toolchain struct {
	// Digest is the image manifest (or index) digest, "sha256:HEX".
	Digest string `json:"digest"`
	// Source says where the pin came from, e.g. the reference it was pinned from.
	Source string `json:"source,omitempty"`
}

// Dependency pins one external download by digest.
type Dependency struct {
	// Name is the dependency's key in the lockfile (not written inside the entry); Load
	// and SetDependency set it.
	Name string `json:"-"`
	// URLs are mirrors of the same content, tried in order.
	URLs []string `json:"urls"`
	// SHA256 is the content's lowercase hex SHA-256 (what Bazel's http_archive sha256 holds).
	SHA256 string `json:"sha256,omitempty"`
	// Integrity is a Subresource Integrity value (sha256-, sha384- or sha512-BASE64).
	Integrity string `json:"integrity,omitempty"`
	// Size is the content's length in bytes; 0 means not recorded.
	Size int64 `json:"size,omitempty"`
	// Archive is the archive type ("tar.gz", "zip", ..., or "file" for a plain file).
	Archive string `json:"archive,omitempty"`
	// StripPrefix is the directory prefix to strip from the archive's entries.
	StripPrefix string `json:"strip_prefix,omitempty"`
}

// ArchiveTypes are the accepted values of Dependency.Archive (Bazel's http_archive
// types, and "file" for content that is not unpacked).
var ArchiveTypes = []string{"7z", "aar", "ar", "deb", "file", "jar", "tar", "tar.bz2", "tar.gz", "tar.xz", "tar.zst", "tbz", "tgz", "txz", "tzst", "war", "zip"}

// New returns an empty lockfile of the current schema version.
func New() *Lockfile {
	return &Lockfile{Version: SchemaVersion, Toolchains: map[string]*Toolchain{}, Dependencies: map[string]*Dependency{}}
}

// Error is one problem in a lockfile, at a 1-based line and byte column.
type Error struct {
	File      string
	Line, Col int
	Msg       string
}

func (e *Error) Error() string { return fmt.Sprintf("%s:%d:%d: %s", e.File, e.Line, e.Col, e.Msg) }

// ErrorList is every problem found in a lockfile, in document order.
type ErrorList []*Error

func (l ErrorList) Error() string {
	msgs := make([]string, len(l))
	for i, e := range l {
		msgs[i] = e.Error()
	}
	return strings.Join(msgs, "; ")
}

// GRPCStatus makes a lockfile error an INVALID_ARGUMENT status.
func (l ErrorList) GRPCStatus() *status.Status { return status.New(codes.InvalidArgument, l.Error()) }

// Load reads and validates the lockfile at path. Problems are an ErrorList whose entries
// read "PATH:LINE:COL: message"; a missing file is NOT_FOUND.
func Load(path string) (*Lockfile, error) {
	f, err := os.Open(path)
	if err != nil {
		if os.IsNotExist(err) {
			return nil, status.Errorf(codes.NotFound, "lockfile %s does not exist", path)
		}
		return nil, status.Errorf(codes.Internal, "open lockfile: %v", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxFileSize+1))
	if err != nil {
		return nil, status.Errorf(codes.Internal, "read lockfile %s: %v", path, err)
	}
	if len(data) > maxFileSize {
		return nil, status.Errorf(codes.InvalidArgument, "lockfile %s is larger than %d bytes", path, maxFileSize)
	}
	return Parse(path, data)
}

// Parse validates data as a lockfile; name prefixes error positions.
func Parse(name string, data []byte) (*Lockfile, error) {
	v := &validator{file: name, data: data}
	root, err := parseJSON(data)
	if err != nil {
		pe := err.(*posErr)
		v.errAt(pe.pos, "%s", pe.msg)
		return nil, v.errs
	}
	l := v.lockfile(root)
	if len(v.errs) > 0 {
		sort.SliceStable(v.errs, func(i, j int) bool {
			a, b := v.errs[i], v.errs[j]
			return a.Line < b.Line || a.Line == b.Line && a.Col < b.Col
		})
		return nil, v.errs
	}
	return l, nil
}

// Marshal returns the lockfile's canonical form: keys sorted, two-space indent, no HTML
// escaping, a trailing newline; so the same content always gives the same bytes and a
// change gives a small diff. An invalid lockfile is refused.
func (l *Lockfile) Marshal() ([]byte, error) {
	if err := l.Validate(); err != nil {
		return nil, err
	}
	out := *l
	if out.Toolchains == nil {
		out.Toolchains = map[string]*Toolchain{}
	}
	if out.Dependencies == nil {
		out.Dependencies = map[string]*Dependency{}
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(&out); err != nil {
		return nil, status.Errorf(codes.Internal, "encode lockfile: %v", err)
	}
	return buf.Bytes(), nil
}

// Validate checks a lockfile built or changed in code by the rules Load applies.
func (l *Lockfile) Validate() error {
	c := l.clone() // nil maps encode as null, which Parse refuses
	data, err := json.Marshal(c)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "encode lockfile: %v", err)
	}
	if _, err := Parse("lockfile", data); err != nil {
		// Positions in a one-line re-encoding mean nothing: keep only the messages.
		var msgs []string
		for _, e := range err.(ErrorList) {
			msgs = append(msgs, e.Msg)
		}
		return status.Errorf(codes.InvalidArgument, "invalid lockfile: %s", strings.Join(msgs, "; "))
	}
	return nil
}

// Save writes the lockfile's canonical form to path atomically (temp file, fsync, rename).
func (l *Lockfile) Save(path string) error {
	data, err := l.Marshal()
	if err != nil {
		return err
	}
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return status.Errorf(codes.Internal, "save lockfile: %v", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return status.Errorf(codes.Internal, "save lockfile: %v", err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return status.Errorf(codes.Internal, "save lockfile: %v", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return status.Errorf(codes.Internal, "save lockfile: %v", err)
	}
	if err := tmp.Close(); err != nil {
		return status.Errorf(codes.Internal, "save lockfile: %v", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return status.Errorf(codes.Internal, "save lockfile: %v", err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// SetDependency adds or replaces dependency name, refusing an invalid entry.
func (l *Lockfile) SetDependency(name string, d Dependency) error {
	next := l.clone()
	d.Name = name
	next.Dependencies[name] = &d
	if err := next.Validate(); err != nil {
		return err
	}
	if l.Dependencies == nil {
		l.Dependencies = map[string]*Dependency{}
	}
	l.Dependencies[name] = &d
	return nil
}

// SetToolchain adds or replaces the pin of toolchain name or tag, refusing an invalid one.
func (l *Lockfile) SetToolchain(name string, t Toolchain) error {
	next := l.clone()
	next.Toolchains[name] = &t
	if err := next.Validate(); err != nil {
		return err
	}
	if l.Toolchains == nil {
		l.Toolchains = map[string]*Toolchain{}
	}
	l.Toolchains[name] = &t
	return nil
}

func (l *Lockfile) clone() *Lockfile {
	c := &Lockfile{Version: l.Version, Toolchains: map[string]*Toolchain{}, Dependencies: map[string]*Dependency{}}
	for k, v := range l.Toolchains {
		c.Toolchains[k] = v
	}
	for k, v := range l.Dependencies {
		c.Dependencies[k] = v
	}
	return c
}

// DependencyNames returns the dependencies' names, sorted.
func (l *Lockfile) DependencyNames() []string {
	names := make([]string, 0, len(l.Dependencies))
	for n := range l.Dependencies {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// PinnedDigest returns the manifest digest ("sha256:HEX") pinned for a toolchain name or
// tag. A Docker Hub reference matches in its short and long forms ("debian:12",
// "docker.io/library/debian:12").
func (l *Lockfile) PinnedDigest(nameOrTag string) (string, bool) {
	if l == nil {
		return "", false
	}
	if t, ok := l.Toolchains[nameOrTag]; ok {
		return t.Digest, true
	}
	want := familiarName(nameOrTag)
	for k, t := range l.Toolchains {
		if familiarName(k) == want {
			return t.Digest, true
		}
	}
	return "", false
}

// PinTag implements the toolchains package's TagPinner: an unpinned tag resolves to the
// digest pinned here, and a tag not pinned here stays unpinned (ok false).
func (l *Lockfile) PinTag(_ context.Context, tagRef string) (digest.Digest, bool, error) {
	d, ok := l.PinnedDigest(tagRef)
	if !ok {
		return "", false, nil
	}
	return digest.Digest(d), true, nil
}

// familiarName shortens Docker Hub references to the form users write.
func familiarName(ref string) string {
	for _, p := range []string{"docker.io/library/", "index.docker.io/library/", "docker.io/", "index.docker.io/"} {
		if strings.HasPrefix(ref, p) {
			return strings.TrimPrefix(ref, p)
		}
	}
	return ref
}

// DependencyByURL returns the dependency that lists url among its mirrors (scheme and
// host compared case-insensitively). It only reads, so a loaded Lockfile may serve
// concurrent lookups.
func (l *Lockfile) DependencyByURL(url string) (*Dependency, bool) {
	if l == nil {
		return nil, false
	}
	want := normalizeURL(url)
	for _, name := range l.DependencyNames() {
		d := l.Dependencies[name]
		for _, u := range d.URLs {
			if normalizeURL(u) == want {
				return d, true
			}
		}
	}
	return nil, false
}

// Checksums returns every checksum the dependency pins (sha256 and integrity merged).
func (d *Dependency) Checksums() ([]Checksum, error) {
	var cs []Checksum
	if d.SHA256 != "" {
		c, err := ParseSHA256Hex(d.SHA256)
		if err != nil {
			return nil, err
		}
		cs = append(cs, c)
	}
	if d.Integrity != "" {
		c, err := ParseSRI(d.Integrity)
		if err != nil {
			return nil, err
		}
		merged, err := MergeChecksums(cs, []Checksum{c})
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "dependency %q: %v", d.Name, err)
		}
		cs = merged
	}
	if len(cs) == 0 {
		return nil, status.Errorf(codes.InvalidArgument, "dependency %q pins no checksum", d.Name)
	}
	return cs, nil
}

// Digest returns the dependency's CAS digest, known when it pins a SHA-256 and a size.
func (d *Dependency) Digest() (cache.Digest, bool) {
	cs, err := d.Checksums()
	if err != nil || d.Size <= 0 {
		return cache.Digest{}, false
	}
	c, ok := FindAlgo(cs, SHA256)
	if !ok {
		return cache.Digest{}, false
	}
	return cache.Digest{Hash: c.Hex(), Size: d.Size}, true
}
