package reapi

import (
	"context"
	"crypto/x509"
	"net"
	"strings"

	"github.com/kilnbuild/kiln/engine/limits"
	"google.golang.org/grpc"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// ClientCert is the verified client certificate of ctx's call (mTLS), if any.
func ClientCert(ctx context.Context) (*x509.Certificate, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, false
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(ti.State.VerifiedChains) == 0 || len(ti.State.VerifiedChains[0]) == 0 {
		return nil, false
	}
	return ti.State.VerifiedChains[0][0], true
}

// Client names the caller of ctx's call for logs: the subject of its verified client
// certificate (mTLS) and its address, or only the address.
func Client(ctx context.Context) string {
	addr := "unknown"
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		addr = p.Addr.String()
	}
	if c, ok := ClientCert(ctx); ok {
		return c.Subject.String() + " at " + addr
	}
	return addr
}

type clientIDKey struct{}

// WithClientID names ctx's caller id for per-client limits: an authenticating layer
// (a token's subject, say) sets it, and it then takes precedence over what ClientID
// would derive from the connection.
func WithClientID(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, clientIDKey{}, id)
}

// ClientID names ctx's caller for per-client limits: the identity an authenticating
// layer set (WithClientID; kiln serve's engine/auth: a token's issuer and subject, a
// SPIFFE ID, a certificate's common name, or the peer's address), else "cert:" and
// the common name of its verified client certificate, else "peer:" and its IP
// address, so that all connections from one address count as one client.
func ClientID(ctx context.Context) string {
	if id, ok := ctx.Value(clientIDKey{}).(string); ok && id != "" {
		return id
	}
	if c, ok := ClientCert(ctx); ok {
		return "cert:" + c.Subject.CommonName
	}
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		if a, ok := p.Addr.(*net.TCPAddr); ok {
			return "peer:" + a.IP.String()
		}
		host := p.Addr.String()
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
		return "peer:" + host
	}
	return "unknown"
}

// CallLimit returns the interceptors that make each call wait for its client's turn
// under c (limits.Calls) and record it, while it runs, as the client's presence in w
// (limits.Work.Enter: whether clients share the server), the health service excepted.
func CallLimit(c *limits.Calls, w *limits.Work) []grpc.ServerOption {
	enter := func(ctx context.Context, method string) (leave func(), err error) {
		if strings.HasPrefix(method, "/grpc.health.") {
			return func() {}, nil
		}
		client := ClientID(ctx)
		if err := c.Wait(ctx, client); err != nil {
			return nil, err
		}
		return w.Enter(client), nil
	}
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			leave, err := enter(ctx, info.FullMethod)
			if err != nil {
				return nil, err
			}
			defer leave()
			return h(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			leave, err := enter(ss.Context(), info.FullMethod)
			if err != nil {
				return err
			}
			defer leave()
			return h(srv, ss)
		}),
	}
}
