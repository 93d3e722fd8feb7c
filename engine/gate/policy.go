package gate

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/google/cel-go/cel"
	"github.com/google/cel-go/common/types"
	"github.com/google/cel-go/common/types/ref"
	"github.com/google/cel-go/common/types/traits"
	"github.com/google/cel-go/ext"
	"go.yaml.in/yaml/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// maxPolicySize bounds what LoadPolicy reads.
const maxPolicySize = 1 << 20

// Policy is a compiled gate policy: named rules in CEL over the input document (see
// docs/gate.md), and the parameters they read.
type Policy struct {
	// Name is where the policy came from (its file name); SHA256 is its content's hash,
	// named in every decision.
	Name   string
	SHA256 string
	// Stage, if set, is the only stage the policy decides for.
	Stage  string
	params any
	rules  []*rule
}

// rule is one compiled rule. With forEach, fails is forEach filtered by !require;
// without, check is require itself.
type rule struct {
	name        string
	line        int // of the rule in the file
	fails       cel.Program
	check       cel.Program
	forEach     bool
	attestation cel.Program // nil: the subject
	message     cel.Program // nil: "rule NAME failed"
}

// policyFile is the YAML form of a policy.
type policyFile struct {
	Stage  string      `yaml:"stage"`
	Params yaml.Node   `yaml:"params"`
	Rules  []yaml.Node `yaml:"rules"`
}

type ruleFile struct {
	Name        string    `yaml:"name"`
	ForEach     yaml.Node `yaml:"for_each"`
	Require     yaml.Node `yaml:"require"`
	Attestation yaml.Node `yaml:"attestation"`
	Message     yaml.Node `yaml:"message"`
}

// PolicyError is a policy that cannot be used, at a position in its file.
type PolicyError struct {
	File      string
	Line, Col int
	Msg       string
}

func (e *PolicyError) Error() string {
	if e.Col > 0 {
		return fmt.Sprintf("%s:%d:%d: %s", e.File, e.Line, e.Col, e.Msg)
	}
	return fmt.Sprintf("%s:%d: %s", e.File, e.Line, e.Msg)
}

// GRPCStatus makes a policy error INVALID_ARGUMENT.
func (e *PolicyError) GRPCStatus() *status.Status {
	return status.New(codes.InvalidArgument, e.Error())
}

// LoadPolicy reads and compiles the policy file at path.
func LoadPolicy(path string) (*Policy, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "policy: %v", err)
	}
	if fi.Size() > maxPolicySize {
		return nil, status.Errorf(codes.InvalidArgument, "policy %s is larger than %d bytes", path, maxPolicySize)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "policy: %v", err)
	}
	return ParsePolicy(path, b)
}

var yamlLine = regexp.MustCompile(`line (\d+): `)

// yamlError turns a YAML decoding error into a PolicyError at its first line.
func yamlError(name string, err error) error {
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	msg = strings.TrimPrefix(msg, "unmarshal errors:\n")
	msg = strings.Join(strings.Fields(msg), " ")
	if m := yamlLine.FindStringSubmatchIndex(msg); m != nil {
		line, _ := strconv.Atoi(msg[m[2]:m[3]])
		return &PolicyError{File: name, Line: line, Msg: msg[:m[0]] + msg[m[1]:]}
	}
	return &PolicyError{File: name, Line: 1, Msg: msg}
}

// env is the CEL environment of every rule: input, params and item (the element of
// for_each), all dynamic, with the strings, sets and lists extensions.
func env() (*cel.Env, error) {
	return cel.NewEnv(
		cel.Variable("input", cel.DynType),
		cel.Variable("params", cel.DynType),
		cel.Variable("item", cel.DynType),
		cel.CrossTypeNumericComparisons(true),
		ext.Strings(), ext.Sets(), ext.Lists(),
	)
}

