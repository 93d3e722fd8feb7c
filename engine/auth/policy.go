package auth

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path"
	"slices"
	"sort"
	"strconv"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Permissions a policy grants, each a group of gRPC methods (see MethodPermission).
const (
	PermRead    = "read"    // CAS reads, ByteStream.Read, GetActionResult, GetTree
	PermWrite   = "write"   // CAS uploads, ByteStream.Write, UpdateActionResult (still under --allow-client-ac-writes)
	PermExecute = "execute" // Execute, WaitExecution, Operations
	PermFetch   = "fetch"   // Remote Asset API (downloads into the CAS)
)

// AllPermissions are every permission a rule can grant.
var AllPermissions = []string{PermRead, PermWrite, PermExecute, PermFetch}

// permUnknown is what an unknown method needs: no rule grants it.
const permUnknown = "unknown method"

// MethodPermission maps a full gRPC method name to the permission it needs; "" is
// open to every caller (negotiation: Capabilities, health); an unknown method needs a
// permission no rule grants, so it is refused.
func MethodPermission(method string) string {
	svc, _, _ := strings.Cut(strings.TrimPrefix(method, "/"), "/")
	switch method {
	case "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
		"/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs",
		"/build.bazel.remote.execution.v2.ContentAddressableStorage/GetTree",
		"/google.bytestream.ByteStream/Read",
		"/build.bazel.remote.execution.v2.ActionCache/GetActionResult":
		return PermRead
	case "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs",
		"/google.bytestream.ByteStream/Write",
		"/google.bytestream.ByteStream/QueryWriteStatus",
		"/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult":
		return PermWrite
	}
	switch svc {
	case "build.bazel.remote.execution.v2.Capabilities", "grpc.health.v1.Health":
		return ""
	case "build.bazel.remote.execution.v2.Execution", "google.longrunning.Operations":
		return PermExecute
	case "build.bazel.remote.asset.v1.Fetch":
		return PermFetch
	case "build.bazel.remote.asset.v1.Push":
		return PermWrite
	}
	return permUnknown
}

// Policy says what each caller may do: the first rule that matches one of the caller's
// identities decides; a caller no rule matches may do nothing but negotiate.
type Policy struct {
	Rules []Rule `json:"rules"`
	file  string
}

// Rule grants Allow to the callers it matches. It names exactly one kind of identity:
//
//   - Subject: a verified client certificate whose common name matches (the original
//     rule form; also an X.509-SVID's common name);
//   - SPIFFE: an X.509-SVID whose SPIFFE ID matches;
//   - Issuer: an OIDC token of that issuer (exactly), all of whose claims named in
//     Claims match (a list-valued claim matches if one element does; a claim the token
//     lacks never matches).
//
// Patterns are path.Match patterns: "*" matches any run of characters except '/'.
type Rule struct {
	Subject string            `json:"subject,omitempty"`
	SPIFFE  string            `json:"spiffe,omitempty"`
	Issuer  string            `json:"issuer,omitempty"`
	Claims  map[string]string `json:"claims,omitempty"`
	Allow   []string          `json:"allow"`
}

// LoadPolicy reads and checks a policy file (JSON).
func LoadPolicy(file string) (*Policy, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "authz policy: %v", err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	p := &Policy{file: file}
	if err := dec.Decode(p); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "authz policy %s: %v", file, err)
	}
	if len(p.Rules) == 0 {
		return nil, status.Errorf(codes.InvalidArgument, "authz policy %s: no rules (every client would be refused)", file)
	}
	for i, r := range p.Rules {
		if err := r.check(); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "authz policy %s: rule %d: %v", file, i+1, err)
		}
	}
	return p, nil
}

