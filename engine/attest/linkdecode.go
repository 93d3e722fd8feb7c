package attest

import (
	"encoding/json"
	"unicode/utf8"

	"github.com/in-toto/in-toto-golang/in_toto"
)

// decodeLinkFast reads a link payload without encoding/json, whose reflection and
// per-byte scanning were a quarter of the CPU of verifying a link (kiln gate decides
// over 1,000 of them). It accepts only JSON it understands completely: the seven
// fields of in_toto.Link under their exact names, each at most once; materials and
// products as objects of objects of strings; command as an array of strings;
// byproducts and environment as objects of any JSON values; no duplicate keys at any
// depth; strings of valid UTF-8 whose escapes are not surrogates; _type "link"; only
// whitespace after. For such input it returns what DecodeLink's encoding/json pass
// returns (FuzzDecodeLinkFast checks this); for anything else ok is false and the
// caller decodes with encoding/json, which gives the value or the error.
func decodeLinkFast(b []byte) (in_toto.Link, bool) {
	var l in_toto.Link
	d := linkScanner{b: b}
	seen := map[string]bool{}
	d.space()
	ok := d.members(func(key string) bool {
		if seen[key] {
			return false
		}
		seen[key] = true
		switch key {
		case "_type":
			return d.into(&l.Type)
		case "name":
			return d.into(&l.Name)
		case "materials":
			l.Materials = map[string]in_toto.HashObj{}
			return d.artifacts(l.Materials)
		case "products":
			l.Products = map[string]in_toto.HashObj{}
			return d.artifacts(l.Products)
		case "byproducts":
			l.ByProducts = map[string]any{}
			return d.object(l.ByProducts)
		case "environment":
			l.Environment = map[string]any{}
			return d.object(l.Environment)
		case "command":
			l.Command = []string{}
			return d.elements(func() bool {
				l.Command = append(l.Command, "")
				return d.into(&l.Command[len(l.Command)-1])
			})
		}
		return false
	})
	d.space()
	return l, ok && d.i == len(d.b) && l.Type == "link"
}

// maxLinkDepth bounds the nesting of byproduct and environment values the fast
// decoder follows; deeper documents go to encoding/json.
const maxLinkDepth = 64

// linkScanner is decodeLinkFast's position in its input.
type linkScanner struct {
	b     []byte
	i     int
	depth int
}

func (d *linkScanner) space() {
	for d.i < len(d.b) {
		switch d.b[d.i] {
		case ' ', '\t', '\n', '\r':
			d.i++
		default:
			return
		}
	}
}

// eat consumes c if it is next.
func (d *linkScanner) eat(c byte) bool {
	if d.i < len(d.b) && d.b[d.i] == c {
		d.i++
		return true
	}
	return false
}

// str reads a string.
func (d *linkScanner) str() (string, bool) {
	if !d.eat('"') {
		return "", false
	}
	start := d.i
	for d.i < len(d.b) {
		c := d.b[d.i]
		switch {
		case c == '"':
			s := d.b[start:d.i]
			d.i++
			if string(s) == AlgSHA256 {
				return AlgSHA256, true // the most frequent string: no copy
			}
			return string(s), true
		case c == '\\':
			return d.escaped(start)
		case c < 0x20:
			return "", false
		case c < utf8.RuneSelf:
			d.i++
		default:
			r, n := utf8.DecodeRune(d.b[d.i:])
			if r == utf8.RuneError && n == 1 {
				return "", false // encoding/json would replace it with U+FFFD
			}
			d.i += n
		}
	}
	return "", false
}

// into reads a string into *s.
func (d *linkScanner) into(s *string) bool {
	v, ok := d.str()
	*s = v
	return ok
}

// escaped reads the rest of a string that started at start and has an escape at d.i.
func (d *linkScanner) escaped(start int) (string, bool) {
	buf := append(make([]byte, 0, d.i-start+16), d.b[start:d.i]...)
	for d.i < len(d.b) {
		c := d.b[d.i]
		switch {
		case c == '"':
			d.i++
			return string(buf), true
		case c == '\\':
			if d.i+1 >= len(d.b) {
				return "", false
			}
			e := d.b[d.i+1]
			d.i += 2
			switch e {
			case '"', '\\', '/':
				buf = append(buf, e)
			case 'b':
				buf = append(buf, '\b')
			case 'f':
				buf = append(buf, '\f')
			case 'n':
				buf = append(buf, '\n')
			case 'r':
				buf = append(buf, '\r')
			case 't':
				buf = append(buf, '\t')
			case 'u':
				r, ok := d.hex4()
				if !ok || (r >= 0xd800 && r < 0xe000) {
					return "", false // surrogates: encoding/json pairs or replaces them
				}
				buf = utf8.AppendRune(buf, r)
			default:
				return "", false
			}
		case c < 0x20:
			return "", false
		case c < utf8.RuneSelf:
			buf = append(buf, c)
			d.i++
		default:
			r, n := utf8.DecodeRune(d.b[d.i:])
			if r == utf8.RuneError && n == 1 {
				return "", false
			}
			buf = append(buf, d.b[d.i:d.i+n]...)
			d.i += n
		}
	}
	return "", false
}

