package cache_test

import (
	"context"
	"testing"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/cachetest"
	"github.com/prometheus/client_golang/prometheus"
)

// holdsAll is a CAS in which every blob is present, so that the completeness check
// passes every result through.
type holdsAll struct{ cache.BlobStore }

func (holdsAll) FindMissing(context.Context, []cache.Digest) ([]cache.Digest, error) { return nil, nil }

// TestDecoratorsConform: every decorator in package cache keeps the contract of the
// store it wraps.
func TestDecoratorsConform(t *testing.T) {
	metrics := func() *cache.Metrics { return cache.NewMetrics(prometheus.NewRegistry()) }
	t.Run("EmptyBlob", func(t *testing.T) {
		cachetest.BlobStore(t, func(*testing.T) cache.BlobStore { return cache.WithEmptyBlob(cache.NewMemoryStore()) })
	})
	t.Run("Metrics", func(t *testing.T) {
		cachetest.BlobStore(t, func(*testing.T) cache.BlobStore { return metrics().BlobStore("cas", cache.NewMemoryStore()) })
		cachetest.ActionCache(t, func(*testing.T) cache.ActionCache { return metrics().ActionCache(cache.NewMemoryStore().ActionCache()) })
	})
	t.Run("Completeness", func(t *testing.T) {
		cachetest.ActionCache(t, func(*testing.T) cache.ActionCache {
			m := cache.NewMemoryStore()
			return cache.WithCompletenessCheck(m.ActionCache(), holdsAll{m})
		})
	})
	t.Run("Namespace", func(t *testing.T) {
		cachetest.ActionCache(t, func(*testing.T) cache.ActionCache {
			return cache.WithNamespace(cache.NewMemoryStore().ActionCache(), "\x00test")
		})
	})
}
