package cache

import "fmt"

// Store is a whole storage backend as the engine opens and closes it: the blobs and
// the action cache they back (the disk store by default; a tiered store of a bucket
// and a local disk in a cluster). Its local files, if any, are a LocalFiles, passed
// on separately.
type Store interface {
	BlobStore
	// ActionCache is the action cache kept with the blobs.
	ActionCache() ActionCache
	// String describes the store for logs.
	fmt.Stringer
	// Close releases the store; nothing may use it after.
	Close() error
}
