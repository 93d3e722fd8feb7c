package keys

import (
	"context"
	"encoding/json"
	"path/filepath"
	"sync"
	"testing"
)

// TestConcurrentFirstOpen: many openers of a fresh keyring (each lock on its own open
// file description, as separate processes would have) end up with one executor key.
func TestConcurrentFirstOpen(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "keys")
	const n = 8
	ids := make([]string, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			kr, err := Open(ctx, dir, Options{})
			if err != nil {
				t.Error(err)
				return
			}
			s, err := kr.Active()
			if err != nil {
				t.Error(err)
				return
			}
			ids[i] = s.ID()
		}(i)
	}
	wg.Wait()
	for _, id := range ids {
		if id != ids[0] {
			t.Fatalf("openers disagree on the active key: %v", ids)
		}
	}
	kr, _ := Open(ctx, dir, Options{})
	ks, _ := kr.Keys()
	if len(ks) != 1 {
		t.Fatalf("%d keys created", len(ks))
	}
}

func TestParseTrust(t *testing.T) {
	ctx := context.Background()
	kr, err := Open(ctx, filepath.Join(t.TempDir(), "keys"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	exp, _ := kr.Export()
	b, _ := json.Marshal(exp)
	tr, err := ParseTrust(b)
	if err != nil || len(tr.Keys) != 1 || tr.Log == nil || tr.Keys[0].KeyID != exp.ActiveKeyID {
		t.Fatalf("export: %+v %v", tr, err)
	}
	tr, err = ParseTrust([]byte("# comment\n" + exp.Keys[0].PEM))
	if err != nil || len(tr.Keys) != 1 || tr.Keys[0].KeyID != exp.ActiveKeyID {
		t.Fatalf("pem: %+v %v", tr, err)
	}
	// An export whose key id does not match its key is refused.
	exp.Keys[0].KeyID = "00" + exp.Keys[0].KeyID[2:]
	b, _ = json.Marshal(exp)
	if _, err := ParseTrust(b); err == nil {
		t.Fatal("accepted a key id that does not match its key")
	}
	if _, err := ParseTrust([]byte("not a key")); err == nil {
		t.Fatal("accepted garbage")
	}
}
