package tlog

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/transparency-dev/merkle/rfc6962"
	"golang.org/x/mod/sumdb/note"
)

func init() { RouteLibraryLogs(nil) }

func newKey(t testing.TB, name string) (string, string) {
	t.Helper()
	sk, vk, err := note.GenerateKey(rand.Reader, name)
	if err != nil {
		t.Fatal(err)
	}
	return sk, vk
}

func signerVerifier(t testing.TB, sk, vk string) (note.Signer, note.Verifier) {
	t.Helper()
	s, err := note.NewSigner(sk)
	if err != nil {
		t.Fatal(err)
	}
	v, err := note.NewVerifier(vk)
	if err != nil {
		t.Fatal(err)
	}
	return s, v
}

var fastOpts = Options{CheckpointInterval: 100 * time.Millisecond}

func TestAppendProveAndTamper(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	sk, vk := newKey(t, "kiln-log/test")
	s, v := signerVerifier(t, sk, vk)
	l, err := Open(ctx, dir, s, fastOpts)
	if err != nil {
		t.Fatal(err)
	}
	// 300 entries cross an entry-bundle boundary (256); append concurrently.
	const n = 300
	idx := make([]uint64, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			j, err := l.Append(ctx, []byte(fmt.Sprintf("entry-%d", i)))
			idx[i] = j
			errs <- err
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(ctx); err != nil {
		t.Fatal(err)
	}

	r := NewReader(dir, v)
	cp, err := r.Checkpoint(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if cp.Size != n {
		t.Fatalf("checkpoint size %d, want %d", cp.Size, n)
	}
	// Partial copies of the now-full first bundle and tile are pruned; the second
	// bundle (44 entries) is still partial and keeps its partials.
	for p, want := range map[string]bool{"tile/entries/000.p": false, "tile/0/000.p": false, "tile/entries/001.p": true, "tile/entries/000": true} {
		if _, err := os.Stat(filepath.Join(dir, p)); (err == nil) != want {
			t.Errorf("%s exists: %v, want %v", p, err == nil, want)
		}
	}
	pv, err := r.Prover(ctx, cp.Size)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[uint64]bool{}
	for i := 0; i < n; i++ {
		data := []byte(fmt.Sprintf("entry-%d", i))
		got, _, err := r.Include(ctx, data, idx[i], true, cp, pv)
		if err != nil || got != idx[i] {
			t.Fatalf("entry %d at %d: %v (got %d)", i, idx[i], err, got)
		}
		if seen[got] {
			t.Fatalf("index %d assigned twice", got)
		}
		seen[got] = true
	}
	// Without the hint, the log is scanned.
	if got, _, err := r.Include(ctx, []byte("entry-299"), 0, false, cp, pv); err != nil || got != idx[299] {
		t.Fatalf("scan: %d %v", got, err)
	}
	if _, _, err := r.Include(ctx, []byte("never appended"), 0, false, cp, pv); err == nil {
		t.Fatal("an entry that is not in the log was proved")
	}

	// Consistency between an older size and the checkpoint.
	old, err := r.RootAt(ctx, 17)
	if err != nil {
		t.Fatal(err)
	}
	p, err := pv.Consistency(ctx, 17, cp.Size)
	if err != nil {
		t.Fatal(err)
	}
	if err := VerifyConsistency(17, old, cp.Size, cp.Root, p); err != nil {
		t.Fatal(err)
	}
	bad := append([]byte(nil), old...)
	bad[0] ^= 1
	if err := VerifyConsistency(17, bad, cp.Size, cp.Root, p); err == nil {
		t.Fatal("consistency with a wrong old root verified")
	}

	// A rewritten checkpoint: same text with another root, or re-signed by another key.
	cpPath := filepath.Join(dir, "checkpoint")
	raw, _ := os.ReadFile(cpPath)
	lines := strings.SplitN(string(raw), "\n", 4)
	lines[1] = strconv.Itoa(n + 1)
	os.WriteFile(cpPath, []byte(strings.Join(lines, "\n")), 0o644)
	if _, err := r.Checkpoint(ctx); err == nil {
		t.Fatal("a checkpoint with an edited size verified")
	}
	otherSK, _ := newKey(t, "kiln-log/test")
	os2, _ := note.NewSigner(otherSK)
	forged, err := note.Sign(&note.Note{Text: strings.SplitN(string(raw), "\n\n", 2)[0] + "\n"}, os2)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(cpPath, forged, 0o644)
	if _, err := r.Checkpoint(ctx); err == nil {
		t.Fatal("a checkpoint signed by another key verified")
	}
	os.WriteFile(cpPath, raw, 0o644)

	// A rewritten entry: the proof no longer reaches the signed root.
	bundle := filepath.Join(dir, "tile", "entries", "000")
	b, err := os.ReadFile(bundle)
	if err != nil {
		t.Fatal(err)
	}
	tampered := strings.Replace(string(b), "entry-5", "entry-X", 1)
	os.WriteFile(bundle, []byte(tampered), 0o644)
	if _, _, err := r.Include(ctx, []byte("entry-X"), 0, false, cp, pv); err == nil {
		t.Fatal("an entry rewritten in the bundle proved its inclusion")
	}
}

// The two-process test re-executes this test binary as an appender.
const helperEnv = "KILN_TLOG_HELPER"

func TestMain(m *testing.M) {
	if spec := os.Getenv(helperEnv); spec != "" {
		os.Exit(appendHelper(spec))
	}
	os.Exit(m.Run())
}

// appendHelper appends n entries "<tag>-<i>" to dir, one at a time, as a separate
// process would (kiln exec next to kiln serve). spec: dir|skey|tag|n.
func appendHelper(spec string) int {
	RouteLibraryLogs(nil)
	f := strings.Split(spec, "|")
	n, _ := strconv.Atoi(f[3])
	s, err := note.NewSigner(f[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx := context.Background()
	l, err := Open(ctx, f[0], s, fastOpts)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	for i := 0; i < n; i++ {
		if _, err := l.Append(ctx, []byte(fmt.Sprintf("%s-%d", f[2], i))); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	if err := l.Close(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// TestTwoProcessesAppend: two child processes and this one append to one log
// directory at once (the lease passes between them); every entry lands exactly once,
// every checkpoint seen on the way is consistent with the final one, and every entry's
// inclusion proof verifies.
func TestTwoProcessesAppend(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	sk, vk := newKey(t, "kiln-log/two")
	s, v := signerVerifier(t, sk, vk)
	const n = 150
	// This process takes the lease first and keeps its log open throughout.
	mine, err := Open(ctx, dir, s, fastOpts)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := mine.Append(ctx, []byte("parent-0")); err != nil {
		t.Fatal(err)
	}
	parentDone := make(chan error, 1)
	go func() {
		for i := 1; i < n; i++ {
			if _, err := mine.Append(ctx, []byte(fmt.Sprintf("parent-%d", i))); err != nil {
				parentDone <- err
				return
			}
			time.Sleep(time.Millisecond)
		}
		parentDone <- mine.Close(ctx)
	}()
	var cmds []*exec.Cmd
	for _, tag := range []string{"serve", "exec"} {
		c := exec.Command(os.Args[0], "-test.run=^$")
		c.Env = append(os.Environ(), helperEnv+"="+strings.Join([]string{dir, sk, tag, strconv.Itoa(n)}, "|"))
		c.Stderr = os.Stderr
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, c)
	}
	// Collect the checkpoints published while both run.
	r := NewReader(dir, v)
	var seen []*Checkpoint
	done := make(chan error, len(cmds))
	for _, c := range cmds {
		go func(c *exec.Cmd) { done <- c.Wait() }(c)
	}
	start := time.Now()
	for running := len(cmds); running > 0; {
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("appender process: %v", err)
			}
			running--
		case <-time.After(20 * time.Millisecond):
		}
		if cp, err := r.Checkpoint(ctx); err == nil && (len(seen) == 0 || seen[len(seen)-1].Size != cp.Size) {
			if len(seen) > 0 && cp.Size < seen[len(seen)-1].Size {
				t.Errorf("checkpoint went back from %d to %d", seen[len(seen)-1].Size, cp.Size)
			}
			seen = append(seen, cp)
		}
	}
	if err := <-parentDone; err != nil {
		t.Fatal(err)
	}
	elapsed := time.Since(start)
	final, err := r.Checkpoint(ctx)
	if err != nil {
		t.Fatal(err)
	}
	tags := []string{"serve", "exec", "parent"}
	if final.Size != uint64(len(tags)*n) {
		t.Fatalf("final checkpoint size %d, want %d", final.Size, len(tags)*n)
	}
	count := map[string]int{}
	if err := r.Scan(ctx, final.Size, func(i uint64, e []byte) bool { count[string(e)]++; return true }); err != nil {
		t.Fatal(err)
	}
	for _, tag := range tags {
		for i := 0; i < n; i++ {
			if c := count[fmt.Sprintf("%s-%d", tag, i)]; c != 1 {
				t.Fatalf("%s-%d appears %d times", tag, i, c)
			}
		}
	}
	pv, err := r.Prover(ctx, final.Size)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		for _, tag := range tags {
			if _, _, err := r.Include(ctx, []byte(fmt.Sprintf("%s-%d", tag, i)), 0, false, final, pv); err != nil {
				t.Fatal(err)
			}
		}
	}
	if len(seen) < 2 {
		t.Logf("only %d intermediate checkpoints observed", len(seen))
	}
	for _, cp := range seen {
		p, err := pv.Consistency(ctx, cp.Size, final.Size)
		if err != nil {
			t.Fatal(err)
		}
		if err := VerifyConsistency(cp.Size, cp.Root, final.Size, final.Root, p); err != nil {
			t.Fatalf("checkpoint %d is not consistent with the final one: %v", cp.Size, err)
		}
	}
	t.Logf("%d entries from 3 processes in %v; %d intermediate checkpoints, all consistent with size %d", final.Size, elapsed, len(seen), final.Size)
}

// TestOneAppenderPerProcess: a second Open of the same directory in one process shares
// the appender (fcntl locks would not separate two), and refuses another origin.
func TestOneAppenderPerProcess(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	sk, vk := newKey(t, "kiln-log/one")
	s, v := signerVerifier(t, sk, vk)
	a, err := Open(ctx, dir, s, fastOpts)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Open(ctx, dir, s, fastOpts)
	if err != nil {
		t.Fatal(err)
	}
	if a.sh != b.sh {
		t.Fatal("two appenders for one directory in one process")
	}
	otherSK, _ := newKey(t, "kiln-log/other")
	os2, _ := note.NewSigner(otherSK)
	if _, err := Open(ctx, dir, os2, fastOpts); err == nil {
		t.Fatal("opened a log under another origin")
	}
	if _, err := a.Append(ctx, []byte("x")); err != nil {
		t.Fatal(err)
	}
	a.Close(ctx)
	if _, err := b.Append(ctx, []byte("y")); err != nil {
		t.Fatalf("closing one handle broke the other: %v", err)
	}
	if err := b.Close(ctx); err != nil {
		t.Fatal(err)
	}
	cp, err := NewReader(dir, v).Checkpoint(ctx)
	if err != nil || cp.Size != 2 {
		t.Fatalf("checkpoint %+v %v", cp, err)
	}
	// After the last Close, a new origin is refused by the directory's origin file.
	if _, err := Open(ctx, dir, os2, fastOpts); err == nil {
		t.Fatal("reopened the log under another origin")
	}
}

// TestRootAtSizeNeverIntegrated: a batch takes the tree from 0 to 5 in one step, so no
// tile for size 2 was ever written; the root at size 2 still comes out right and
// proves consistent with the checkpoint.
func TestRootAtSizeNeverIntegrated(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	sk, vk := newKey(t, "kiln-log/batch")
	s, v := signerVerifier(t, sk, vk)
	l, err := Open(ctx, dir, s, fastOpts)
	if err != nil {
		t.Fatal(err)
	}
	var entries [][]byte
	for i := 0; i < 5; i++ {
		entries = append(entries, []byte(fmt.Sprintf("e%d", i)))
	}
	if _, err := l.AppendBatch(ctx, entries); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(ctx); err != nil {
		t.Fatal(err)
	}
	r := NewReader(dir, v)
	got, err := r.RootAt(ctx, 2)
	if err != nil {
		t.Fatal(err)
	}
	h := rfc6962.DefaultHasher
	want := h.HashChildren(h.HashLeaf(entries[0]), h.HashLeaf(entries[1]))
	if !bytes.Equal(got, want) {
		t.Fatalf("root at 2 = %x, want %x", got, want)
	}
	cp, err := r.Checkpoint(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pv, _ := r.Prover(ctx, cp.Size)
	p, err := pv.Consistency(ctx, 2, cp.Size)
	if err != nil {
		t.Fatal(err)
	}
	if err := VerifyConsistency(2, got, cp.Size, cp.Root, p); err != nil {
		t.Fatal(err)
	}
}
