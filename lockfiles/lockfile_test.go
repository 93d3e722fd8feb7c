package lockfiles

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const (
	hexA = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	hexB = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
)

func sriOf(algo string, data []byte) string {
	var sum []byte
	switch algo {
	case SHA256:
		s := sha256.Sum256(data)
		sum = s[:]
	case SHA384:
		s := sha512.Sum384(data)
		sum = s[:]
	case SHA512:
		s := sha512.Sum512(data)
		sum = s[:]
	}
	return algo + "-" + base64.StdEncoding.EncodeToString(sum)
}

// validLock is a lockfile in canonical form, used for the round trip.
var validLock = `{
  "version": 1,
  "toolchains": {
    "debian:12": {
      "digest": "sha256:` + hexA + `",
      "source": "docker.io/library/debian:12@sha256:` + hexA + `"
    },
    "gcc": {
      "digest": "sha256:` + hexB + `"
    }
  },
  "dependencies": {
    "rules_x": {
      "urls": [
        "https://mirror.example/x-1.0.tar.gz",
        "https://github.example/x/archive/v1.0.tar.gz?a=1&b=2"
      ],
      "sha256": "` + hexA + `",
      "size": 1234,
      "archive": "tar.gz",
      "strip_prefix": "x-1.0"
    },
    "zlib": {
      "urls": [
        "http://127.0.0.1:8080/zlib.tgz"
      ],
      "integrity": "` + sriOf(SHA384, []byte("z")) + `"
    }
  }
}
`

func TestParseValidAndRoundTrip(t *testing.T) {
	l, err := Parse("kiln.lock", []byte(validLock))
	if err != nil {
		t.Fatal(err)
	}
	if d, ok := l.PinnedDigest("debian:12"); !ok || d != "sha256:"+hexA {
		t.Errorf("PinnedDigest(debian:12) = %q, %v", d, ok)
	}
	if d, ok := l.PinnedDigest("docker.io/library/debian:12"); !ok || d != "sha256:"+hexA {
		t.Errorf("PinnedDigest(long form) = %q, %v", d, ok)
	}
	if _, ok := l.PinnedDigest("debian:11"); ok {
		t.Error("an unpinned tag resolved")
	}
	if d, ok, err := l.PinTag(context.Background(), "gcc"); err != nil || !ok || d.String() != "sha256:"+hexB {
		t.Errorf("PinTag(gcc) = %q, %v, %v", d, ok, err)
	}
	dep, ok := l.DependencyByURL("HTTPS://Mirror.Example/x-1.0.tar.gz")
	if !ok || dep.Name != "rules_x" {
		t.Fatalf("DependencyByURL: %v %v", dep, ok)
	}
	if dg, ok := dep.Digest(); !ok || dg.Hash != hexA || dg.Size != 1234 {
		t.Errorf("Digest() = %v, %v", dg, ok)
	}
	if _, ok := l.Dependencies["zlib"].Digest(); ok {
		t.Error("zlib pins no sha256 and no size: Digest() must be unknown")
	}
	out, err := l.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if string(out) != validLock {
		t.Errorf("round trip changed the file:\n%s\nwant:\n%s", out, validLock)
	}
	// Save and Load again: byte-identical, and stable under a second save.
	path := filepath.Join(t.TempDir(), "kiln.lock")
	if err := l.Save(path); err != nil {
		t.Fatal(err)
	}
	l2, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := l2.Save(path); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(path)
	if !bytes.Equal(got, []byte(validLock)) {
		t.Errorf("save/load/save is not stable:\n%s", got)
	}
}

func TestSaveSortsAndIndents(t *testing.T) {
	l := New()
	for _, n := range []string{"zeta", "alpha", "mid"} {
		if err := l.SetDependency(n, Dependency{URLs: []string{"https://h.example/" + n}, SHA256: hexA}); err != nil {
			t.Fatal(err)
		}
	}
	out, err := l.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	s := string(out)
	if !(strings.Index(s, `"alpha"`) < strings.Index(s, `"mid"`) && strings.Index(s, `"mid"`) < strings.Index(s, `"zeta"`)) {
		t.Errorf("dependencies not sorted:\n%s", s)
	}
	if !strings.HasSuffix(s, "}\n") || !strings.Contains(s, "\n  \"dependencies\": {\n    \"alpha\"") {
		t.Errorf("not 2-space indented with trailing newline:\n%s", s)
	}
	if err := l.SetDependency("bad", Dependency{URLs: []string{"ftp://x"}, SHA256: hexA}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("SetDependency with an ftp URL: %v", err)
	}
	if _, ok := l.Dependencies["bad"]; ok {
		t.Error("a refused entry was added")
	}
}

