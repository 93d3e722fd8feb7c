// Package s3 keeps kiln's store in an S3-compatible bucket: CAS blobs, action-cache
// entries and attestations under their own key prefixes (see docs/storage.md for the
// layout and the lifecycle rule to set on each). Objects only ever appear whole and
// verified: small blobs in one PUT whose SHA-256 the server checks, large ones as a
// multipart upload from a verified local file, visible only once completed.
//
// It uses aws-sdk-go-v2 rather than minio-go because credentials must come from the
// AWS SDK's own standard chain (environment, shared config and credentials files with
// profiles, SSO and credential_process, web identity, ECS and EC2 instance roles),
// which minio-go reimplements only in part; the SDK also lets kiln sign a PUT with the
// blob's digest as the payload hash, so the server verifies it without a second read.
package s3

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/config"
	awss3 "github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/smithy-go"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Bucket is an open bucket (and key prefix) with kiln's layout in it.
type Bucket struct {
	cfg     Config
	client  *awss3.Client
	log     *slog.Logger
	now     func() time.Time
	where   string // "bucket B at ENDPOINT", for errors
	cas     *CAS   // PREFIX cas/
	attest  *CAS   // PREFIX attest/
	copyMax int64  // largest object refreshed with one CopyObject (S3: 5 GiB)
	// inPlaceStale is set once a copy in place kept an object's old timestamp.
	inPlaceStale atomic.Bool
}

// Options are what a Bucket needs besides its Config.
type Options struct {
	Logger *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// MaxExistsEntries bounds the positive-existence cache; 0 means 4 million.
	MaxExistsEntries int
}

// Open connects to the bucket named by cfg with credentials from the AWS SDK's
// standard chain and checks at once that the bucket exists and the credentials are
// accepted, so a misconfiguration is one clear error at start, not a failure later.
func Open(ctx context.Context, cfg Config, opts Options) (*Bucket, error) {
	if err := cfg.Check(); err != nil {
		return nil, err
	}
	cfg = cfg.Resolved()
	b := &Bucket{cfg: cfg, log: opts.Logger, now: opts.Now, copyMax: 5 << 30}
	if b.log == nil {
		b.log = slog.New(slog.DiscardHandler)
	}
	if b.now == nil {
		b.now = time.Now
	}
	endpoint := cfg.Endpoint
	if endpoint == "" {
		endpoint = "AWS S3"
	}
	b.where = fmt.Sprintf("bucket %s at %s", cfg.Bucket, endpoint)
	b.cas = newCAS(b, "cas", true, opts.MaxExistsEntries)
	b.attest = newCAS(b, "attest", false, 1<<16)

	httpClient := awshttp.NewBuildableClient().WithTransportOptions(func(t *http.Transport) {
		// Parallel HEADs and part uploads each want a connection of their own.
		t.MaxIdleConns = 4 * cfg.Concurrency
		t.MaxIdleConnsPerHost = 4 * cfg.Concurrency
	})
	loadOpts := []func(*config.LoadOptions) error{config.WithHTTPClient(httpClient)}
	if cfg.Region != "" {
		loadOpts = append(loadOpts, config.WithRegion(cfg.Region))
	}
	awsCfg, err := config.LoadDefaultConfig(ctx, loadOpts...)
	if err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "storage %s: AWS configuration: %v", b.where, err)
	}
	if awsCfg.Region == "" {
		awsCfg.Region = "us-east-1"
	}
	b.client = awss3.NewFromConfig(awsCfg, func(o *awss3.Options) {
		if cfg.Endpoint != "" {
			o.BaseEndpoint = aws.String(cfg.Endpoint)
		}
		o.UsePathStyle = cfg.PathStyle
		// No "Expect: 100-continue" on large bodies: a server that does not answer it
		// would stall every part for a second, and kiln's bodies are verified already.
		o.ContinueHeaderThresholdBytes = -1
		// kiln verifies every blob by its SHA-256 itself; the SDK's extra CRCs would
		// only read each body once more.
		o.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
		o.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenRequired
		o.Retryer = retry.NewStandard(func(so *retry.StandardOptions) {
			so.MaxAttempts = 3
			so.MaxBackoff = 2 * time.Second
		})
	})
	if err := b.probe(ctx); err != nil {
		return nil, err
	}
	return b, nil
}

// probe reads a key that does not exist. A GET (unlike a HEAD) gets an error body, so
// NoSuchKey proves the bucket exists and the credentials sign correctly, and
// NoSuchBucket, InvalidAccessKeyId or AccessDenied say precisely what is wrong.
func (b *Bucket) probe(ctx context.Context) error {
	out, err := b.client.GetObject(ctx, &awss3.GetObjectInput{Bucket: &b.cfg.Bucket, Key: aws.String(b.cfg.Prefix + "kiln-probe")})
	if err == nil {
		out.Body.Close()
		return nil
	}
	if isNotFound(err) && !isNoSuchBucket(err) {
		return nil
	}
	return b.wrap(err, "open storage")
}

