package lockfiles

import (
	"net/url"
	"strings"
)

// sensitiveParams are substrings of query parameter names whose values are secrets
// (signed-URL signatures, tokens, keys), matched case-insensitively.
var sensitiveParams = []string{"token", "sig", "key", "secret", "pass", "auth", "cred", "session", "code"}

// RedactURL returns s fit for logs and error messages: userinfo removed and the values
// of query parameters that look like credentials replaced by "REDACTED". A string that
// does not parse is reduced to its scheme and host, or to "(unparseable URL)".
func RedactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		if i := strings.Index(s, "://"); i > 0 {
			rest := s[i+3:]
			if j := strings.IndexAny(rest, "/?#"); j >= 0 {
				rest = rest[:j]
			}
			if k := strings.LastIndex(rest, "@"); k >= 0 {
				rest = rest[k+1:]
			}
			return s[:i+3] + rest + "/(unparseable URL)"
		}
		return "(unparseable URL)"
	}
	u.User = nil
	u.Fragment, u.RawFragment = "", ""
	if u.RawQuery != "" {
		q, err := url.ParseQuery(u.RawQuery)
		if err != nil {
			u.RawQuery = "REDACTED" // a query we cannot read could hide anything
			return u.String()
		}
		changed := false
		for name := range q {
			if isSensitiveParam(name) {
				q[name] = []string{"REDACTED"}
				changed = true
			}
		}
		if changed {
			u.RawQuery = q.Encode()
		}
	}
	return u.String()
}

func isSensitiveParam(name string) bool {
	n := strings.ToLower(name)
	for _, s := range sensitiveParams {
		if strings.Contains(n, s) {
			return true
		}
	}
	return false
}
