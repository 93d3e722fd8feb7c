package auth

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TokenFile is the client side of bearer tokens: gRPC per-call credentials that send
// the token held in a file as "authorization: Bearer TOKEN". The file is re-read when
// it changes, because short-lived tokens are replaced on disk (a CI job's minted token,
// an orchestrator's projected service-account token, a SPIFFE helper's JWT-SVID): a
// worker or `kiln rebuild --remote` keeps working across rotations without a restart.
type TokenFile struct {
	path      string
	plaintext bool

	mu    sync.Mutex
	mod   time.Time
	size  int64
	token string
}

// NewTokenFile reads the token file once (so a bad path fails at start). plaintext
// allows sending it over connections without TLS (loopback only, by the caller's
// judgement: a token sent in the clear can be replayed by whoever reads it).
func NewTokenFile(path string, plaintext bool) (*TokenFile, error) {
	t := &TokenFile{path: path, plaintext: plaintext}
	if _, err := t.current(); err != nil {
		return nil, err
	}
	return t, nil
}

// current returns the file's token, re-reading it if its size or mtime changed.
func (t *TokenFile) current() (string, error) {
	fi, err := os.Stat(t.path)
	if err != nil {
		return "", status.Errorf(codes.Unauthenticated, "token file: %v", err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.token != "" && fi.ModTime().Equal(t.mod) && fi.Size() == t.size && time.Since(t.mod) > time.Second {
		return t.token, nil
	}
	b, err := os.ReadFile(t.path)
	if err != nil {
		return "", status.Errorf(codes.Unauthenticated, "token file: %v", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" || strings.ContainsAny(tok, " \t\r\n") {
		return "", status.Errorf(codes.Unauthenticated, "token file %s: want one token and nothing else", t.path)
	}
	t.token, t.mod, t.size = tok, fi.ModTime(), fi.Size()
	return tok, nil
}

// GetRequestMetadata implements credentials.PerRPCCredentials.
func (t *TokenFile) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	tok, err := t.current()
	if err != nil {
		return nil, err
	}
	return map[string]string{"authorization": "Bearer " + tok}, nil
}

// RequireTransportSecurity implements credentials.PerRPCCredentials: true unless
// plaintext was allowed.
func (t *TokenFile) RequireTransportSecurity() bool { return !t.plaintext }

// String names the credential for logs (never the token).
func (t *TokenFile) String() string { return fmt.Sprintf("bearer token from %s", t.path) }