// String describes the bucket for logs.
func (b *Bucket) String() string { return "s3 " + b.where }

// Config returns the bucket's configuration, defaults filled in.
func (b *Bucket) Config() Config { return b.cfg }

// wrap turns an SDK error into a gRPC status naming the bucket and endpoint: an
// unreachable or failing server is UNAVAILABLE (clients retry), refused credentials
// and a missing bucket are FAILED_PRECONDITION, a missing key NOT_FOUND.
func (b *Bucket) wrap(err error, format string, args ...any) error {
	what := fmt.Sprintf(format, args...)
	if err == nil {
		return nil
	}
	if s, ok := status.FromError(err); ok && s.Code() != codes.Unknown {
		return grpcerr.Wrap(err, "%s", what)
	}
	switch {
	case errors.Is(err, context.Canceled):
		return status.Errorf(codes.Canceled, "%s in %s: %v", what, b.where, context.Canceled)
	case errors.Is(err, context.DeadlineExceeded):
		return status.Errorf(codes.DeadlineExceeded, "%s in %s: %v", what, b.where, context.DeadlineExceeded)
	}
	var api smithy.APIError
	var re *awshttp.ResponseError
	code, httpStatus := "", 0
	if errors.As(err, &api) {
		code = api.ErrorCode()
	}
	if errors.As(err, &re) {
		httpStatus = re.HTTPStatusCode()
	}
	switch {
	case code == "NoSuchBucket":
		return status.Errorf(codes.FailedPrecondition, "%s: %s: the bucket does not exist", what, b.where)
	case strings.Contains(err.Error(), "get credentials") || strings.Contains(err.Error(), "get identity"):
		return status.Errorf(codes.FailedPrecondition, "%s: no AWS credentials for %s: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a shared credentials file (AWS_PROFILE) or an instance role", what, b.where)
	case code == "InvalidAccessKeyId" || code == "SignatureDoesNotMatch" || code == "ExpiredToken" || code == "InvalidToken" || code == "XAdminUserNotFound":
		return status.Errorf(codes.FailedPrecondition, "%s: %s refused kiln's AWS credentials (%s); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the shared credentials file or the instance role", what, b.where, code)
	case code == "AccessDenied" || httpStatus == http.StatusForbidden:
		return status.Errorf(codes.FailedPrecondition, "%s: %s denied access (wrong credentials, or they lack permission on the bucket)", what, b.where)
	case isNotFound(err):
		return status.Errorf(codes.NotFound, "%s: not found in %s", what, b.where)
	case httpStatus >= 500 || httpStatus == http.StatusTooManyRequests || code == "SlowDown":
		return status.Errorf(codes.Unavailable, "%s: %s failed (HTTP %d %s)", what, b.where, httpStatus, code)
	case httpStatus == 0 && isNetwork(err):
		// No answer at all: refused, reset, timed out or unresolvable.
		return status.Errorf(codes.Unavailable, "%s: %s is unreachable: %s", what, b.where, netCause(err))
	case httpStatus == 0:
		return status.Errorf(codes.Internal, "%s: %s: %v", what, b.where, err)
	}
	return status.Errorf(codes.Internal, "%s: %s: HTTP %d %s", what, b.where, httpStatus, code)
}

// netCause is the innermost network error's text, without the SDK's retry chatter.
func netCause(err error) string {
	var op *net.OpError
	if errors.As(err, &op) {
		return op.Error()
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return "connection closed mid-request"
	}
	s := err.Error()
	if i := strings.LastIndex(s, ": "); i >= 0 && len(s)-i < 200 {
		return s[i+2:]
	}
	return s
}

// isNetwork reports whether err is a transport failure (no HTTP answer).
func isNetwork(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EPIPE)
}

// isNotFound reports a missing key or bucket. A 404 with another error code is not
// one (versitygw answers an unknown access key with 404 XAdminUserNotFound).
func isNotFound(err error) bool {
	var api smithy.APIError
	if errors.As(err, &api) && api.ErrorCode() != "" {
		switch api.ErrorCode() {
		case "NoSuchKey", "NotFound", "NoSuchBucket":
			return true
		}
		return false
	}
	var re *awshttp.ResponseError
	return errors.As(err, &re) && re.HTTPStatusCode() == http.StatusNotFound
}

func isNoSuchBucket(err error) bool {
	var api smithy.APIError
	return errors.As(err, &api) && api.ErrorCode() == "NoSuchBucket"
}
