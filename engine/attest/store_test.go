package attest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestIndexConcurrentAppends: appenders racing on one product's index lose no line.
func TestIndexConcurrentAppends(t *testing.T) {
	st := NewStore(PathsFor(t.TempDir()), nil)
	prod := blob("shared output").Hash
	const n = 32
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			if err := st.AddProduct(AlgSHA256, prod, blob(fmt.Sprint("env", i))); err != nil {
				t.Error(err)
			}
		}(i)
	}
	wg.Wait()
	got, err := st.Producers(AlgSHA256, prod)
	if err != nil || len(got) != n {
		t.Fatalf("%d producers (%v), want %d", len(got), err, n)
	}
	// A torn last line (a writer that died mid-write) is skipped, not fatal.
	f, _ := os.OpenFile(st.productPath(AlgSHA256, prod), os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString("abc")
	f.Close()
	if got, err := st.Producers(AlgSHA256, prod); err != nil || len(got) != n {
		t.Fatalf("after a torn line: %d %v", len(got), err)
	}
}

// TestEnvelopeStoredCopy: an envelope is read back from its durable copy only if the
// copy is exactly its bytes; a copy cut short, grown or changed is an error (DataLoss)
// when the CAS has no copy either.
func TestEnvelopeStoredCopy(t *testing.T) {
	ctx := context.Background()
	st := NewStore(PathsFor(t.TempDir()), nil)
	env := []byte(`{"payloadType":"application/vnd.in-toto+json","payload":"e30=","signatures":[]}`)
	d, err := st.PutEnvelope(ctx, env)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := st.Envelope(ctx, d); err != nil || !bytes.Equal(got, env) {
		t.Fatalf("read back %q, %v", got, err)
	}
	for _, bad := range [][]byte{env[:len(env)-1], append(append([]byte{}, env...), '\n'), bytes.Replace(env, []byte("e30="), []byte("e31="), 1)} {
		if err := os.WriteFile(st.envelopePath(d.Hash), bad, 0o644); err != nil {
			t.Fatal(err)
		}
		if got, err := st.Envelope(ctx, d); status.Code(err) != codes.DataLoss {
			t.Errorf("copy %q read as %q, %v", bad, got, err)
		}
	}
}
