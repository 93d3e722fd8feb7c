package gate

import (
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// TestShippedPolicies: every example policy compiles and runs against the documented
// input.
func TestShippedPolicies(t *testing.T) {
	files, _ := filepath.Glob("../../examples/gate/*.yaml")
	if len(files) < 2 {
		t.Fatalf("example policies: %v", files)
	}
	for _, f := range files {
		p, err := LoadPolicy(f)
		if err != nil {
			t.Fatal(err)
		}
		if p.Stage == "" || !strings.HasSuffix(f, p.Stage+".yaml") {
			t.Errorf("%s is for stage %q", f, p.Stage)
		}
	}
}

// TestPolicyErrors: each malformed policy is refused at its file and line.
func TestPolicyErrors(t *testing.T) {
	cases := []struct{ name, policy, want string }{
		{"empty", "", "p.yaml:1: empty policy"},
		{"no rules", "stage: x\n", "p.yaml:1: the policy has no rules"},
		{"unknown top-level key", "stage: x\nrulez: []\n", "p.yaml:2: field rulez not found"},
		{"rule without name", "rules:\n  - require: 'true'\n", "p.yaml:2: rule without a name"},
		{"duplicate rule", "rules:\n  - name: a\n    require: 'true'\n  - name: a\n    require: 'true'\n", "p.yaml:4: rule \"a\" is defined twice (first at line 2)"},
		{"no require", "rules:\n  - name: a\n", "p.yaml:2: rule \"a\" has no require"},
		{"quoted CEL error column", "rules:\n  - name: a\n    require: 'input.x +'\n", "p.yaml:3:"},
		{"message not a string", "rules:\n  - name: a\n    require: 'true'\n    message: '1'\n", "p.yaml:4:14: CEL: expression is int, want string"},
		{"for_each not a list at run", "rules:\n  - name: a\n    for_each: input.stage\n    require: 'true'\n", "p.yaml:2: rule \"a\" does not evaluate"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParsePolicy("p.yaml", []byte(c.policy))
			var pe *PolicyError
			if !errors.As(err, &pe) || !strings.HasPrefix(err.Error(), c.want) {
				t.Fatalf("error %v; want one starting %q", err, c.want)
			}
		})
	}
}

// TestEvaluateFailsClosed: a rule that errors on some input is a violation, naming the
// policy line, not a pass.
func TestEvaluateFailsClosed(t *testing.T) {
	p, err := ParsePolicy("p.yaml", []byte("rules:\n  - name: age\n    require: timestamp(input.provenance.signed_at) > timestamp(\"2000-01-01T00:00:00Z\")\n"))
	if err != nil {
		t.Fatal(err)
	}
	in := SampleInput()
	in.Provenance.SignedAt = ""
	vs, err := p.Evaluate(in)
	if err != nil || len(vs) != 1 || vs[0].Rule != "age" || !strings.Contains(vs[0].Reason, "policy error (p.yaml:2)") {
		t.Fatalf("violations %+v, %v", vs, err)
	}
}

// jsonRoundTrip is what the policy saw before toValue built it directly.
func jsonRoundTrip(t *testing.T, in *Input) any {
	t.Helper()
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// TestToValueIsJSON: the input CEL sees is exactly its JSON document, for the sample,
// a real decision's input, nil and empty lists, large numbers and invalid UTF-8.
func TestToValueIsJSON(t *testing.T) {
	f := newFixture(t, 2)
	d, err := f.gate(t, policy(t, noSBOM), f.trust, nil).Decide(context.Background(), f.request(f.vsa(t, f.verifiers[0], "PASSED")))
	if err != nil {
		t.Fatal(err)
	}
	odd := SampleInput()
	odd.Subject.Name = "bad\xff\xfeutf8 \u2028 <&> \"q\""
	odd.Links[0].LogIndex = 1<<53 + 1
	odd.Provenance.AgeSeconds = 0.1 + 0.2
	odd.Chain.Failures = nil
	odd.BuilderKeys = []string{}
	for name, in := range map[string]*Input{"sample": SampleInput(), "decision": d.Input, "odd": odd} {
		got, err := toValue(in)
		if err != nil {
			t.Fatal(err)
		}
		if want := jsonRoundTrip(t, in); !reflect.DeepEqual(got, want) {
			t.Errorf("%s: toValue\n%#v\nwant\n%#v", name, got, want)
		}
	}
}
