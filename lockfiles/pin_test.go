package lockfiles_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnbuild/kiln/lockfiles"
	"github.com/kilnbuild/kiln/toolchains"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestLockfilePinsToolchainTags resolves `container-image` tags through a real
// toolchain store with the lockfile as its pinner: a pinned tag resolves to the pinned
// image, an unpinned tag is still refused.
func TestLockfilePinsToolchainTags(t *testing.T) {
	ctx := context.Background()
	rootfs := t.TempDir()
	if err := os.WriteFile(filepath.Join(rootfs, "tool"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	lock := lockfiles.New()
	store, err := toolchains.Open(ctx, t.TempDir(), toolchains.Options{Pinner: lock})
	if err != nil {
		t.Fatal(err)
	}
	img, err := store.Build(ctx, rootfs, toolchains.BuildOptions{Name: "kiln/tool:1"})
	if err != nil {
		t.Fatal(err)
	}
	if err := lock.SetToolchain("kiln/tool:1", lockfiles.Toolchain{Digest: img.Digest.String(), Source: "test build"}); err != nil {
		t.Fatal(err)
	}
	got, err := store.Resolve(ctx, "docker://kiln/tool:1")
	if err != nil || got.Digest != img.Digest {
		t.Fatalf("pinned tag: %v, %v; want %s", got.Digest, err, img.Digest)
	}
	_, err = store.Resolve(ctx, "docker://kiln/tool:2")
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "unpinned") {
		t.Fatalf("unpinned tag: %v, want FAILED_PRECONDITION", err)
	}
}