// TestParseErrors checks each problem's message and position. In the inputs, '¦' marks
// where each expected error points; the markers are removed before parsing.
func TestParseErrors(t *testing.T) {
	dep := func(body string) string {
		return "{\n  \"version\": 1,\n  \"dependencies\": {\n    \"d\": ¦{\n      " + body + "\n    }\n  }\n}\n"
	}
	depNoMark := func(body string) string { return strings.Replace(dep(body), "¦", "", 1) }
	okURL := `"urls": ["https://h.example/a"]`
	sha := `"sha256": "` + hexA + `"`
	for _, tc := range []struct {
		name, in string
		want     []string // message substrings, one per marker, in order
	}{
		{"empty file", "¦", []string{"unexpected end of file"}},
		{"not an object", "¦[]", []string{"lockfile: want an object, got an array"}},
		{"syntax error", "{\n  \"version\": 1,\n  \"toolchains\": {¦,}\n}", []string{"unexpected ',', want a quoted key"}},
		{"trailing comma", "{\n  \"version\": 1,\n¦}", []string{"trailing comma before '}'"}},
		{"trailing data", "{\"version\": 1}\n¦{}", []string{"unexpected '{' after the end of the top-level value"}},
		{"missing version", "¦{\n  \"toolchains\": {}\n}", []string{"lockfile: missing \"version\""}},
		{"unknown version", "{\n  \"version\": ¦2,\n  \"whatever\": true\n}", []string{"unknown schema version 2 (this kiln reads version 1)"}},
		{"version not int", "{\"version\": ¦\"1\"}", []string{"version: want a non-negative integer, got a string"}},
		{"unknown top field", "{\n  \"version\": 1,\n  ¦\"dependecies\": {}\n}", []string{"lockfile: unknown field \"dependecies\""}},
		{"duplicate top key", "{\n  \"version\": 1,\n  ¦\"version\": 1\n}", []string{"lockfile: duplicate key \"version\" (first at 2:3)"}},
		{"duplicate dependency", "{\n  \"version\": 1,\n  \"dependencies\": {\n    \"a\": {" + okURL + ", " + sha + "},\n    ¦\"a\": {" + okURL + ", \"sha256\": \"" + hexB + "\"}\n  }\n}",
			[]string{"dependencies: duplicate key \"a\" (first at 4:5)"}},
		{"duplicate toolchain", "{\n  \"version\": 1,\n  \"toolchains\": {\n    \"t\": {\"digest\": \"sha256:" + hexA + "\"},\n    ¦\"t\": {\"digest\": \"sha256:" + hexB + "\"}\n  }\n}",
			[]string{"toolchains: duplicate key \"t\" (first at 4:5)"}},
		{"toolchain aliases", "{\n  \"version\": 1,\n  \"toolchains\": {\n    \"debian:12\": {\"digest\": \"sha256:" + hexA + "\"},\n    ¦\"docker.io/library/debian:12\": {\"digest\": \"sha256:" + hexB + "\"}\n  }\n}",
			[]string{"toolchain \"docker.io/library/debian:12\": names the same image as \"debian:12\" (at 4:5)"}},
		{"bad toolchain digest", "{\n  \"version\": 1,\n  \"toolchains\": {\n    \"t\": {\"digest\": ¦\"sha256:ABC\"}\n  }\n}",
			[]string{"toolchain \"t\": digest \"sha256:ABC\": want sha256:<64 lowercase hex>"}},
		{"toolchain missing digest", "{\"version\": 1, \"toolchains\": {\"t\": ¦{\"source\": \"x\"}}}", []string{"toolchain \"t\": missing \"digest\""}},
		{"toolchain key with digest", "{\"version\": 1, \"toolchains\": {¦\"a@sha256:" + hexA + "\": {\"digest\": \"sha256:" + hexA + "\"}}}",
			[]string{"a reference with a digest needs no pin"}},
		{"toolchain unknown field", "{\"version\": 1, \"toolchains\": {\"t\": {\"digest\": \"sha256:" + hexA + "\", ¦\"tag\": \"x\"}}}",
			[]string{"toolchain \"t\": unknown field \"tag\" (known: digest, source)"}},
		{"uppercase sha256", depNoMark(okURL + `, "sha256": ¦"` + strings.ToUpper(hexA) + `"`), []string{"dependency \"d\": sha256 \"AAAA"}},
		{"short sha256", depNoMark(okURL + `, "sha256": ¦"abc"`), []string{"dependency \"d\": sha256 \"abc\": want 64 lowercase hex characters"}},
		{"bad integrity", depNoMark(okURL + `, "integrity": ¦"sha256-!!"`), []string{"dependency \"d\": integrity \"sha256-!!\": not base64"}},
		{"md5 integrity", depNoMark(okURL + `, "integrity": ¦"md5-AAAA"`), []string{"unsupported algorithm \"md5\""}},
		{"integrity disagrees", depNoMark(okURL + `, ` + sha + `, "integrity": ¦"` + sriOf(SHA256, []byte("x")) + `"`),
			[]string{"integrity disagrees with sha256"}},
		{"no checksum", dep(okURL), []string{"dependency \"d\": pins no checksum: want \"sha256\" or \"integrity\""}},
		{"no urls", dep(sha), []string{"dependency \"d\": missing \"urls\""}},
		{"empty urls", depNoMark(`"urls": ¦[], ` + sha), []string{"dependency \"d\": urls: want at least one URL"}},
		{"urls not array", depNoMark(`"urls": ¦"https://h.example/a", ` + sha), []string{"urls: want an array of strings, got a string"}},
		{"ftp url", depNoMark(`"urls": [¦"ftp://h.example/a"], ` + sha), []string{"dependency \"d\": URL \"ftp://h.example/a\": want an http or https URL"}},
		{"relative url", depNoMark(`"urls": [¦"/a/b"], ` + sha), []string{"URL \"/a/b\": want an http or https URL"}},
		{"url with credentials", depNoMark(`"urls": [¦"https://u:s3cr3t@h.example/a"], ` + sha),
			[]string{"dependency \"d\": URL \"https://h.example/a\": must not carry credentials"}},
		{"url with space", depNoMark(`"urls": [¦"https://h.example/a b"], ` + sha), []string{"contains white space"}},
		{"url with fragment", depNoMark(`"urls": [¦"https://h.example/a#x"], ` + sha), []string{"must not have a fragment"}},
		{"url twice", depNoMark(`"urls": ["https://h.example/a",` + "\n        ¦" + `"https://H.EXAMPLE/a"], ` + sha),
			[]string{"URL \"https://H.EXAMPLE/a\" listed twice (first at 5:16)"}},
		{"url pinned twice differently", "{\"version\": 1, \"dependencies\": {\n\"a\": {" + okURL + ", " + sha + "},\n\"b\": {\"urls\": [¦\"https://h.example/a\"], \"sha256\": \"" + hexB + "\"}}}",
			[]string{"dependency \"b\": URL \"https://h.example/a\" is also pinned by dependency \"a\" (at 2:16) to different content"}},
		{"size negative", depNoMark(okURL + `, ` + sha + `, "size": ¦-1`), []string{"dependency \"d\": size: want a non-negative integer, got -1"}},
		{"size fraction", depNoMark(okURL + `, ` + sha + `, "size": ¦1.5`), []string{"size: want a non-negative integer, got 1.5"}},
		{"size string", depNoMark(okURL + `, ` + sha + `, "size": ¦"1"`), []string{"size: want a non-negative integer, got a string"}},
		{"unknown archive", depNoMark(okURL + `, ` + sha + `, "archive": ¦"rar"`), []string{"unknown archive type \"rar\""}},
		{"escaping strip_prefix", depNoMark(okURL + `, ` + sha + `, "strip_prefix": ¦"../x"`), []string{"strip_prefix \"../x\": want a clean relative path"}},
		{"unknown dependency field", depNoMark(okURL + `, ` + sha + `, ¦"sha_256": "x"`), []string{"dependency \"d\": unknown field \"sha_256\""}},
		{"bad dependency name", "{\"version\": 1, \"dependencies\": {¦\"-x\": {" + okURL + ", " + sha + "}}}",
			[]string{"dependency \"-x\": want letters, digits"}},
		{"several problems, in document order", "{\n  \"version\": 1,\n  \"toolchains\": {\"t\": {\"digest\": ¦\"md5:x\"}},\n  ¦\"bogus\": 1,\n  ¦\"version\": 1\n}",
			[]string{"toolchain \"t\": digest", "unknown field \"bogus\"", "duplicate key \"version\""}},
		{"unterminated string", "{\"version\": 1, \"toolchains\": {¦\"t", []string{"unterminated string"}},
		{"control char in string", "{\"version\": 1, \"toolchains\": {\"t¦\x01\": {}}}", []string{"control character 0x01 in string"}},
		{"deep nesting", "{\"version\": 1, \"toolchains\": " + strings.Repeat("[", 64) + "¦[", []string{"nesting deeper than 64"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			parts := strings.Split(tc.in, "¦")
			if len(parts)-1 != len(tc.want) {
				t.Fatalf("test has %d markers for %d expected errors", len(parts)-1, len(tc.want))
			}
			src := strings.Join(parts, "")
			var positions []string
			off := 0
			for _, p := range parts[:len(parts)-1] {
				off += len(p)
				line, col := lineCol([]byte(src), off)
				positions = append(positions, fmt.Sprintf("kiln.lock:%d:%d: ", line, col))
			}
			_, err := Parse("kiln.lock", []byte(src))
			if err == nil {
				t.Fatalf("no error for:\n%s", src)
			}
			var list ErrorList
			if !errors.As(err, &list) {
				t.Fatalf("error %T is not an ErrorList: %v", err, err)
			}
			if len(list) != len(tc.want) {
				t.Fatalf("got %d errors, want %d: %v", len(list), len(tc.want), err)
			}
			for i, w := range tc.want {
				got := list[i].Error()
				if !strings.HasPrefix(got, positions[i]) || !strings.Contains(got, w) {
					t.Errorf("error %d = %q\nwant %q ... %q", i, got, positions[i], w)
				}
			}
			if status.Code(err) != codes.InvalidArgument {
				t.Errorf("code %v, want InvalidArgument", status.Code(err))
			}
		})
	}
}

