package engine

import (
	"context"
	"log/slog"
	"time"

	"github.com/kilnbuild/kiln/engine/auth"
	"github.com/kilnbuild/kiln/engine/revoke"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// OIDCConfig configures bearer tokens on `kiln serve` (package engine/auth).
type OIDCConfig struct {
	// Issuers are the trusted issuers, each with the one audience its tokens must name.
	Issuers []auth.Issuer
	// MaxTTL refuses tokens that live longer; 0 accepts any lifetime.
	MaxTTL time.Duration
	// AllowPlaintext accepts bearer tokens over plaintext gRPC beyond loopback, where
	// anyone on the path can read and replay them.
	AllowPlaintext bool
}

// authConfig checks the server's authentication and authorization settings and loads
// them: the OIDC verifier (its issuers' keys fetched once, a failure only warned
// about) and the policy.
func authConfig(ctx context.Context, cfg ServerConfig, log *slog.Logger) (*auth.Verifier, *auth.Policy, error) {
	o := cfg.OIDC
	var v *auth.Verifier
	if len(o.Issuers) > 0 {
		var err error
		if v, err = auth.NewVerifier(auth.VerifierConfig{Issuers: o.Issuers, MaxTTL: o.MaxTTL, Logger: log}); err != nil {
			return nil, nil, err
		}
	} else if o.MaxTTL != 0 || o.AllowPlaintext {
		return nil, nil, status.Error(codes.InvalidArgument, "--oidc-max-ttl and --oidc-allow-plaintext need --oidc-issuer")
	}
	p, err := loadPolicy(cfg, v)
	if err != nil {
		return nil, nil, err
	}
	if v != nil {
		if err := v.Warm(ctx); err != nil {
			log.Warn("oidc: an issuer's keys could not be fetched; its tokens are refused until they can be", "err", err)
		}
	}
	return v, p, nil
}

// loadPolicy loads --authz, if given, and checks it against the identities the server
// can verify.
func loadPolicy(cfg ServerConfig, v *auth.Verifier) (*auth.Policy, error) {
	if cfg.AuthzFile == "" {
		return nil, nil
	}
	if cfg.TLS.ClientCA == "" && v == nil {
		return nil, status.Error(codes.InvalidArgument, "--authz needs --tls-client-ca or --oidc-issuer: the policy names clients by their verified certificates or tokens")
	}
	p, err := auth.LoadPolicy(cfg.AuthzFile)
	if err != nil {
		return nil, err
	}
	if p.UsesCertificates() && cfg.TLS.ClientCA == "" {
		return nil, status.Errorf(codes.InvalidArgument, "--authz %s has rules on client certificates (subject, spiffe) but there is no --tls-client-ca", cfg.AuthzFile)
	}
	var trusted func(string) bool
	if v != nil {
		trusted = v.Trusts
	}
	if err := p.CheckIssuers(trusted); err != nil {
		return nil, err
	}
	return p, nil
}

// newAuthenticator enforces v and p and refuses the identities revoked in rl on every
// call. With an issuer configured, calls that need a permission need an identity.
func newAuthenticator(v *auth.Verifier, p *auth.Policy, o OIDCConfig, rl *revoke.List, log *slog.Logger) *auth.Authenticator {
	return auth.New(auth.Config{
		Verifier: v, Policy: p, RequireIdentity: v != nil, PlaintextTokens: o.AllowPlaintext, Logger: log,
		Revoked: func(id auth.Identity) error { return rl.CheckIdentity(id.String()) },
	})
}