// check refuses a rule that names no identity or several kinds, or a bad pattern.
func (r Rule) check() error {
	kinds := 0
	for _, s := range []string{r.Subject, r.SPIFFE, r.Issuer} {
		if s != "" {
			kinds++
		}
	}
	if kinds != 1 {
		return fmt.Errorf("name exactly one of subject (certificate common name), spiffe (SPIFFE ID) or issuer (OIDC)")
	}
	if len(r.Claims) > 0 && r.Issuer == "" {
		return fmt.Errorf("claims go with an issuer")
	}
	pats := []string{r.Subject, r.SPIFFE}
	for name, pat := range r.Claims {
		if name == "" || pat == "" {
			return fmt.Errorf("empty claim name or pattern")
		}
		pats = append(pats, pat)
	}
	for _, pat := range pats {
		if _, err := path.Match(pat, ""); err != nil {
			return fmt.Errorf("bad pattern %q", pat)
		}
	}
	if r.SPIFFE != "" && !strings.HasPrefix(r.SPIFFE, "spiffe://") {
		return fmt.Errorf("spiffe pattern %q does not start with spiffe://", r.SPIFFE)
	}
	if r.Issuer != "" && checkFetchURL(r.Issuer) != nil {
		return fmt.Errorf("issuer %q is not an https URL", r.Issuer)
	}
	for _, a := range r.Allow {
		if !slices.Contains(AllPermissions, a) {
			return fmt.Errorf("unknown permission %q (known: %s)", a, strings.Join(AllPermissions, ", "))
		}
	}
	return nil
}

// CheckIssuers refuses a policy whose rules name an issuer the server does not trust
// (a typo there would silently match nothing).
func (p *Policy) CheckIssuers(trusted func(string) bool) error {
	for i, r := range p.Rules {
		if r.Issuer != "" && (trusted == nil || !trusted(r.Issuer)) {
			return status.Errorf(codes.InvalidArgument, "authz policy %s: rule %d names issuer %q, which is not an --oidc-issuer", p.file, i+1, r.Issuer)
		}
	}
	return nil
}

// UsesCertificates reports whether a rule names certificates (subject or spiffe).
func (p *Policy) UsesCertificates() bool {
	return slices.ContainsFunc(p.Rules, func(r Rule) bool { return r.Subject != "" || r.SPIFFE != "" })
}

// matches reports whether the rule names one of c's identities.
func (r Rule) matches(c Caller) bool {
	switch {
	case r.Subject != "":
		return !c.Cert.IsAnonymous() && glob(r.Subject, c.Cert.CommonName)
	case r.SPIFFE != "":
		return c.Cert.Kind == SPIFFE && glob(r.SPIFFE, c.Cert.Name)
	case r.Issuer != "":
		if c.Token.Kind != OIDC || c.Token.Issuer != r.Issuer {
			return false
		}
		for name, pat := range r.Claims {
			if !claimMatches(pat, c.Token.Claims[name]) {
				return false
			}
		}
		return true
	}
	return false
}

func glob(pat, s string) bool { ok, _ := path.Match(pat, s); return ok }

// claimMatches matches a claim's value: a string, number or boolean by its text, a
// list if one element matches; objects and absent claims never match.
func claimMatches(pat string, v any) bool {
	switch x := v.(type) {
	case string:
		return glob(pat, x)
	case bool:
		return glob(pat, strconv.FormatBool(x))
	case float64:
		return glob(pat, strconv.FormatFloat(x, 'f', -1, 64))
	case json.Number:
		return glob(pat, x.String())
	case []any:
		return slices.ContainsFunc(x, func(e any) bool { _, isList := e.([]any); return !isList && claimMatches(pat, e) })
	}
	return false
}

// Decide returns whether c may use permission perm ("" is always allowed) and the
// 1-based number of the rule that decided (0: none matched).
func (p *Policy) Decide(c Caller, perm string) (bool, int) {
	if perm == "" {
		return true, 0
	}
	for i, r := range p.Rules {
		if r.matches(c) {
			return slices.Contains(r.Allow, perm), i + 1
		}
	}
	return false, 0
}

// File is the policy's file name.
func (p *Policy) File() string { return p.file }

// String summarises the policy for the start-up log.
func (p *Policy) String() string {
	var parts []string
	for _, r := range p.Rules {
		who := r.Subject
		switch {
		case r.SPIFFE != "":
			who = r.SPIFFE
		case r.Issuer != "":
			who = r.Issuer
			var cs []string
			for k, v := range r.Claims {
				cs = append(cs, k+"="+v)
			}
			sort.Strings(cs)
			if len(cs) > 0 {
				who += "[" + strings.Join(cs, ",") + "]"
			}
		}
		parts = append(parts, fmt.Sprintf("%s:%s", who, strings.Join(r.Allow, "+")))
	}
	return strings.Join(parts, " ")
}