// ParsePolicy compiles a policy from data; name is used in error positions. Every rule is
// then run once against an input with every field set (SampleInput), so a misspelt
// field is an error here, with its line, rather than a surprise at decision time.
func ParsePolicy(name string, data []byte) (*Policy, error) {
	var pf policyFile
	dec := yaml.NewDecoder(strings.NewReader(string(data)))
	dec.KnownFields(true)
	if err := dec.Decode(&pf); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, &PolicyError{File: name, Line: 1, Msg: "empty policy: want stage, params and rules"}
		}
		return nil, yamlError(name, err)
	}
	sum := sha256.Sum256(data)
	p := &Policy{Name: name, SHA256: hex.EncodeToString(sum[:]), Stage: pf.Stage}
	if !pf.Params.IsZero() {
		var v any
		if err := pf.Params.Decode(&v); err != nil {
			return nil, yamlError(name, err)
		}
		// Through JSON, so params have the same types as the input (numbers are doubles).
		b, err := json.Marshal(v)
		if err != nil {
			return nil, &PolicyError{File: name, Line: pf.Params.Line, Msg: "params: " + err.Error()}
		}
		if err := json.Unmarshal(b, &p.params); err != nil {
			return nil, &PolicyError{File: name, Line: pf.Params.Line, Msg: "params: " + err.Error()}
		}
	} else {
		p.params = map[string]any{}
	}
	if len(pf.Rules) == 0 {
		return nil, &PolicyError{File: name, Line: 1, Msg: "the policy has no rules: a policy that allows everything is not a policy"}
	}
	e, err := env()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "cel: %v", err)
	}
	lines := strings.Split(string(data), "\n")
	seen := map[string]int{}
	for i := range pf.Rules {
		n := &pf.Rules[i]
		if n.Kind != yaml.MappingNode {
			return nil, &PolicyError{File: name, Line: n.Line, Col: n.Column, Msg: "a rule is a mapping: name, for_each, require, attestation, message"}
		}
		for j := 0; j+1 < len(n.Content); j += 2 {
			switch k := n.Content[j]; k.Value {
			case "name", "for_each", "require", "attestation", "message":
			default:
				return nil, &PolicyError{File: name, Line: k.Line, Col: k.Column, Msg: fmt.Sprintf("unknown rule field %q (want name, for_each, require, attestation, message)", k.Value)}
			}
		}
		var rf ruleFile
		if err := n.Decode(&rf); err != nil {
			return nil, yamlError(name, err)
		}
		if rf.Name == "" {
			return nil, &PolicyError{File: name, Line: n.Line, Msg: "rule without a name"}
		}
		if l, ok := seen[rf.Name]; ok {
			return nil, &PolicyError{File: name, Line: n.Line, Msg: fmt.Sprintf("rule %q is defined twice (first at line %d)", rf.Name, l)}
		}
		seen[rf.Name] = n.Line
		if rf.Require.IsZero() {
			return nil, &PolicyError{File: name, Line: n.Line, Msg: fmt.Sprintf("rule %q has no require expression", rf.Name)}
		}
		r := &rule{name: rf.Name, line: n.Line, forEach: !rf.ForEach.IsZero()}
		if _, err := compile(e, name, lines, &rf.Require, cel.BoolType); err != nil {
			return nil, err
		}
		if r.forEach {
			if _, err := compile(e, name, lines, &rf.ForEach, nil); err != nil {
				return nil, err
			}
			// The rule's failing elements, in one program: CEL loops faster than Go
			// calling a program per element.
			composed := yaml.Node{Kind: yaml.ScalarNode, Line: rf.Require.Line, Column: rf.Require.Column,
				Value: "(" + rf.ForEach.Value + ").filter(item, !(" + rf.Require.Value + "))"}
			if r.fails, err = compile(e, name, lines, &composed, nil); err != nil {
				return nil, err
			}
		} else if r.check, err = compile(e, name, lines, &rf.Require, cel.BoolType); err != nil {
			return nil, err
		}
		if !rf.Attestation.IsZero() {
			if r.attestation, err = compile(e, name, lines, &rf.Attestation, cel.StringType); err != nil {
				return nil, err
			}
		}
		if !rf.Message.IsZero() {
			if r.message, err = compile(e, name, lines, &rf.Message, cel.StringType); err != nil {
				return nil, err
			}
		}
		p.rules = append(p.rules, r)
	}
	if err := p.selfCheck(); err != nil {
		return nil, err
	}
	return p, nil
}

