package server

import (
	"context"
	"log/slog"
	"time"

	"github.com/kilnbuild/kiln/engine/auth"
	"github.com/kilnbuild/kiln/engine/revoke"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// OIDCConfig configures bearer tokens on `kiln serve` (package engine/auth). Its keys
// are the flags' names: issuers and audiences are two lists, paired by position.
type OIDCConfig struct {
	// Issuers are the trusted issuers; Audiences[i] is the one audience the tokens of
	// Issuers[i] must name.
	Issuers   []string `yaml:"oidc-issuer,omitempty"`
	Audiences []string `yaml:"oidc-audience,omitempty"`
	// MaxTTL refuses tokens that live longer; 0 accepts any lifetime.
	MaxTTL time.Duration `yaml:"oidc-max-ttl"`
	// AllowPlaintext accepts bearer tokens over plaintext gRPC beyond loopback, where
	// anyone on the path can read and replay them.
	AllowPlaintext bool `yaml:"oidc-allow-plaintext"`
}

// pairs returns the issuers with their audiences.
func (o OIDCConfig) pairs() []auth.Issuer {
	out := make([]auth.Issuer, 0, len(o.Issuers))
	for i, u := range o.Issuers {
		out = append(out, auth.Issuer{URL: u, Audience: o.Audiences[i]})
	}
	return out
}

// check refuses OIDC settings that cannot work, or not with the rest of cfg.
func (o OIDCConfig) check(c Config) error {
	if len(o.Issuers) != len(o.Audiences) {
		return status.Errorf(codes.InvalidArgument, "%d --oidc-issuer but %d --oidc-audience: give them in pairs, one audience per issuer", len(o.Issuers), len(o.Audiences))
	}
	if len(o.Issuers) == 0 {
		if o.MaxTTL != 0 || o.AllowPlaintext {
			return status.Error(codes.InvalidArgument, "--oidc-max-ttl and --oidc-allow-plaintext need --oidc-issuer")
		}
		return nil
	}
	if o.MaxTTL < 0 {
		return status.Errorf(codes.InvalidArgument, "--oidc-max-ttl %v: want a positive duration (0: any lifetime)", o.MaxTTL)
	}
	if !c.TLS.Enabled() && !o.AllowPlaintext && !auth.IsLoopback(c.Listen) {
		return status.Errorf(codes.InvalidArgument, "bearer tokens over plaintext gRPC on %s (beyond loopback) could be read and replayed on the way: add --tls-cert/--tls-key, or accept the risk with --oidc-allow-plaintext", c.Listen)
	}
	return nil
}

// authConfig checks the server's authentication and authorization settings and loads
// them: the OIDC verifier (its issuers' keys fetched once, a failure only warned
// about) and the policy.
func authConfig(ctx context.Context, cfg Config, log *slog.Logger) (*auth.Verifier, *auth.Policy, error) {
	o := cfg.OIDC
	var v *auth.Verifier
	if len(o.Issuers) > 0 {
		var err error
		if v, err = auth.NewVerifier(auth.VerifierConfig{Issuers: o.pairs(), MaxTTL: o.MaxTTL, Logger: log}); err != nil {
			return nil, nil, err
		}
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
func loadPolicy(cfg Config, v *auth.Verifier) (*auth.Policy, error) {
	if cfg.AuthzFile == "" {
		return nil, nil
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
