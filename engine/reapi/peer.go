package reapi

import (
	"context"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// Client names the caller of ctx's call for logs: the subject of its verified client
// certificate (mTLS) and its address, or only the address.
func Client(ctx context.Context) string {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return "unknown"
	}
	addr := "unknown"
	if p.Addr != nil {
		addr = p.Addr.String()
	}
	if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.VerifiedChains) > 0 && len(ti.State.VerifiedChains[0]) > 0 {
		return ti.State.VerifiedChains[0][0].Subject.String() + " at " + addr
	}
	return addr
}