// compile compiles the CEL expression in node; a compile error is a PolicyError at
// the expression's position in the file.
func compile(e *cel.Env, file string, lines []string, node *yaml.Node, want *cel.Type) (cel.Program, error) {
	if node.Kind != yaml.ScalarNode {
		return nil, &PolicyError{File: file, Line: node.Line, Col: node.Column, Msg: "want a CEL expression (a string)"}
	}
	ast, iss := e.Compile(node.Value)
	if iss != nil && iss.Err() != nil {
		line, col := node.Line, node.Column
		msg := iss.Err().Error()
		if errs := iss.Errors(); len(errs) > 0 {
			loc := errs[0].Location
			msg = errs[0].Message
			line, col = position(node, lines, loc.Line(), loc.Column())
		}
		return nil, &PolicyError{File: file, Line: line, Col: col, Msg: "CEL: " + msg}
	}
	if want != nil && !ast.OutputType().IsAssignableType(want) && ast.OutputType() != cel.DynType {
		return nil, &PolicyError{File: file, Line: node.Line, Col: node.Column, Msg: fmt.Sprintf("CEL: expression is %s, want %s", ast.OutputType(), want)}
	}
	prg, err := e.Program(ast, cel.EvalOptions(cel.OptOptimize))
	if err != nil {
		return nil, &PolicyError{File: file, Line: node.Line, Col: node.Column, Msg: "CEL: " + err.Error()}
	}
	return prg, nil
}

// position maps a CEL location (1-based line, 0-based column inside the expression)
// to the policy file, whose lines are given: block scalars start on the line after
// their indicator (| keeps lines; > folds them into one, joined by spaces); quoted
// scalars one column after the quote.
func position(node *yaml.Node, lines []string, line, col int) (int, int) {
	if line < 1 {
		line = 1
	}
	indent := func(l int) int {
		if l < 1 || l > len(lines) {
			return 0
		}
		return len(lines[l-1]) - len(strings.TrimLeft(lines[l-1], " "))
	}
	switch {
	case node.Style&yaml.LiteralStyle != 0:
		return node.Line + line, indent(node.Line+1) + col + 1
	case node.Style&yaml.FoldedStyle != 0 && line == 1:
		for l := node.Line + 1; l <= len(lines); l++ {
			text := strings.TrimSpace(lines[l-1])
			if col <= len(text) {
				return l, indent(l) + col + 1
			}
			col -= len(text) + 1
		}
		return node.Line + 1, 1
	case line > 1:
		return node.Line + line - 1, col + 1
	case node.Style&(yaml.SingleQuotedStyle|yaml.DoubleQuotedStyle) != 0:
		return node.Line, node.Column + col + 1
	}
	return node.Line, node.Column + col
}

// selfCheck runs every rule against SampleInput: an expression that reads a field the
// input does not have, or returns the wrong type, is reported at its rule's line.
func (p *Policy) selfCheck() error {
	in, err := toValue(SampleInput())
	if err != nil {
		return err
	}
	for _, r := range p.rules {
		if _, err := p.evalRule(r, in); err != nil {
			return &PolicyError{File: p.Name, Line: r.line, Msg: fmt.Sprintf("rule %q does not evaluate against the documented input: %v", r.name, err)}
		}
	}
	return nil
}

// Violation is one failed rule: which rule, which attestation, and why.
type Violation struct {
	Rule        string `json:"rule"`
	Attestation string `json:"attestation"`
	Reason      string `json:"reason"`
}

// Evaluate runs every rule over the input and returns every violation, in rule order.
// A rule whose evaluation fails (a type error on some input) is a violation too: the
// gate fails closed.
func (p *Policy) Evaluate(in *Input) ([]Violation, error) {
	v, err := toValue(in)
	if err != nil {
		return nil, err
	}
	var out []Violation
	for _, r := range p.rules {
		vs, err := p.evalRule(r, v)
		if err != nil {
			out = append(out, Violation{Rule: r.name, Reason: fmt.Sprintf("policy error (%s:%d): %v", p.Name, r.line, err)})
			continue
		}
		out = append(out, vs...)
	}
	return out, nil
}

