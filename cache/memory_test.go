package cache_test

import (
	"testing"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/cachetest"
)

func TestMemoryStore(t *testing.T) {
	cachetest.BlobStore(t, func(*testing.T) cache.BlobStore { return cache.NewMemoryStore() })
	cachetest.ActionCache(t, func(*testing.T) cache.ActionCache { return cache.NewMemoryStore().ActionCache() })
}
