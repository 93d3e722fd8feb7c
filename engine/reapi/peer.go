package reapi

import (
	"context"
	"crypto/x509"

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