// TestLineCol pins the position arithmetic the table above relies on.
func TestLineCol(t *testing.T) {
	data := []byte("ab\ncd\n\nx")
	for _, tc := range []struct{ off, line, col int }{{0, 1, 1}, {1, 1, 2}, {3, 2, 1}, {4, 2, 2}, {6, 3, 1}, {7, 4, 1}} {
		if l, c := lineCol(data, tc.off); l != tc.line || c != tc.col {
			t.Errorf("lineCol(%d) = %d:%d, want %d:%d", tc.off, l, c, tc.line, tc.col)
		}
	}
}

func TestLoadMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "kiln.lock"))
	if status.Code(err) != codes.NotFound {
		t.Fatalf("got %v, want NotFound", err)
	}
}

func TestParseIntegrity(t *testing.T) {
	data := []byte("hello")
	cs, err := ParseIntegrity(sriOf(SHA512, data) + "  sha1-AAAA " + sriOf(SHA256, data))
	if err != nil || len(cs) != 2 || cs[0].Algo != SHA512 || cs[1].Algo != SHA256 {
		t.Fatalf("got %v, %v", cs, err)
	}
	if _, err := ParseIntegrity("sha1-AAAA md5-BBBB"); status.Code(err) != codes.InvalidArgument {
		t.Errorf("only unsupported algorithms: %v", err)
	}
	if _, err := ParseIntegrity("sha256-AAAA " + sriOf(SHA512, data)); status.Code(err) != codes.InvalidArgument {
		t.Errorf("a malformed sha256 beside a good sha512 must be refused, got %v", err)
	}
}

func TestRedactURL(t *testing.T) {
	for in, want := range map[string]string{
		"https://user:pw@h.example/a?x=1":                   "https://h.example/a?x=1",
		"https://h.example/a?X-Amz-Signature=s3cr3t&part=2": "https://h.example/a?X-Amz-Signature=REDACTED&part=2",
		"https://h.example/a?access_token=s3cr3t#frag":      "https://h.example/a?access_token=REDACTED",
		"https://h.example/a?%zz=s3cr3t":                    "https://h.example/a?REDACTED",
		"https://u:s3cr3t@h.example/%zz":                    "https://h.example/(unparseable URL)",
	} {
		if got := RedactURL(in); got != want {
			t.Errorf("RedactURL(%q) = %q, want %q", in, got, want)
		}
	}
}
