package cache

import (
	"context"
	"os"
)

// LocalFiles is the part of a store whose blobs are files on this machine. The
// executor hardlinks read-only inputs from it and adopts outputs into it instead of
// copying bytes; it is passed to the executor explicitly (never found by a type
// assertion on a BlobStore, which any decorator would hide). A store without a local
// disk tier has none, and the executor copies through its BlobStore.
type LocalFiles interface {
	// BlobFile returns the path of a verified local file holding blob d, first bringing
	// the blob to the local disk when the store keeps it in another tier; NOT_FOUND if
	// no tier holds it. The file is shared and read-only: callers may hardlink or read
	// it, never write it, and it may be evicted (removed) at any time after the call.
	BlobFile(ctx context.Context, d Digest) (string, error)
	// AdoptFile stores the open file f, already hashed to d, made root-owned and
	// read-only, and never written again, as blob d, linking its inode where it can. As
	// with Put, success means every tier of the store holds the blob.
	AdoptFile(ctx context.Context, d Digest, f *os.File) error
}
