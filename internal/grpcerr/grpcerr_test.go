package grpcerr_test

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestWrapKeepsCodeAndDetails: wrapping, even several times, keeps a MISSING
// PreconditionFailure's every violation and its code, and adds the context.
func TestWrapKeepsCodeAndDetails(t *testing.T) {
	a, b := cache.DigestOf([]byte("a")), cache.DigestOf([]byte("b"))
	missing := cache.MissingBlobsError("blobs are not in the CAS", []cache.Digest{a, b})
	err := grpcerr.Wrap(grpcerr.Wrap(missing, "input tree"), "verify run %d", 1)
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("code %v, want FAILED_PRECONDITION", status.Code(err))
	}
	if got := cache.MissingFromError(err); len(got) != 2 || got[0] != a || got[1] != b {
		t.Fatalf("missing %v, want %v and %v", got, a, b)
	}
	if msg := status.Convert(err).Message(); msg != "verify run 1: input tree: blobs are not in the CAS" {
		t.Fatalf("message %q", msg)
	}
	// A status wrapped by fmt.Errorf's %w keeps its code and details too.
	if got := cache.MissingFromError(grpcerr.Wrap(fmt.Errorf("inner: %w", missing), "outer")); len(got) != 2 {
		t.Fatalf("through %%w: missing %v", got)
	}
	if grpcerr.Wrap(nil, "x") != nil {
		t.Fatal("Wrap(nil) is not nil")
	}
}

func TestWrapCodeOfPlainErrors(t *testing.T) {
	for _, c := range []struct {
		err  error
		want codes.Code
	}{
		{errors.New("disk on fire"), codes.Internal},
		{context.Canceled, codes.Canceled},
		{fmt.Errorf("read: %w", context.DeadlineExceeded), codes.DeadlineExceeded},
		{status.Error(codes.NotFound, "gone"), codes.NotFound},
		{status.Error(codes.Unknown, "who knows"), codes.Internal},
	} {
		err := grpcerr.WrapCode(c.err, codes.Internal, "rootfs %s", "x")
		if status.Code(err) != c.want {
			t.Errorf("%v: code %v, want %v", c.err, status.Code(err), c.want)
		}
	}
	if got := status.Code(grpcerr.Wrap(errors.New("plain"), "ctx")); got != codes.Unknown {
		t.Errorf("Wrap of a plain error: %v, want UNKNOWN", got)
	}
}
