package s3

import (
	"bytes"
	"context"
	"io"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awss3 "github.com/aws/aws-sdk-go-v2/service/s3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Objects are small records kiln keeps in the bucket beside its content-addressed
// prefixes, under PREFIX + key: the cluster's pending links (pending/, waiting for the
// sequencer) and the records of shared toolchains (toolchains/). Neither may have a
// lifecycle rule. Their contents are checked by whoever reads them (a pending link
// names an envelope that is verified by its digest; a toolchain record names an
// archive blob that is verified, then imported and verified again).

// PutObject writes the object key (a PUT is atomic: readers see all of it or none).
func (b *Bucket) PutObject(ctx context.Context, key string, data []byte) error {
	k := b.cfg.Prefix + key
	_, err := b.client.PutObject(ctx, &awss3.PutObjectInput{Bucket: &b.cfg.Bucket, Key: &k,
		Body: bytes.NewReader(data), ContentLength: aws.Int64(int64(len(data)))})
	return b.wrap(err, "write %s", key)
}

// GetObject reads the object key, at most max bytes; a missing one is NOT_FOUND.
func (b *Bucket) GetObject(ctx context.Context, key string, max int64) ([]byte, error) {
	k := b.cfg.Prefix + key
	out, err := b.client.GetObject(ctx, &awss3.GetObjectInput{Bucket: &b.cfg.Bucket, Key: &k})
	if err != nil {
		if isNotFound(err) && !isNoSuchBucket(err) {
			return nil, status.Errorf(codes.NotFound, "%s not found in %s", key, b.where)
		}
		return nil, b.wrap(err, "read %s", key)
	}
	defer out.Body.Close()
	data, err := io.ReadAll(io.LimitReader(out.Body, max+1))
	if err != nil {
		return nil, b.wrap(err, "read %s", key)
	}
	if int64(len(data)) > max {
		return nil, status.Errorf(codes.FailedPrecondition, "%s in %s is larger than %d bytes", key, b.where, max)
	}
	return data, nil
}

// DeleteObject removes the object key; a missing one is no error.
func (b *Bucket) DeleteObject(ctx context.Context, key string) error {
	k := b.cfg.Prefix + key
	_, err := b.client.DeleteObject(ctx, &awss3.DeleteObjectInput{Bucket: &b.cfg.Bucket, Key: &k})
	if err != nil && isNotFound(err) && !isNoSuchBucket(err) {
		return nil
	}
	return b.wrap(err, "delete %s", key)
}

// Object is a listed object: its key as PutObject takes it, and when it was written.
type Object struct {
	Key      string
	Modified time.Time
}

// ListObjects returns up to max objects under prefix, in the bucket's order (lexical by
// key), starting after the key after ("" for the first).
func (b *Bucket) ListObjects(ctx context.Context, prefix, after string, max int) ([]Object, error) {
	p := b.cfg.Prefix + prefix
	in := &awss3.ListObjectsV2Input{Bucket: &b.cfg.Bucket, Prefix: &p, MaxKeys: aws.Int32(int32(min(max, 1000)))}
	if after != "" {
		in.StartAfter = aws.String(b.cfg.Prefix + after)
	}
	var keys []Object
	for len(keys) < max {
		out, err := b.client.ListObjectsV2(ctx, in)
		if err != nil {
			return nil, b.wrap(err, "list %s", prefix)
		}
		for _, o := range out.Contents {
			keys = append(keys, Object{Key: strings.TrimPrefix(aws.ToString(o.Key), b.cfg.Prefix), Modified: aws.ToTime(o.LastModified)})
		}
		if !aws.ToBool(out.IsTruncated) || out.NextContinuationToken == nil {
			break
		}
		in.ContinuationToken, in.StartAfter = out.NextContinuationToken, nil
	}
	if len(keys) > max {
		keys = keys[:max]
	}
	return keys, nil
}

// ListKeys returns the keys of up to max objects under prefix, in lexical order.
func (b *Bucket) ListKeys(ctx context.Context, prefix string, max int) ([]string, error) {
	objs, err := b.ListObjects(ctx, prefix, "", max)
	if err != nil {
		return nil, err
	}
	keys := make([]string, len(objs))
	for i, o := range objs {
		keys[i] = o.Key
	}
	return keys, nil
}
