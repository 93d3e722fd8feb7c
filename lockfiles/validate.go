package lockfiles

import (
	"fmt"
	"net/url"
	"path"
	"strconv"
	"strings"
	"unicode"

	"google.golang.org/grpc/status"
)

// maxErrors bounds how many problems one Load reports.
const maxErrors = 50

// validator turns a positioned JSON tree into a Lockfile, collecting every problem with
// its position.
type validator struct {
	file string
	data []byte
	errs ErrorList
}

func (v *validator) errAt(pos int, format string, args ...any) {
	if len(v.errs) >= maxErrors {
		return
	}
	line, col := lineCol(v.data, pos)
	v.errs = append(v.errs, &Error{File: v.file, Line: line, Col: col, Msg: fmt.Sprintf(format, args...)})
}

// members checks that n is an object, reports duplicate keys and keys outside allowed
// (nil allows any), and returns the first occurrence of each key.
func (v *validator) members(n *jnode, what string, allowed []string) map[string]jmember {
	if n.kind != jObject {
		v.errAt(n.pos, "%s: want an object, got %s", what, n.kind)
		return nil
	}
	seen := map[string]jmember{}
	for _, m := range n.members {
		if first, dup := seen[m.key]; dup {
			l, c := lineCol(v.data, first.keyPos)
			v.errAt(m.keyPos, "%s: duplicate key %q (first at %d:%d)", what, m.key, l, c)
			continue
		}
		if allowed != nil && !contains(allowed, m.key) {
			v.errAt(m.keyPos, "%s: unknown field %q (known: %s)", what, m.key, strings.Join(allowed, ", "))
			continue
		}
		seen[m.key] = m
	}
	return seen
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func (v *validator) str(n *jnode, what string) (string, bool) {
	if n.kind != jString {
		v.errAt(n.pos, "%s: want a string, got %s", what, n.kind)
		return "", false
	}
	return n.str, true
}

// integer reads a non-negative integer no larger than 2^53 (exact in every JSON reader).
func (v *validator) integer(n *jnode, what string) (int64, bool) {
	if n.kind != jNumber {
		v.errAt(n.pos, "%s: want a non-negative integer, got %s", what, n.kind)
		return 0, false
	}
	i, err := strconv.ParseInt(n.str, 10, 64)
	if err != nil || i < 0 || i > 1<<53 {
		v.errAt(n.pos, "%s: want a non-negative integer, got %s", what, n.str)
		return 0, false
	}
	return i, true
}

func (v *validator) lockfile(root *jnode) *Lockfile {
	// Read the version before judging other keys: a later format may have other fields.
	top := v.members(root, "lockfile", nil)
	if top == nil {
		return nil
	}
	l := New()
	ver, ok := top["version"]
	if !ok {
		v.errAt(root.pos, "lockfile: missing \"version\" (this kiln writes version %d)", SchemaVersion)
		return nil
	}
	n, ok := v.integer(ver.val, "version")
	if !ok {
		return nil
	}
	if n != SchemaVersion {
		// A later format may mean anything: check nothing else rather than misreport.
		v.errAt(ver.val.pos, "unknown schema version %d (this kiln reads version %d)", n, SchemaVersion)
		return nil
	}
	known := []string{"version", "toolchains", "dependencies"}
	for _, m := range root.members {
		if !contains(known, m.key) {
			v.errAt(m.keyPos, "lockfile: unknown field %q (known: %s)", m.key, strings.Join(known, ", "))
		}
	}
	if m, ok := top["toolchains"]; ok {
		v.toolchains(m.val, l)
	}
	if m, ok := top["dependencies"]; ok {
		v.dependencies(m.val, l)
	}
	return l
}

func (v *validator) toolchains(n *jnode, l *Lockfile) {
	entries := v.members(n, "toolchains", nil)
	familiar := map[string]jmember{}
	for _, m := range n.members {
		if e, ok := entries[m.key]; !ok || e.keyPos != m.keyPos {
			continue // a duplicate, already reported
		}
		what := fmt.Sprintf("toolchain %q", m.key)
		if msg := checkToolchainName(m.key); msg != "" {
			v.errAt(m.keyPos, "%s: %s", what, msg)
			continue
		}
		if first, dup := familiar[familiarName(m.key)]; dup {
			fl, fc := lineCol(v.data, first.keyPos)
			v.errAt(m.keyPos, "%s: names the same image as %q (at %d:%d)", what, first.key, fl, fc)
			continue
		}
		familiar[familiarName(m.key)] = m
		fields := v.members(m.val, what, []string{"digest", "source"})
		if fields == nil {
			continue
		}
		t := &Toolchain{}
		if f, ok := fields["digest"]; !ok {
			v.errAt(m.val.pos, "%s: missing \"digest\"", what)
		} else if s, ok := v.str(f.val, what+": digest"); ok {
			if msg := checkImageDigest(s); msg != "" {
				v.errAt(f.val.pos, "%s: digest %q: %s", what, short(s), msg)
			}
			t.Digest = s
		}
		if f, ok := fields["source"]; ok {
			if s, ok := v.str(f.val, what+": source"); ok {
				t.Source = s
			}
		}
		l.Toolchains[m.key] = t
	}
}

func checkToolchainName(s string) string {
	switch {
	case s == "":
		return "empty name"
	case len(s) > 255:
		return "name longer than 255 bytes"
	case strings.Contains(s, "@"):
		return "a reference with a digest needs no pin: use the tag or name alone as the key"
	}
	for _, r := range s {
		if unicode.IsSpace(r) || unicode.IsControl(r) {
			return "name contains white space or control characters"
		}
	}
	return ""
}

// checkImageDigest accepts exactly "sha256:" and 64 lowercase hex characters.
func checkImageDigest(s string) string {
	hexPart, ok := strings.CutPrefix(s, "sha256:")
	if !ok {
		return "want sha256:<64 lowercase hex>"
	}
	if _, err := ParseSHA256Hex(hexPart); err != nil {
		return "want sha256:<64 lowercase hex>"
	}
	return ""
}

// urlOwner records which dependency first listed a URL, to catch contradictory pins.
type urlOwner struct {
	name string
	pos  int
	sums []Checksum
}

func (v *validator) dependencies(n *jnode, l *Lockfile) {
	entries := v.members(n, "dependencies", nil)
	owners := map[string]urlOwner{}
	for _, m := range n.members {
		if e, ok := entries[m.key]; !ok || e.keyPos != m.keyPos {
			continue
		}
		what := fmt.Sprintf("dependency %q", m.key)
		if msg := checkDependencyName(m.key); msg != "" {
			v.errAt(m.keyPos, "%s: %s", what, msg)
			continue
		}
		fields := v.members(m.val, what, []string{"urls", "sha256", "integrity", "size", "archive", "strip_prefix"})
		if fields == nil {
			continue
		}
		d := &Dependency{Name: m.key}
		var sums []Checksum
		if f, ok := fields["sha256"]; ok {
			if s, ok := v.str(f.val, what+": sha256"); ok {
				if c, err := ParseSHA256Hex(s); err != nil {
					v.errAt(f.val.pos, "%s: sha256 %q: want 64 lowercase hex characters", what, short(s))
				} else {
					d.SHA256 = s
					sums = append(sums, c)
				}
			}
		}
		if f, ok := fields["integrity"]; ok {
			if s, ok := v.str(f.val, what+": integrity"); ok {
				if c, err := ParseSRI(s); err != nil {
					v.errAt(f.val.pos, "%s: %s", what, status.Convert(err).Message())
				} else if merged, err := MergeChecksums(sums, []Checksum{c}); err != nil {
					v.errAt(f.val.pos, "%s: integrity disagrees with sha256: %v", what, err)
				} else {
					d.Integrity = s
					sums = merged
				}
			}
		}
		_, hasSHA := fields["sha256"]
		_, hasSRI := fields["integrity"]
		if !hasSHA && !hasSRI {
			v.errAt(m.val.pos, "%s: pins no checksum: want \"sha256\" or \"integrity\"", what)
		}
		if f, ok := fields["size"]; ok {
			if s, ok := v.integer(f.val, what+": size"); ok {
				d.Size = s
			}
		}
		if f, ok := fields["archive"]; ok {
			if s, ok := v.str(f.val, what+": archive"); ok {
				if !contains(ArchiveTypes, s) {
					v.errAt(f.val.pos, "%s: unknown archive type %q (known: %s)", what, short(s), strings.Join(ArchiveTypes, ", "))
				}
				d.Archive = s
			}
		}
		if f, ok := fields["strip_prefix"]; ok {
			if s, ok := v.str(f.val, what+": strip_prefix"); ok {
				if msg := checkStripPrefix(s); msg != "" {
					v.errAt(f.val.pos, "%s: strip_prefix %q: %s", what, short(s), msg)
				}
				d.StripPrefix = s
			}
		}
		f, ok := fields["urls"]
		if !ok {
			v.errAt(m.val.pos, "%s: missing \"urls\"", what)
		} else if f.val.kind != jArray {
			v.errAt(f.val.pos, "%s: urls: want an array of strings, got %s", what, f.val.kind)
		} else if len(f.val.elems) == 0 {
			v.errAt(f.val.pos, "%s: urls: want at least one URL", what)
		} else {
			seen := map[string]int{}
			for _, e := range f.val.elems {
				s, ok := v.str(e, what+": urls")
				if !ok {
					continue
				}
				if msg := CheckURL(s); msg != "" {
					v.errAt(e.pos, "%s: URL %q: %s", what, short(RedactURL(s)), msg)
					continue
				}
				key := normalizeURL(s)
				if first, dup := seen[key]; dup {
					fl, fc := lineCol(v.data, first)
					v.errAt(e.pos, "%s: URL %q listed twice (first at %d:%d)", what, short(s), fl, fc)
					continue
				}
				seen[key] = e.pos
				if o, dup := owners[key]; dup && len(sums) > 0 {
					if _, err := MergeChecksums(o.sums, sums); err != nil {
						ol, oc := lineCol(v.data, o.pos)
						v.errAt(e.pos, "%s: URL %q is also pinned by dependency %q (at %d:%d) to different content", what, short(s), o.name, ol, oc)
						continue
					}
				} else if !dup && len(sums) > 0 {
					owners[key] = urlOwner{name: m.key, pos: e.pos, sums: sums}
				}
				d.URLs = append(d.URLs, s)
			}
		}
		l.Dependencies[m.key] = d
	}
}

// checkDependencyName accepts the names Bazel accepts for repositories, plus '+'.
func checkDependencyName(s string) string {
	if s == "" {
		return "empty name"
	}
	if len(s) > 128 {
		return "name longer than 128 bytes"
	}
	for i, r := range s {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-' || r == '.' || r == '+'
		if !ok || i == 0 && (r == '-' || r == '.' || r == '+') {
			return "want letters, digits, '_', '-', '.' or '+', starting with a letter, digit or '_'"
		}
	}
	return ""
}

// CheckURL returns why s cannot be a dependency URL, or "" if it can: it must be an
// absolute http or https URL with a host, no credentials and no fragment.
func CheckURL(s string) string {
	if strings.TrimSpace(s) != s || strings.ContainsAny(s, " \t\r\n") {
		return "contains white space"
	}
	u, err := url.Parse(s)
	if err != nil {
		return "not a URL"
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		return "want an http or https URL"
	case u.Host == "" || u.Hostname() == "":
		return "no host"
	case u.User != nil:
		return "must not carry credentials (they would be written to the lockfile and logs)"
	case u.Fragment != "" || strings.Contains(s, "#"):
		return "must not have a fragment"
	}
	if p := u.Port(); p != "" {
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 || n > 65535 {
			return "bad port"
		}
	}
	return ""
}

func checkStripPrefix(s string) string {
	if s == "" {
		return "empty (omit it instead)"
	}
	t := strings.TrimSuffix(s, "/")
	if strings.HasPrefix(s, "/") || path.Clean(t) != t || t == "." || t == ".." || strings.HasPrefix(t, "../") {
		return "want a clean relative path inside the archive"
	}
	return ""
}

// normalizeURL lowercases scheme and host so that equivalent spellings match.
func normalizeURL(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return s
	}
	u.Scheme = strings.ToLower(u.Scheme)
	u.Host = strings.ToLower(u.Host)
	return u.String()
}