// toValue gives the input to CEL as its documented JSON (maps, lists, strings,
// doubles, bools), so policies see exactly what docs/gate.md and --input-out show. It
// builds what json.Marshal then json.Unmarshal into an any would (TestToValueIsJSON),
// without the round trip through text, which cost most of an evaluation.
func toValue(in *Input) (any, error) {
	return jsonValue(reflect.ValueOf(in).Elem())
}

// jsonValue converts the kinds Input is made of (structs with json tags, slices,
// strings, bools, integers, doubles) as encoding/json would; any other kind is an error.
func jsonValue(v reflect.Value) (any, error) {
	switch v.Kind() {
	case reflect.Struct:
		t := v.Type()
		m := make(map[string]any, t.NumField())
		for i := range t.NumField() {
			f := t.Field(i)
			name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			if !f.IsExported() || name == "" || name == "-" {
				return nil, status.Errorf(codes.Internal, "gate input: field %s.%s has no JSON name", t.Name(), f.Name)
			}
			x, err := jsonValue(v.Field(i))
			if err != nil {
				return nil, err
			}
			m[name] = x
		}
		return m, nil
	case reflect.Slice:
		if v.IsNil() {
			return nil, nil
		}
		l := make([]any, v.Len())
		for i := range l {
			x, err := jsonValue(v.Index(i))
			if err != nil {
				return nil, err
			}
			l[i] = x
		}
		return l, nil
	case reflect.String:
		s := v.String()
		if !utf8.ValidString(s) {
			// As json.Marshal: each invalid byte becomes U+FFFD (ranging over a
			// string yields U+FFFD for each).
			var b strings.Builder
			for _, r := range s {
				b.WriteRune(r)
			}
			s = b.String()
		}
		return s, nil
	case reflect.Bool:
		return v.Bool(), nil
	case reflect.Int, reflect.Int64, reflect.Int32:
		return float64(v.Int()), nil
	case reflect.Float64:
		f := v.Float()
		if math.IsNaN(f) || math.IsInf(f, 0) {
			return nil, status.Errorf(codes.Internal, "gate input: unsupported value %v", f)
		}
		return f, nil
	}
	return nil, status.Errorf(codes.Internal, "gate input: unsupported kind %s", v.Kind())
}

func (p *Policy) evalRule(r *rule, in any) ([]Violation, error) {
	act := map[string]any{"input": in, "params": p.params, "item": nil}
	if !r.forEach {
		out, _, err := r.check.Eval(act)
		if err != nil {
			return nil, err
		}
		ok, isBool := out.Value().(bool)
		if !isBool {
			return nil, fmt.Errorf("require is %s, want bool", out.Type().TypeName())
		}
		if ok {
			return nil, nil
		}
		v, err := r.violation(act)
		if err != nil {
			return nil, err
		}
		return []Violation{v}, nil
	}
	out, _, err := r.fails.Eval(act)
	if err != nil {
		return nil, err
	}
	list, ok := out.(traits.Lister)
	if !ok {
		return nil, fmt.Errorf("for_each is %s, want a list", out.Type().TypeName())
	}
	var vs []Violation
	n := int64(list.Size().(types.Int))
	for i := int64(0); i < n; i++ {
		act["item"] = list.Get(types.Int(i))
		v, err := r.violation(act)
		if err != nil {
			return nil, err
		}
		vs = append(vs, v)
	}
	return vs, nil
}

// violation renders a failed rule's attestation and message.
func (r *rule) violation(act map[string]any) (Violation, error) {
	v := Violation{Rule: r.name, Reason: "rule " + r.name + " failed"}
	var err error
	if r.attestation != nil {
		if v.Attestation, err = evalString(r.attestation, act); err != nil {
			return v, fmt.Errorf("attestation: %w", err)
		}
	}
	if r.message != nil {
		if v.Reason, err = evalString(r.message, act); err != nil {
			return v, fmt.Errorf("message: %w", err)
		}
	}
	return v, nil
}

func evalString(p cel.Program, act map[string]any) (string, error) {
	out, _, err := p.Eval(act)
	if err != nil {
		return "", err
	}
	s, ok := out.Value().(string)
	if !ok {
		return "", fmt.Errorf("is %s, want string", typeName(out))
	}
	return s, nil
}

func typeName(v ref.Val) string { return v.Type().TypeName() }
