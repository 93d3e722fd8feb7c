package lockfiles

import (
	"encoding/json"
	"fmt"
	"strconv"
)

// This file holds a small JSON parser that keeps the byte offset of every key and value,
// so that each validation error can name a line and column. encoding/json reports no
// position for unknown fields or duplicate keys, and it silently keeps the last of two
// duplicate keys, which would let a second entry shadow a reviewed one.

type jkind int

const (
	jNull jkind = iota
	jBool
	jNumber
	jString
	jArray
	jObject
)

func (k jkind) String() string {
	return [...]string{"null", "a boolean", "a number", "a string", "an array", "an object"}[k]
}

// jnode is one JSON value and where it starts.
type jnode struct {
	kind    jkind
	pos     int
	str     string // jString: the decoded string; jNumber: the literal
	b       bool
	elems   []*jnode
	members []jmember
}

// jmember is one key of an object, in document order (duplicates kept).
type jmember struct {
	key    string
	keyPos int
	val    *jnode
}

// maxDepth bounds nesting so a hostile file cannot exhaust the stack.
const maxDepth = 64

// posErr is an error at a byte offset of the input.
type posErr struct {
	pos int
	msg string
}

func (e *posErr) Error() string { return e.msg }

type jparser struct {
	data []byte
	i    int
}

// parseJSON parses one JSON value that must fill the whole input (trailing whitespace aside).
func parseJSON(data []byte) (*jnode, error) {
	p := &jparser{data: data}
	p.ws()
	n, err := p.value(0)
	if err != nil {
		return nil, err
	}
	p.ws()
	if p.i < len(p.data) {
		return nil, p.errf(p.i, "unexpected %s after the end of the top-level value", p.describe(p.i))
	}
	return n, nil
}

func (p *jparser) errf(pos int, format string, args ...any) error {
	return &posErr{pos: pos, msg: fmt.Sprintf(format, args...)}
}

func (p *jparser) describe(i int) string {
	if i >= len(p.data) {
		return "end of file"
	}
	c := p.data[i]
	if c >= 0x20 && c < 0x7f {
		return strconv.QuoteRune(rune(c))
	}
	return fmt.Sprintf("byte 0x%02x", c)
}

func (p *jparser) ws() {
	for p.i < len(p.data) {
		switch p.data[p.i] {
		case ' ', '\t', '\n', '\r':
			p.i++
		default:
			return
		}
	}
}

func (p *jparser) value(depth int) (*jnode, error) {
	if depth > maxDepth {
		return nil, p.errf(p.i, "nesting deeper than %d levels", maxDepth)
	}
	if p.i >= len(p.data) {
		return nil, p.errf(p.i, "unexpected end of file, want a value")
	}
	start := p.i
	switch c := p.data[p.i]; {
	case c == '{':
		return p.object(depth)
	case c == '[':
		return p.array(depth)
	case c == '"':
		s, err := p.string()
		if err != nil {
			return nil, err
		}
		return &jnode{kind: jString, pos: start, str: s}, nil
	case c == 't' || c == 'f' || c == 'n':
		for _, lit := range []string{"true", "false", "null"} {
			if len(p.data)-p.i >= len(lit) && string(p.data[p.i:p.i+len(lit)]) == lit {
				p.i += len(lit)
				if lit == "null" {
					return &jnode{kind: jNull, pos: start}, nil
				}
				return &jnode{kind: jBool, pos: start, b: lit == "true"}, nil
			}
		}
		return nil, p.errf(start, "invalid literal, want true, false or null")
	case c == '-' || c >= '0' && c <= '9':
		return p.number()
	default:
		return nil, p.errf(start, "unexpected %s, want a value", p.describe(start))
	}
}

