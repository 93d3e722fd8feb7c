package cache_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"testing"

	"github.com/kilnbuild/kiln/cache"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// writerTo hands its pieces over through WriteTo only (Read is there for io.Reader).
type writerTo struct{ pieces [][]byte }

func (w *writerTo) Read([]byte) (int, error) { panic("read instead of WriteTo") }

func (w *writerTo) WriteTo(dst io.Writer) (int64, error) {
	var n int64
	for _, p := range w.pieces {
		k, err := dst.Write(p)
		n += int64(k)
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// TestCopyVerifiedWriterTo: a source that hands its bytes over with WriteTo is checked
// like any other: the right bytes pass; more than declared is refused before a byte
// beyond the size is written; fewer bytes or other bytes are refused.
func TestCopyVerifiedWriterTo(t *testing.T) {
	data := []byte("hello, world")
	h := sha256.Sum256(data)
	d := cache.Digest{Hash: hex.EncodeToString(h[:]), Size: int64(len(data))}
	var out bytes.Buffer
	if err := cache.CopyVerified(&out, &writerTo{[][]byte{data[:5], data[5:]}}, d); err != nil || out.String() != string(data) {
		t.Fatalf("the right bytes: %v, wrote %q", err, out.String())
	}
	for name, src := range map[string][][]byte{
		"longer":              {data[:5], data[5:], []byte("!")},
		"longer in one piece": {append(append([]byte{}, data...), '!')},
		"shorter":             {data[:5]},
		"other":               {bytes.ToUpper(data)},
	} {
		out.Reset()
		err := cache.CopyVerified(&out, &writerTo{src}, d)
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v, want INVALID_ARGUMENT", name, err)
		}
		if out.Len() > len(data) {
			t.Errorf("%s: %d bytes written, more than the declared %d", name, out.Len(), len(data))
		}
	}
}
