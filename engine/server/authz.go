package server

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path"
	"slices"
	"strings"

	"github.com/kilnbuild/kiln/engine/reapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Permissions a policy grants, each a group of gRPC methods (see methodPermission).
const (
	PermRead    = "read"    // CAS reads, ByteStream.Read, GetActionResult, GetTree
	PermWrite   = "write"   // CAS uploads, ByteStream.Write, UpdateActionResult (still under --allow-client-ac-writes)
	PermExecute = "execute" // Execute, WaitExecution, Operations
	PermFetch   = "fetch"   // Remote Asset API (downloads into the CAS)
)

var allPerms = []string{PermRead, PermWrite, PermExecute, PermFetch}

// AuthzPolicy says what each client, named by its verified certificate, may do: the
// first rule whose pattern matches the certificate's common name applies; a client no
// rule matches may do nothing but negotiate (Capabilities, health).
type AuthzPolicy struct {
	Rules []AuthzRule `json:"rules"`
	file  string
}

// AuthzRule grants Allow to the clients whose certificate common name matches
// Subject (a path.Match pattern: "ci-*", "*").
type AuthzRule struct {
	Subject string   `json:"subject"`
	Allow   []string `json:"allow"`
}

// LoadAuthzPolicy reads and checks a policy file (JSON).
func LoadAuthzPolicy(file string) (*AuthzPolicy, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "authz policy: %v", err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	p := &AuthzPolicy{file: file}
	if err := dec.Decode(p); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "authz policy %s: %v", file, err)
	}
	if len(p.Rules) == 0 {
		return nil, status.Errorf(codes.InvalidArgument, "authz policy %s: no rules (every client would be refused)", file)
	}
	for i, r := range p.Rules {
		if _, err := path.Match(r.Subject, ""); err != nil || r.Subject == "" {
			return nil, status.Errorf(codes.InvalidArgument, "authz policy %s: rule %d: bad subject pattern %q", file, i+1, r.Subject)
		}
		for _, a := range r.Allow {
			if !slices.Contains(allPerms, a) {
				return nil, status.Errorf(codes.InvalidArgument, "authz policy %s: rule %d: unknown permission %q (known: %s)", file, i+1, a, strings.Join(allPerms, ", "))
			}
		}
	}
	return p, nil
}

// methodPermission maps a full gRPC method name to the permission it needs; "" is
// allowed to every connected client; an unknown method needs a permission no rule
// grants, so it is refused.
func methodPermission(method string) string {
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
	return "unknown method"
}

// allowed reports whether a client with certificate common name cn may call method.
func (p *AuthzPolicy) allowed(cn, method string) (bool, string) {
	need := methodPermission(method)
	if need == "" {
		return true, need
	}
	return p.allows(cn, need), need
}

// check refuses ctx's call to method unless the policy allows it.
func (p *AuthzPolicy) check(ctx context.Context, method string) error {
	cn, ok := clientCN(ctx)
	if !ok {
		return status.Errorf(codes.Unauthenticated, "%s: no verified client certificate (the server's authorization policy needs one)", method)
	}
	if ok, need := p.allowed(cn, method); !ok {
		return status.Errorf(codes.PermissionDenied, "client %q may not %s (%s; policy %s)", cn, need, method, p.file)
	}
	return nil
}

// clientCN is the common name of ctx's verified client certificate.
func clientCN(ctx context.Context) (string, bool) {
	c, ok := reapi.ClientCert(ctx)
	if !ok {
		return "", false
	}
	return c.Subject.CommonName, true
}

// ServerOptions returns interceptors that enforce the policy on every call.
func (p *AuthzPolicy) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			if err := p.check(ctx, info.FullMethod); err != nil {
				return nil, err
			}
			return h(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			if err := p.check(ss.Context(), info.FullMethod); err != nil {
				return err
			}
			return h(srv, ss)
		}),
	}
}

// String summarises the policy for the start-up log.
func (p *AuthzPolicy) String() string {
	var parts []string
	for _, r := range p.Rules {
		parts = append(parts, fmt.Sprintf("%s:%s", r.Subject, strings.Join(r.Allow, "+")))
	}
	return strings.Join(parts, " ")
}