func (p *jparser) object(depth int) (*jnode, error) {
	n := &jnode{kind: jObject, pos: p.i}
	p.i++ // {
	p.ws()
	if p.i < len(p.data) && p.data[p.i] == '}' {
		p.i++
		return n, nil
	}
	for {
		p.ws()
		if p.i >= len(p.data) || p.data[p.i] != '"' {
			return nil, p.errf(p.i, "unexpected %s, want a quoted key", p.describe(p.i))
		}
		keyPos := p.i
		key, err := p.string()
		if err != nil {
			return nil, err
		}
		p.ws()
		if p.i >= len(p.data) || p.data[p.i] != ':' {
			return nil, p.errf(p.i, "unexpected %s after key %q, want ':'", p.describe(p.i), key)
		}
		p.i++
		p.ws()
		v, err := p.value(depth + 1)
		if err != nil {
			return nil, err
		}
		n.members = append(n.members, jmember{key: key, keyPos: keyPos, val: v})
		p.ws()
		if p.i >= len(p.data) {
			return nil, p.errf(p.i, "unexpected end of file, want ',' or '}'")
		}
		switch p.data[p.i] {
		case ',':
			p.i++
			p.ws()
			if p.i < len(p.data) && p.data[p.i] == '}' {
				return nil, p.errf(p.i, "trailing comma before '}'")
			}
		case '}':
			p.i++
			return n, nil
		default:
			return nil, p.errf(p.i, "unexpected %s, want ',' or '}'", p.describe(p.i))
		}
	}
}

func (p *jparser) array(depth int) (*jnode, error) {
	n := &jnode{kind: jArray, pos: p.i}
	p.i++ // [
	p.ws()
	if p.i < len(p.data) && p.data[p.i] == ']' {
		p.i++
		return n, nil
	}
	for {
		p.ws()
		v, err := p.value(depth + 1)
		if err != nil {
			return nil, err
		}
		n.elems = append(n.elems, v)
		p.ws()
		if p.i >= len(p.data) {
			return nil, p.errf(p.i, "unexpected end of file, want ',' or ']'")
		}
		switch p.data[p.i] {
		case ',':
			p.i++
			p.ws()
			if p.i < len(p.data) && p.data[p.i] == ']' {
				return nil, p.errf(p.i, "trailing comma before ']'")
			}
		case ']':
			p.i++
			return n, nil
		default:
			return nil, p.errf(p.i, "unexpected %s, want ',' or ']'", p.describe(p.i))
		}
	}
}

// string scans a quoted string starting at p.i and decodes it with encoding/json, which
// knows every escape; the scan only finds where it ends.
func (p *jparser) string() (string, error) {
	start := p.i
	i := p.i + 1
	for i < len(p.data) {
		c := p.data[i]
		switch {
		case c == '"':
			var s string
			if err := json.Unmarshal(p.data[start:i+1], &s); err != nil {
				return "", p.errf(start, "invalid string: %v", err)
			}
			p.i = i + 1
			return s, nil
		case c == '\\':
			i += 2
		case c < 0x20:
			return "", p.errf(i, "control character 0x%02x in string (escape it)", c)
		default:
			i++
		}
	}
	return "", p.errf(start, "unterminated string")
}

func (p *jparser) number() (*jnode, error) {
	start := p.i
	i := p.i
	for i < len(p.data) {
		c := p.data[i]
		if c == '-' || c == '+' || c == '.' || c == 'e' || c == 'E' || c >= '0' && c <= '9' {
			i++
			continue
		}
		break
	}
	lit := string(p.data[start:i])
	if !json.Valid(p.data[start:i]) {
		return nil, p.errf(start, "invalid number %q", lit)
	}
	p.i = i
	return &jnode{kind: jNumber, pos: start, str: lit}, nil
}

// lineCol converts a byte offset to a 1-based line and a 1-based byte column.
func lineCol(data []byte, pos int) (line, col int) {
	if pos > len(data) {
		pos = len(data)
	}
	line, lineStart := 1, 0
	for i := 0; i < pos; i++ {
		if data[i] == '\n' {
			line++
			lineStart = i + 1
		}
	}
	return line, pos - lineStart + 1
}
