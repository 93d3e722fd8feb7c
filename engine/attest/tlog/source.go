package tlog

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/transparency-dev/tessera/api/layout"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Source is where a Reader finds a log's files, by their C2SP tlog-tiles paths
// ("checkpoint", "tile/0/x001/234", "tile/entries/000.p/17"): the log's own directory,
// or a copy of it published to object storage.
type Source interface {
	// ReadFile returns the file at p; an absent one is an error that wraps
	// fs.ErrNotExist.
	ReadFile(ctx context.Context, p string) ([]byte, error)
	// Partials returns the widths of the partial versions (p + ".p/<width>") present
	// of the tile or entry bundle whose full path is p.
	Partials(ctx context.Context, p string) ([]int, error)
	// String names the source for messages.
	String() string
}

// DirSource reads a log from its directory.
func DirSource(dir string) Source { return dirSource(dir) }

type dirSource string

func (d dirSource) ReadFile(_ context.Context, p string) ([]byte, error) {
	return os.ReadFile(filepath.Join(string(d), filepath.FromSlash(p)))
}

func (d dirSource) Partials(_ context.Context, p string) ([]int, error) {
	ents, err := os.ReadDir(filepath.Join(string(d), filepath.FromSlash(p)+".p"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var ws []int
	for _, e := range ents {
		if n, err := strconv.Atoi(e.Name()); err == nil {
			ws = append(ws, n)
		}
	}
	return ws, nil
}

func (d dirSource) String() string { return string(d) }

// Objects is an object store a log is published to and read from: an S3 bucket (its
// keys already under the deployment's prefix). A missing object is a NOT_FOUND status.
type Objects interface {
	GetObject(ctx context.Context, key string, max int64) ([]byte, error)
	PutObject(ctx context.Context, key string, data []byte) error
	DeleteObject(ctx context.Context, key string) error
	// ListKeys returns the keys under prefix (at most max).
	ListKeys(ctx context.Context, prefix string, max int) ([]string, error)
	String() string
}

// maxLogObject bounds what is read of one published file: a checkpoint is a few hundred
// bytes, a tile 8 KiB, an entry bundle 256 entries of at most 64 KiB each.
const maxLogObject = 256 * (2 + 64<<10)

// ObjectSource reads a log published under prefix (e.g. "log/") of o. Full tiles and
// full entry bundles never change, so up to cacheBytes of them are kept in memory;
// checkpoints and partial tiles are read every time.
func ObjectSource(o Objects, prefix string, cacheBytes int) Source {
	return &objectSource{o: o, prefix: prefix, max: cacheBytes, cache: map[string][]byte{}}
}

type objectSource struct {
	o      Objects
	prefix string
	max    int

	mu    sync.Mutex
	cache map[string][]byte
	bytes int
}

// immutable reports whether p names a full tile or entry bundle.
func immutable(p string) bool {
	return strings.HasPrefix(p, "tile/") && !strings.Contains(p, ".p/")
}

func (s *objectSource) ReadFile(ctx context.Context, p string) ([]byte, error) {
	keep := immutable(p)
	if keep {
		s.mu.Lock()
		b, ok := s.cache[p]
		s.mu.Unlock()
		if ok {
			return b, nil
		}
	}
	b, err := s.o.GetObject(ctx, s.prefix+p, maxLogObject)
	if status.Code(err) == codes.NotFound {
		return nil, fmt.Errorf("%s%s: %w", s.prefix, p, fs.ErrNotExist)
	}
	if err != nil {
		return nil, err
	}
	if keep && len(b) <= s.max {
		s.mu.Lock()
		for k, v := range s.cache { // evict arbitrary entries until it fits
			if s.bytes+len(b) <= s.max {
				break
			}
			delete(s.cache, k)
			s.bytes -= len(v)
		}
		if _, ok := s.cache[p]; !ok {
			s.cache[p] = b
			s.bytes += len(b)
		}
		s.mu.Unlock()
	}
	return b, nil
}

func (s *objectSource) Partials(ctx context.Context, p string) ([]int, error) {
	keys, err := s.o.ListKeys(ctx, s.prefix+p+".p/", layout.TileWidth)
	if err != nil {
		return nil, err
	}
	var ws []int
	for _, k := range keys {
		if n, err := strconv.Atoi(path.Base(k)); err == nil {
			ws = append(ws, n)
		}
	}
	return ws, nil
}

func (s *objectSource) String() string { return s.o.String() + " (" + s.prefix + ")" }

// sourceCode is the gRPC code for a failed read from a source: the source's own
// (UNAVAILABLE for an unreachable bucket), else INTERNAL.
func sourceCode(err error) codes.Code {
	if s, ok := status.FromError(err); ok && s.Code() != codes.Unknown && s.Code() != codes.OK {
		return s.Code()
	}
	return codes.Internal
}
