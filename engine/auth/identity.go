// Package auth says who is calling kiln serve and what they may do: the caller's
// identities (a verified client certificate, named by its common name or by the SPIFFE
// ID of an X.509-SVID; a verified OIDC bearer token), the OIDC verifier, the
// authorization policy over those identities, and the gRPC interceptors that enforce
// it together with a revocation check.
//
// Handlers and other interceptors read the caller with CallerFrom; its Key is the
// stable name to count or limit a client by.
package auth

import (
	"crypto/x509"
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Kind says what vouches for an identity.
type Kind string

// Kinds of identity.
const (
	Anonymous   Kind = ""       // nothing: no verified certificate, no token
	Certificate Kind = "cert"   // a verified client certificate, named by its common name
	SPIFFE      Kind = "spiffe" // a verified client certificate that is an X.509-SVID, named by its SPIFFE ID
	OIDC        Kind = "oidc"   // a verified OIDC bearer token, named by its issuer and subject
)

// Identity is one verified credential of a caller.
type Identity struct {
	Kind Kind
	// Name is the certificate's common name (Certificate), the SPIFFE ID (SPIFFE), or
	// the token's subject (OIDC).
	Name string
	// CommonName is a certificate's subject common name (Certificate and SPIFFE): what
	// the policy's "subject" rules match.
	CommonName string
	// Issuer is the token's issuer (OIDC).
	Issuer string
	// Claims are every claim of the verified token (OIDC), as JSON decodes them.
	Claims map[string]any
	// Expiry is when the credential stops being valid (zero: unknown).
	Expiry time.Time
}

// String is the identity's stable form, for logs, records, revocation patterns and
// rate-limit keys: "cert:CN", "spiffe://trust-domain/path", "oidc:ISSUER#SUBJECT", or
// "anonymous". An issuer URL cannot contain '#', so the form parses back unambiguously.
func (id Identity) String() string {
	switch id.Kind {
	case Certificate:
		return "cert:" + id.Name
	case SPIFFE:
		return id.Name
	case OIDC:
		return "oidc:" + id.Issuer + "#" + id.Name
	}
	return "anonymous"
}

// IsAnonymous reports whether nothing vouches for the identity.
func (id Identity) IsAnonymous() bool { return id.Kind == Anonymous }

// Caller is everything verified about the caller of one call.
type Caller struct {
	Cert  Identity // from the verified client certificate; Anonymous without one
	Token Identity // from a verified bearer token; Anonymous without one
	Peer  string   // the caller's network address ("" if unknown)
}

// Primary is the identity that acts: the token's when there is one (it names the job),
// else the certificate's (it names the machine), else Anonymous.
func (c Caller) Primary() Identity {
	if !c.Token.IsAnonymous() {
		return c.Token
	}
	return c.Cert
}

// Identities are the caller's verified identities, token first.
func (c Caller) Identities() []Identity {
	var out []Identity
	for _, id := range []Identity{c.Token, c.Cert} {
		if !id.IsAnonymous() {
			out = append(out, id)
		}
	}
	return out
}

// String names the caller for records: its primary identity's string form.
func (c Caller) String() string { return c.Primary().String() }

// Key is the caller's stable name for per-client accounting: the primary identity,
// or "peer:HOST" (the address without its port) for an anonymous caller.
func (c Caller) Key() string {
	if p := c.Primary(); !p.IsAnonymous() {
		return p.String()
	}
	host := c.Peer
	if h, _, err := net.SplitHostPort(c.Peer); err == nil {
		host = h
	}
	return "peer:" + host
}

// FromCertificate names a verified client certificate: by its SPIFFE ID if it is an
// X.509-SVID (a spiffe:// URI SAN), else by its common name. A certificate with a
// malformed SPIFFE ID, or with a SPIFFE ID among other URI SANs (an SVID has exactly
// one), is refused: it is not a valid SVID and must not pass for a plain certificate.
func FromCertificate(c *x509.Certificate) (Identity, error) {
	id := Identity{Kind: Certificate, Name: c.Subject.CommonName, CommonName: c.Subject.CommonName, Expiry: c.NotAfter}
	spiffe := 0
	for _, u := range c.URIs {
		if strings.EqualFold(u.Scheme, "spiffe") {
			spiffe++
		}
	}
	if spiffe == 0 {
		return id, nil
	}
	if len(c.URIs) != 1 {
		return Identity{}, status.Errorf(codes.Unauthenticated, "client certificate %q: an X.509-SVID has exactly one URI SAN, this one has %d", c.Subject.CommonName, len(c.URIs))
	}
	sid, err := ParseSPIFFEID(c.URIs[0].String())
	if err != nil {
		return Identity{}, status.Errorf(codes.Unauthenticated, "client certificate %q: %v", c.Subject.CommonName, err)
	}
	id.Kind, id.Name = SPIFFE, sid
	return id, nil
}

// ParseSPIFFEID checks a SPIFFE ID as the SPIFFE ID specification defines it
// (spiffe://trust-domain/path: a lowercase trust domain of [a-z0-9.-_], path segments
// of [A-Za-z0-9.-_] that are neither empty nor "." or "..", no port, user, query or
// fragment) and returns it.
func ParseSPIFFEID(s string) (string, error) {
	rest, ok := strings.CutPrefix(s, "spiffe://")
	if !ok {
		return "", fmt.Errorf("SPIFFE ID %q: want spiffe://trust-domain/path", s)
	}
	td, path, _ := strings.Cut(rest, "/")
	if td == "" {
		return "", fmt.Errorf("SPIFFE ID %q: no trust domain", s)
	}
	for _, r := range td {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '.' || r == '-' || r == '_') {
			return "", fmt.Errorf("SPIFFE ID %q: trust domain may hold only lowercase letters, digits, '.', '-' and '_'", s)
		}
	}
	if strings.Contains(rest, "/") {
		for _, seg := range strings.Split(path, "/") {
			if seg == "" || seg == "." || seg == ".." {
				return "", fmt.Errorf("SPIFFE ID %q: empty, '.' or '..' path segment (or a trailing slash)", s)
			}
			for _, r := range seg {
				if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '-' || r == '_') {
					return "", fmt.Errorf("SPIFFE ID %q: path may hold only letters, digits, '.', '-' and '_'", s)
				}
			}
		}
	}
	if _, err := url.Parse(s); err != nil {
		return "", fmt.Errorf("SPIFFE ID %q: %v", s, err)
	}
	return s, nil
}
