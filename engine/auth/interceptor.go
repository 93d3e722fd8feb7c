package auth

import (
	"context"
	"crypto/x509"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"

	"github.com/kilnbuild/kiln/engine/reapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// Config configures an Authenticator.
type Config struct {
	// Verifier verifies bearer tokens; nil ignores them (no issuer is trusted).
	Verifier *Verifier
	// Policy decides what each caller may do; nil lets every caller that passes the
	// identity requirement do everything.
	Policy *Policy
	// RequireIdentity refuses (UNAUTHENTICATED) calls that need a permission from a
	// caller with neither a verified certificate nor a verified token.
	RequireIdentity bool
	// Revoked returns an error for a revoked identity; nil: nothing is revoked.
	Revoked func(Identity) error
	// PlaintextTokens accepts bearer tokens on connections without TLS from peers
	// beyond loopback (where anyone on the path can read and replay them).
	PlaintextTokens bool
	Logger          *slog.Logger
}

// Authenticator establishes the caller of every call (certificate, token), refuses
// revoked identities and enforces the policy; handlers read the result with CallerFrom.
type Authenticator struct {
	cfg Config
}

// New returns an Authenticator.
func New(cfg Config) *Authenticator {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Authenticator{cfg: cfg}
}

type callerKey struct{}

// CallerFrom returns the caller an Authenticator established for ctx's call.
func CallerFrom(ctx context.Context) (Caller, bool) {
	c, ok := ctx.Value(callerKey{}).(Caller)
	return c, ok
}

// WithCaller returns ctx carrying c (for code that acts on a caller's behalf, and tests),
// and c's Key as the name kiln serve's per-client limits count it by (reapi.ClientID).
func WithCaller(ctx context.Context, c Caller) context.Context {
	return reapi.WithClientID(context.WithValue(ctx, callerKey{}, c), c.Key())
}

// Authenticate establishes ctx's caller for a call of method and checks that it may
// make it: UNAUTHENTICATED for an invalid, revoked or missing (where one is needed)
// credential, PERMISSION_DENIED for a valid identity the policy does not allow. The
// returned context carries the Caller.
func (a *Authenticator) Authenticate(ctx context.Context, method string) (context.Context, Caller, error) {
	p, _ := peer.FromContext(ctx)
	pr := presented{secure: secureTransport(p)}
	if p != nil && p.Addr != nil {
		pr.peer = p.Addr.String()
	}
	pr.cert, _ = reapi.ClientCert(ctx)
	md, _ := metadata.FromIncomingContext(ctx)
	pr.authorization = md.Get("authorization")
	c, err := a.check(ctx, pr, MethodPermission(method), method)
	if err != nil {
		return ctx, c, err
	}
	return WithCaller(ctx, c), c, nil
}

// AuthenticateHTTP is Authenticate for an HTTP request that needs permission perm
// (the web UI: read): the verified client certificate of its TLS connection and its
// Authorization header are the credentials.
func (a *Authenticator) AuthenticateHTTP(r *http.Request, perm string) (Caller, error) {
	pr := presented{peer: r.RemoteAddr, authorization: r.Header.Values("Authorization"), secure: r.TLS != nil}
	if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 && len(r.TLS.VerifiedChains[0]) > 0 {
		pr.cert = r.TLS.VerifiedChains[0][0]
	}
	if !pr.secure {
		if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil {
			pr.secure = ap.Addr().IsLoopback()
		}
	}
	// Not the request's path in what refusals say: it may name what the caller may not see.
	return a.check(r.Context(), pr, perm, "the web UI")
}

// presented are the credentials of one call or request.
type presented struct {
	peer          string
	cert          *x509.Certificate // the verified client certificate, if any
	authorization []string          // the authorization header's values
	secure        bool              // over TLS, or from loopback
}

// check establishes the caller from pr and checks that it may use permission need ("":
// negotiation) for what (a method, a request).
func (a *Authenticator) check(ctx context.Context, pr presented, need, what string) (Caller, error) {
	c, err := a.identify(ctx, pr)
	if err != nil {
		return c, err
	}
	if a.cfg.Revoked != nil {
		for _, id := range c.Identities() {
			if err := a.cfg.Revoked(id); err != nil {
				return c, status.Errorf(codes.Unauthenticated, "%s: %v", id, status.Convert(err).Message())
			}
		}
	}
	if need == "" {
		return c, nil
	}
	anonymous := c.Primary().IsAnonymous()
	if anonymous && (a.cfg.RequireIdentity || a.cfg.Policy != nil) {
		return c, status.Errorf(codes.Unauthenticated, "%s: no credentials: this server needs %s", what, a.wanted())
	}
	if a.cfg.Policy == nil {
		return c, nil
	}
	ok, rule := a.cfg.Policy.Decide(c, need)
	if !ok {
		why := "no rule names it"
		if rule > 0 {
			why = "rule " + strconv.Itoa(rule) + " does not allow it"
		}
		return c, status.Errorf(codes.PermissionDenied, "client %q may not %s (%s; policy %s: %s)", c.String(), need, what, a.cfg.Policy.File(), why)
	}
	return c, nil
}

// wanted says which credentials the server accepts, for the UNAUTHENTICATED message.
func (a *Authenticator) wanted() string {
	switch {
	case a.cfg.Verifier != nil && a.cfg.Policy != nil && a.cfg.Policy.UsesCertificates():
		return "a bearer token (\"authorization: Bearer TOKEN\") or a verified client certificate"
	case a.cfg.Verifier != nil:
		return "a bearer token (\"authorization: Bearer TOKEN\", e.g. Bazel's --remote_header=Authorization=\"Bearer $TOKEN\")"
	}
	return "a verified client certificate"
}

// identify verifies the presented certificate and token.
func (a *Authenticator) identify(ctx context.Context, pr presented) (Caller, error) {
	c := Caller{Peer: pr.peer}
	if pr.cert != nil {
		id, err := FromCertificate(pr.cert)
		if err != nil {
			return c, err
		}
		c.Cert = id
	}
	if a.cfg.Verifier == nil {
		return c, nil
	}
	raw, ok, err := bearerToken(pr.authorization)
	if err != nil || !ok {
		return c, err
	}
	if !a.cfg.PlaintextTokens && !pr.secure {
		return c, status.Errorf(codes.Unauthenticated, "a bearer token over plaintext from %s is refused: anyone on the way can read and replay it (use TLS, or loopback, or start the server with --oidc-allow-plaintext)", c.Peer)
	}
	id, err := a.cfg.Verifier.Verify(ctx, raw)
	if err != nil {
		return c, err
	}
	c.Token = id
	return c, nil
}

// bearerToken returns the token of an "authorization: Bearer TOKEN" header.
func bearerToken(vals []string) (string, bool, error) {
	switch len(vals) {
	case 0:
		return "", false, nil
	case 1:
	default:
		return "", false, status.Errorf(codes.Unauthenticated, "%d authorization headers; send one", len(vals))
	}
	scheme, tok, _ := strings.Cut(strings.TrimSpace(vals[0]), " ")
	if !strings.EqualFold(scheme, "bearer") {
		return "", false, status.Errorf(codes.Unauthenticated, "authorization scheme %q is not supported; send \"Bearer TOKEN\"", scheme)
	}
	tok = strings.TrimSpace(tok)
	if tok == "" {
		return "", false, status.Error(codes.Unauthenticated, "empty bearer token")
	}
	return tok, true, nil
}

// secureTransport reports whether the call came over TLS or from a loopback address.
func secureTransport(p *peer.Peer) bool {
	if p == nil {
		return false
	}
	if _, ok := p.AuthInfo.(credentials.TLSInfo); ok {
		return true
	}
	if tcp, ok := p.Addr.(*net.TCPAddr); ok {
		return tcp.IP.IsLoopback()
	}
	return false
}

// ServerOptions returns the interceptors that authenticate and authorize every call.
// They come first in the chain, so later interceptors (limits, metrics) see the Caller.
func (a *Authenticator) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			ctx, _, err := a.Authenticate(ctx, info.FullMethod)
			if err != nil {
				return nil, err
			}
			return h(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			ctx, _, err := a.Authenticate(ss.Context(), info.FullMethod)
			if err != nil {
				return err
			}
			return h(srv, &callerStream{ServerStream: ss, ctx: ctx})
		}),
	}
}

// callerStream is a server stream whose context carries the Caller.
type callerStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *callerStream) Context() context.Context { return s.ctx }
