package cache

import (
	"bytes"
	"context"
	"io"
	"sync"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// MemoryStore is an in-memory BlobStore and ActionCache for tests.
type MemoryStore struct {
	mu    sync.Mutex
	blobs map[Digest][]byte
	ac    map[ActionKey][]byte
}

// NewMemoryStore returns an empty MemoryStore.
func NewMemoryStore() *MemoryStore {
	return &MemoryStore{blobs: map[Digest][]byte{}, ac: map[ActionKey][]byte{}}
}

// Get implements BlobStore.
func (m *MemoryStore) Get(_ context.Context, d Digest, offset int64) (io.ReadCloser, error) {
	if offset < 0 || offset > d.Size {
		return nil, status.Errorf(codes.OutOfRange, "offset %d outside blob %s", offset, d)
	}
	m.mu.Lock()
	b, ok := m.blobs[d]
	m.mu.Unlock()
	if !ok {
		return nil, status.Errorf(codes.NotFound, "blob %s not found", d)
	}
	return io.NopCloser(bytes.NewReader(b[offset:])), nil
}

// Put implements BlobStore.
func (m *MemoryStore) Put(_ context.Context, d Digest, r io.Reader) error {
	var buf bytes.Buffer
	if err := CopyVerified(&buf, r, d); err != nil {
		return err
	}
	m.mu.Lock()
	m.blobs[d] = buf.Bytes()
	m.mu.Unlock()
	return nil
}

// FindMissing implements BlobStore.
func (m *MemoryStore) FindMissing(_ context.Context, ds []Digest) ([]Digest, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var missing []Digest
	for _, d := range ds {
		if _, ok := m.blobs[d]; !ok {
			missing = append(missing, d)
		}
	}
	return missing, nil
}

// Delete removes a blob, to simulate eviction in tests.
func (m *MemoryStore) Delete(d Digest) {
	m.mu.Lock()
	delete(m.blobs, d)
	m.mu.Unlock()
}

// ActionCache returns the store's action cache view.
func (m *MemoryStore) ActionCache() ActionCache { return memoryAC{m} }

type memoryAC struct{ m *MemoryStore }

func (a memoryAC) Get(_ context.Context, key ActionKey) (*repb.ActionResult, error) {
	a.m.mu.Lock()
	b, ok := a.m.ac[key]
	a.m.mu.Unlock()
	if !ok {
		return nil, status.Errorf(codes.NotFound, "no action result for %s", key.Action)
	}
	r := &repb.ActionResult{}
	if err := proto.Unmarshal(b, r); err != nil {
		return nil, status.Errorf(codes.Internal, "action result for %s: %v", key.Action, err)
	}
	return r, nil
}

func (a memoryAC) Put(_ context.Context, key ActionKey, r *repb.ActionResult) error {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(r)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "action result: %v", err)
	}
	a.m.mu.Lock()
	a.m.ac[key] = b
	a.m.mu.Unlock()
	return nil
}