// hex4 reads the four hex digits of a \u escape.
func (d *linkScanner) hex4() (rune, bool) {
	if d.i+4 > len(d.b) {
		return 0, false
	}
	var r rune
	for _, c := range d.b[d.i : d.i+4] {
		switch {
		case '0' <= c && c <= '9':
			c -= '0'
		case 'a' <= c && c <= 'f':
			c = c - 'a' + 10
		case 'A' <= c && c <= 'F':
			c = c - 'A' + 10
		default:
			return 0, false
		}
		r = r<<4 | rune(c)
	}
	d.i += 4
	return r, true
}

// members reads an object's members, calling member with each key once the value is
// next; keys must differ.
func (d *linkScanner) members(member func(key string) bool) bool {
	if !d.eat('{') {
		return false
	}
	d.space()
	if d.eat('}') {
		return true
	}
	for {
		d.space()
		key, ok := d.str()
		if !ok {
			return false
		}
		d.space()
		if !d.eat(':') {
			return false
		}
		d.space()
		if !member(key) {
			return false
		}
		d.space()
		if d.eat('}') {
			return true
		}
		if !d.eat(',') {
			return false
		}
	}
}

// artifacts reads materials or products into out: path -> algorithm -> hash.
func (d *linkScanner) artifacts(out map[string]in_toto.HashObj) bool {
	return d.members(func(path string) bool {
		if _, dup := out[path]; dup {
			return false
		}
		h := in_toto.HashObj{}
		out[path] = h
		return d.members(func(alg string) bool {
			if _, dup := h[alg]; dup {
				return false
			}
			v, ok := d.str()
			h[alg] = v
			return ok
		})
	})
}

// elements reads an array's elements, calling element when each is next.
func (d *linkScanner) elements(element func() bool) bool {
	if !d.eat('[') {
		return false
	}
	d.space()
	if d.eat(']') {
		return true
	}
	for {
		d.space()
		if !element() {
			return false
		}
		d.space()
		if d.eat(']') {
			return true
		}
		if !d.eat(',') {
			return false
		}
	}
}

// object reads an object of any values into out, as encoding/json decodes one into
// map[string]any with UseNumber.
func (d *linkScanner) object(out map[string]any) bool {
	if d.depth++; d.depth > maxLinkDepth {
		return false
	}
	defer func() { d.depth-- }()
	return d.members(func(key string) bool {
		if _, dup := out[key]; dup {
			return false
		}
		v, ok := d.value()
		out[key] = v
		return ok
	})
}

// value reads any JSON value.
func (d *linkScanner) value() (any, bool) {
	if d.i >= len(d.b) {
		return nil, false
	}
	switch c := d.b[d.i]; c {
	case '"':
		return d.str()
	case '{':
		m := map[string]any{}
		return m, d.object(m)
	case '[':
		return d.array()
	case 't':
		return true, d.literal("true")
	case 'f':
		return false, d.literal("false")
	case 'n':
		return nil, d.literal("null")
	default:
		return d.number()
	}
}

// literal consumes word.
func (d *linkScanner) literal(word string) bool {
	if len(d.b)-d.i < len(word) || string(d.b[d.i:d.i+len(word)]) != word {
		return false
	}
	d.i += len(word)
	return true
}

// array reads an array of any values.
func (d *linkScanner) array() (any, bool) {
	if d.depth++; d.depth > maxLinkDepth {
		return nil, false
	}
	defer func() { d.depth-- }()
	out := []any{}
	ok := d.elements(func() bool {
		v, ok := d.value()
		out = append(out, v)
		return ok
	})
	return out, ok
}

// number reads a number by JSON's grammar, kept as its literal (UseNumber).
func (d *linkScanner) number() (any, bool) {
	start := d.i
	d.eat('-')
	switch {
	case d.eat('0'):
	case d.digit():
		for d.digit() {
		}
	default:
		return nil, false
	}
	if d.eat('.') {
		if !d.digit() {
			return nil, false
		}
		for d.digit() {
		}
	}
	if d.eat('e') || d.eat('E') {
		if !d.eat('+') {
			d.eat('-')
		}
		if !d.digit() {
			return nil, false
		}
		for d.digit() {
		}
	}
	return json.Number(d.b[start:d.i]), true
}

// digit consumes one decimal digit.
func (d *linkScanner) digit() bool {
	if d.i < len(d.b) && '0' <= d.b[d.i] && d.b[d.i] <= '9' {
		d.i++
		return true
	}
	return false
}
