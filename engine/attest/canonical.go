package attest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"unicode/utf16"
	"unicode/utf8"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// CanonicalJSON encodes v (anything encoding/json marshals) as RFC 8785 canonical JSON
// (JCS): object keys sorted by UTF-16 code units, no insignificant whitespace, strings
// with only the escapes JSON requires, integers only.
//
// Every payload kiln signs goes through it, so equal values give equal bytes on every
// host. in-toto-golang's own cjson (OLPC canonical JSON) is not used because it writes
// control characters raw, which no JSON parser accepts: a `sh -c` script with a newline
// in argv would give a link that in-toto-golang itself cannot load.
func CanonicalJSON(v any) ([]byte, error) {
	raw, err := json.Marshal(v)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "canonical json: %v", err)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var tree any
	if err := dec.Decode(&tree); err != nil {
		return nil, status.Errorf(codes.Internal, "canonical json: %v", err)
	}
	var buf bytes.Buffer
	buf.Grow(len(raw))
	if err := encodeCanonical(&buf, tree); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// canonicalTree encodes a tree of the plain types Action.Payload builds (strings,
// ints, bools, slices and string-keyed maps of them) without the encoding/json round
// trip CanonicalJSON makes; the result is the same bytes.
func canonicalTree(tree any, sizeHint int) ([]byte, error) {
	var buf bytes.Buffer
	buf.Grow(sizeHint)
	if err := encodeCanonical(&buf, tree); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// maxSafeInteger bounds the integers JCS can carry exactly (IEEE-754 doubles).
const maxSafeInteger = 1<<53 - 1

func encodeCanonical(buf *bytes.Buffer, v any) error {
	switch x := v.(type) {
	case nil:
		buf.WriteString("null")
	case bool:
		if x {
			buf.WriteString("true")
		} else {
			buf.WriteString("false")
		}
	case json.Number:
		n, err := strconv.ParseInt(string(x), 10, 64)
		if err != nil || n > maxSafeInteger || n < -maxSafeInteger {
			return status.Errorf(codes.InvalidArgument, "canonical json: number %s is not an integer within ±2^53", x)
		}
		buf.WriteString(strconv.FormatInt(n, 10))
	case int:
		if x > maxSafeInteger || x < -maxSafeInteger {
			return status.Errorf(codes.InvalidArgument, "canonical json: number %d is not within ±2^53", x)
		}
		buf.WriteString(strconv.Itoa(x))
	case string:
		return encodeString(buf, x)
	case []string:
		buf.WriteByte('[')
		for i, e := range x {
			if i > 0 {
				buf.WriteByte(',')
			}
			if err := encodeString(buf, e); err != nil {
				return err
			}
		}
		buf.WriteByte(']')
	case map[string]string:
		return encodeMap(buf, x)
	case map[string]map[string]string:
		return encodeMap(buf, x)
	case []any:
		buf.WriteByte('[')
		for i, e := range x {
			if i > 0 {
				buf.WriteByte(',')
			}
			if err := encodeCanonical(buf, e); err != nil {
				return err
			}
		}
		buf.WriteByte(']')
	case map[string]any:
		return encodeMap(buf, x)
	default:
		return status.Errorf(codes.Internal, "canonical json: unexpected %T", v)
	}
	return nil
}

func encodeMap[V any](buf *bytes.Buffer, m map[string]V) error {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sortKeys(keys)
	buf.WriteByte('{')
	for i, k := range keys {
		if i > 0 {
			buf.WriteByte(',')
		}
		if err := encodeString(buf, k); err != nil {
			return err
		}
		buf.WriteByte(':')
		if err := encodeCanonical(buf, any(m[k])); err != nil {
			return err
		}
	}
	buf.WriteByte('}')
	return nil
}

func encodeString(buf *bytes.Buffer, s string) error {
	if !utf8.ValidString(s) {
		return status.Errorf(codes.InvalidArgument, "canonical json: string %q is not valid UTF-8", s)
	}
	buf.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"':
			buf.WriteString(`\"`)
		case r == '\\':
			buf.WriteString(`\\`)
		case r == '\b':
			buf.WriteString(`\b`)
		case r == '\f':
			buf.WriteString(`\f`)
		case r == '\n':
			buf.WriteString(`\n`)
		case r == '\r':
			buf.WriteString(`\r`)
		case r == '\t':
			buf.WriteString(`\t`)
		case r < 0x20:
			fmt.Fprintf(buf, `\u%04x`, r)
		default:
			buf.WriteRune(r)
		}
	}
	buf.WriteByte('"')
	return nil
}

// sortKeys sorts object keys by UTF-16 code units; byte order when no key has a rune
// where the two orders differ.
func sortKeys(keys []string) {
	for _, k := range keys {
		if hasHighRunes(k) {
			sort.Slice(keys, func(i, j int) bool { return lessUTF16(keys[i], keys[j]) })
			return
		}
	}
	sort.Strings(keys)
}

// lessUTF16 orders strings by their UTF-16 code units, as RFC 8785 sorts object keys.
func lessUTF16(a, b string) bool {
	ua, ub := utf16.Encode([]rune(a)), utf16.Encode([]rune(b))
	for i := 0; i < len(ua) && i < len(ub); i++ {
		if ua[i] != ub[i] {
			return ua[i] < ub[i]
		}
	}
	return len(ua) < len(ub)
}

// hasHighRunes reports whether s has a rune whose UTF-8 order may differ from its
// UTF-16 order: UTF-8 byte order is code point order, which differs from UTF-16 order
// only between supplementary characters and U+E000..U+FFFF (lead bytes 0xEE and up).
func hasHighRunes(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0xEE {
			return true
		}
	}
	return false
}
