package s3

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"

	"github.com/aws/aws-sdk-go-v2/aws"
	awss3 "github.com/aws/aws-sdk-go-v2/service/s3"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ActionCache is the bucket's action cache: the entry for (instance, action) lives at
// PREFIX ac/HH/SHA256(instance NUL action), as the SHA-256 of the serialized
// ActionResult followed by it, so a damaged object is detected and dropped.
type ActionCache struct{ b *Bucket }

// ActionCache returns the bucket's action cache. Wrap it in cache.WithCompletenessCheck
// over the tiered CAS: that check's FindMissing also refreshes old blobs, so a hit keeps
// every blob it references alive under an age-based lifecycle rule.
func (b *Bucket) ActionCache() *ActionCache { return &ActionCache{b: b} }

var _ cache.ActionCache = (*ActionCache)(nil)

func (a *ActionCache) key(k cache.ActionKey) string {
	kh := cache.ActionKeyHash(k)
	return a.b.cfg.Prefix + "ac/" + kh[:2] + "/" + kh
}

// Get implements cache.ActionCache; an entry older than Config.RefreshAfter is
// refreshed, so entries in use outlive the lifecycle rule.
func (a *ActionCache) Get(ctx context.Context, k cache.ActionKey) (*repb.ActionResult, error) {
	key := a.key(k)
	out, err := a.b.client.GetObject(ctx, &awss3.GetObjectInput{Bucket: &a.b.cfg.Bucket, Key: &key})
	if err != nil {
		if isNotFound(err) && !isNoSuchBucket(err) {
			return nil, status.Errorf(codes.NotFound, "no cached result for action %s", k.Action)
		}
		return nil, a.b.wrap(err, "read action cache entry for %s", k.Action)
	}
	defer out.Body.Close()
	if n := aws.ToInt64(out.ContentLength); n > cache.MaxActionResult+sha256.Size {
		return nil, status.Errorf(codes.NotFound, "no cached result for action %s (the entry is %d bytes, over the limit)", k.Action, n)
	}
	b, err := io.ReadAll(io.LimitReader(out.Body, cache.MaxActionResult+sha256.Size+1))
	if err != nil {
		return nil, a.b.wrap(err, "read action cache entry for %s", k.Action)
	}
	r, ok := cache.DecodeActionResult(b)
	if !ok {
		return nil, a.drop(ctx, key, k)
	}
	if mod := aws.ToTime(out.LastModified); a.b.now().Sub(mod) >= a.b.cfg.RefreshAfter {
		if err := a.b.refresh(ctx, key, int64(len(b)), mod); err != nil {
			return nil, a.b.wrap(err, "refresh action cache entry for %s", k.Action)
		}
	}
	return r, nil
}

func (a *ActionCache) drop(ctx context.Context, key string, k cache.ActionKey) error {
	if _, err := a.b.client.DeleteObject(ctx, &awss3.DeleteObjectInput{Bucket: &a.b.cfg.Bucket, Key: &key}); err != nil {
		a.b.log.Warn("could not delete a damaged action cache entry", "key", key, "err", err)
	}
	return status.Errorf(codes.NotFound, "no cached result for action %s (a damaged entry was removed)", k.Action)
}

// Put implements cache.ActionCache: one PUT, signed with the entry's SHA-256, so the
// entry is replaced whole or not at all.
func (a *ActionCache) Put(ctx context.Context, k cache.ActionKey, r *repb.ActionResult) error {
	body, err := cache.EncodeActionResult(k, r)
	if err != nil {
		return err
	}
	payload := sha256.Sum256(body)
	key := a.key(k)
	_, err = a.b.client.PutObject(ctx, &awss3.PutObjectInput{
		Bucket: &a.b.cfg.Bucket, Key: &key, Body: bytes.NewReader(body), ContentLength: aws.Int64(int64(len(body))),
		ContentType: aws.String("application/octet-stream"),
	}, withPayloadHash(hex.EncodeToString(payload[:])))
	return a.b.wrap(err, "write action cache entry for %s", k.Action)
}
