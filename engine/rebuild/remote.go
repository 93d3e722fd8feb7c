package rebuild

import (
	"context"

	"github.com/bazelbuild/remote-apis-sdks/go/pkg/client"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/digest"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/uploadinfo"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/engine/auth"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// RemoteExecutor re-executes actions on another kiln server: it uploads what the
// server lacks, executes with skip_cache_lookup, and believes nothing the server says
// but what a link signed by a trusted key of that server says: the result's link must
// verify against Trust, name the action, and list exactly the products returned.
type RemoteExecutor struct {
	c     *client.Client
	trust keys.Trust
}

// RemoteTLS names the files for talking to a remote server: the PEM CAs that sign its
// certificate, a client certificate and key when it requires one (mTLS), and a bearer
// token file when it requires a token (kiln serve --oidc-issuer; re-read when it
// changes, see auth.TokenFile).
type RemoteTLS struct {
	CA, Cert, Key string
	TokenFile     string
}

// DialRemote connects to the kiln server at addr whose executor keys are trust;
// plaintext unless t.CA is set.
func DialRemote(ctx context.Context, addr, instance string, t RemoteTLS, trust keys.Trust) (*RemoteExecutor, error) {
	if len(trust.Keys) == 0 {
		return nil, status.Error(codes.InvalidArgument, "a remote rebuild needs the remote executor's public key (--remote-key)")
	}
	if (t.Cert == "") != (t.Key == "") || (t.Cert != "" && t.CA == "") {
		return nil, status.Error(codes.InvalidArgument, "--remote-client-cert and --remote-client-key go together, and with --remote-ca")
	}
	p := client.DialParams{Service: addr, NoSecurity: t.CA == "", TLSCACertFile: t.CA,
		TLSClientAuthCert: t.Cert, TLSClientAuthKey: t.Key, NoAuth: true}
	if t.TokenFile != "" {
		if t.CA == "" && !auth.IsLoopback(addr) {
			return nil, status.Errorf(codes.InvalidArgument, "--remote-token-file over plaintext to %s could be read on the way: add --remote-ca (plaintext is accepted on loopback only)", addr)
		}
		tf, err := auth.NewTokenFile(t.TokenFile, t.CA == "")
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "--remote-token-file: %v", status.Convert(err).Message())
		}
		p.DialOpts = append(p.DialOpts, grpc.WithPerRPCCredentials(tf))
	}
	c, err := client.NewClient(ctx, instance, p, client.RetryTransient())
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "connect to %s: %v", addr, err)
	}
	return &RemoteExecutor{c: c, trust: trust}, nil
}

// Close closes the connection.
func (r *RemoteExecutor) Close() error { return r.c.Close() }

// Execute implements Executor.
func (r *RemoteExecutor) Execute(ctx context.Context, ad cache.Digest, src cache.BlobStore) (Run, error) {
	ds, err := actionBlobs(ctx, src, ad)
	if err != nil {
		return Run{}, err
	}
	var sdk []digest.Digest
	for _, d := range ds {
		sdk = append(sdk, digest.Digest{Hash: d.Hash, Size: d.Size})
	}
	missing, err := r.c.MissingBlobs(ctx, sdk)
	if err != nil {
		return Run{}, err
	}
	var entries []*uploadinfo.Entry
	for _, d := range missing {
		b, err := cache.ReadAll(ctx, src, cache.Digest{Hash: d.Hash, Size: d.Size}, 0)
		if err != nil {
			return Run{}, grpcerr.Wrap(err, "blob %s", d)
		}
		entries = append(entries, uploadinfo.EntryFromBlob(b))
	}
	if _, _, err := r.c.UploadIfMissing(ctx, entries...); err != nil {
		return Run{}, err
	}
	op, err := r.c.ExecuteAndWait(ctx, &repb.ExecuteRequest{InstanceName: r.c.InstanceName, ActionDigest: ad.Proto(), SkipCacheLookup: true})
	if err != nil {
		return Run{}, err
	}
	if e := op.GetError(); e != nil {
		return Run{}, status.ErrorProto(e)
	}
	resp := &repb.ExecuteResponse{}
	if err := op.GetResponse().UnmarshalTo(resp); err != nil {
		return Run{}, status.Errorf(codes.Internal, "execute response: %v", err)
	}
	if s := resp.GetStatus(); s.GetCode() != 0 {
		return Run{}, status.ErrorProto(s)
	}
	return r.verifiedRun(ctx, ad, resp.GetResult())
}

// verifiedRun checks the result's link and returns the products it signs.
func (r *RemoteExecutor) verifiedRun(ctx context.Context, ad cache.Digest, res *repb.ActionResult) (Run, error) {
	ld, ok, err := attest.LinkFromResult(res)
	if err != nil || !ok {
		return Run{}, status.Errorf(codes.FailedPrecondition, "the remote result of %s carries no link (%v): nothing vouches for its products", ad, err)
	}
	raw, _, err := r.c.ReadBlob(ctx, digest.Digest{Hash: ld.Hash, Size: ld.Size})
	if err != nil {
		return Run{}, grpcerr.Wrap(err, "link %s", ld)
	}
	if cache.DigestOf(raw) != ld {
		return Run{}, status.Errorf(codes.DataLoss, "link %s: the remote sent other bytes", ld)
	}
	env, err := attest.ParseEnvelope(raw)
	if err != nil {
		return Run{}, err
	}
	_, payload, err := attest.VerifyEnvelope(ctx, env, r.trust)
	if err != nil {
		return Run{}, grpcerr.Wrap(err, "link of the remote run of %s", ad)
	}
	link, err := attest.DecodeLink(payload)
	if err != nil {
		return Run{}, err
	}
	if link.Name != ad.Hash {
		return Run{}, status.Errorf(codes.FailedPrecondition, "the remote run's link is for action %s, not %s", link.Name, ad.Hash)
	}
	products := map[string]string{}
	for p, hs := range link.Products {
		for alg, h := range hs {
			products[p] = alg + ":" + h
		}
	}
	// The result handed back must be what the link signs.
	for _, f := range res.GetOutputFiles() {
		if products[f.GetPath()] != attest.AlgSHA256+":"+f.GetDigest().GetHash() {
			return Run{}, status.Errorf(codes.FailedPrecondition, "the remote result's %s is not what its link signs", f.GetPath())
		}
	}
	code := 0
	if v, ok := link.ByProducts[attest.ByproductReturnValue].(float64); ok {
		code = int(v)
	}
	if code != int(res.GetExitCode()) {
		return Run{}, status.Errorf(codes.FailedPrecondition, "the remote result's exit code %d is not its link's %d", res.GetExitCode(), code)
	}
	return Run{Products: products, ExitCode: code, Link: ld}, nil
}
