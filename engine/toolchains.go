package engine

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/s3"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	"github.com/kilnbuild/kiln/toolchains"
	"golang.org/x/sync/singleflight"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Toolchains in shared storage: `kiln toolchain import|build --storage` exports the
// image as an OCI archive into the bucket's CAS and writes a record
// toolchains/<manifest hex> naming that archive. A process with the same --storage
// (a cluster worker, kiln serve or kiln exec on another machine) that is asked for a
// pinned toolchain it lacks fetches the archive through its verified local tier and
// imports it, which checks every blob, the config's diff_ids and every layer entry,
// and keeps it: once per data dir (node), however many actions ask at once.

// toolchainRecord is the bucket's record of a shared toolchain image.
type toolchainRecord struct {
	Manifest string `json:"manifest"` // sha256:HEX
	Archive  string `json:"archive"`  // the OCI archive blob in the CAS, HASH/SIZE
}

func toolchainKey(manifest string) string {
	return "toolchains/" + strings.TrimPrefix(manifest, "sha256:")
}

// ShareToolchain puts the image ref names (in store) into shared storage, so that
// every process using the same storage can run actions on it.
func ShareToolchain(ctx context.Context, storage StorageConfig, store *toolchains.Store, ref string, log *slog.Logger) error {
	if storage.S3 == nil {
		return nil
	}
	b, err := s3.Open(ctx, *storage.S3, s3.Options{Logger: log})
	if err != nil {
		return err
	}
	img, err := store.Resolve(ctx, ref)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp(store.Dir(), "share-")
	if err != nil {
		return status.Errorf(codes.Internal, "share toolchain: %v", err)
	}
	defer os.RemoveAll(dir)
	tar := filepath.Join(dir, "image.tar")
	if err := store.Export(ctx, img.Digest.String(), tar); err != nil {
		return err
	}
	f, err := os.Open(tar)
	if err != nil {
		return status.Errorf(codes.Internal, "share toolchain: %v", err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return status.Errorf(codes.Internal, "share toolchain: %v", err)
	}
	d := cache.Digest{Hash: hex.EncodeToString(h.Sum(nil)), Size: n}
	if err := b.CAS().PutFile(ctx, d, f); err != nil {
		return grpcerr.Wrap(err, "share toolchain %s", img.Digest)
	}
	rec, _ := json.Marshal(toolchainRecord{Manifest: img.Digest.String(), Archive: d.String()})
	if err := b.PutObject(ctx, toolchainKey(img.Digest.String()), rec); err != nil {
		return grpcerr.Wrap(err, "share toolchain %s", img.Digest)
	}
	log.Info("toolchain shared", "digest", img.Digest, "archive", d.String(), "storage", b.String())
	return nil
}

// toolchainResolver adapts the toolchain store to the executor; with shared storage
// it fetches a pinned toolchain the store lacks from the bucket.
type toolchainResolver struct {
	s      *toolchains.Store
	bucket *s3.Bucket       // nil without shared storage
	local  cache.LocalFiles // the bucket's verified local tier
	fetch  *singleflight.Group
	log    *slog.Logger
}

func (e *Engine) toolchainResolver() toolchainResolver {
	return toolchainResolver{s: e.Toolchains, bucket: e.Bucket, local: e.Local, fetch: &singleflight.Group{}, log: e.log}
}

func (t toolchainResolver) resolve(ctx context.Context, ref string) (toolchains.Image, error) {
	img, err := t.s.Resolve(ctx, ref)
	if err == nil || t.bucket == nil || t.local == nil || status.Code(err) != codes.FailedPrecondition {
		return img, err
	}
	r, perr := toolchains.ParseRef(ref)
	if ref == "" || perr != nil || !r.Pinned() {
		return img, err
	}
	if _, ferr, _ := t.fetch.Do(r.Digest.String(), func() (any, error) { return nil, t.fromBucket(ctx, r.Digest.String()) }); ferr != nil {
		if status.Code(ferr) == codes.NotFound {
			return img, err // neither here nor shared: the store's own message says what to do
		}
		return img, ferr
	}
	return t.s.Resolve(ctx, ref)
}

// fromBucket imports the shared toolchain with manifest digest d into the store.
func (t toolchainResolver) fromBucket(ctx context.Context, d string) error {
	raw, err := t.bucket.GetObject(ctx, toolchainKey(d), 1<<16)
	if err != nil {
		return err
	}
	var rec toolchainRecord
	if err := json.Unmarshal(raw, &rec); err != nil || rec.Manifest != d {
		return status.Errorf(codes.DataLoss, "shared toolchain record %s is damaged", toolchainKey(d))
	}
	ad, err := cache.ParseDigest(rec.Archive)
	if err != nil {
		return status.Errorf(codes.DataLoss, "shared toolchain record %s: %v", toolchainKey(d), err)
	}
	path, err := t.local.BlobFile(ctx, ad)
	if err != nil {
		return grpcerr.Wrap(err, "fetch shared toolchain %s", d)
	}
	imgs, err := t.s.Import(ctx, path, toolchains.ImportOptions{})
	if err != nil {
		return grpcerr.Wrap(err, "import shared toolchain %s", d)
	}
	for _, img := range imgs {
		if img.Digest.String() == d {
			t.log.Info("toolchain fetched from shared storage", "digest", d)
			return nil
		}
	}
	return status.Errorf(codes.DataLoss, "shared toolchain archive %s does not hold image %s", ad, d)
}

func (t toolchainResolver) Resolve(ctx context.Context, ref string) (string, error) {
	img, err := t.resolve(ctx, ref)
	if err != nil {
		return "", err
	}
	return img.Digest.String(), nil
}

func (t toolchainResolver) RootFS(ctx context.Context, digest string) (string, error) {
	img, err := t.resolve(ctx, digest)
	if err != nil {
		return "", err
	}
	return t.s.RootFS(ctx, img)
}
