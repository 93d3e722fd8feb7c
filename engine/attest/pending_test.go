package attest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/engine/attest/tlog"
	"github.com/kilnbuild/kiln/internal/dirplace"
	"github.com/kilnbuild/kiln/internal/dirplace/dirplacetest"
)

const crashEnv = "KILN_ATTEST_CRASH_HELPER"

func TestMain(m *testing.M) {
	if spec := os.Getenv(crashEnv); spec != "" {
		os.Exit(crashHelper(spec))
	}
	os.Exit(m.Run())
}

// crashHelper links n actions (numbered from first) into a data dir. In "crash" mode
// it exits without Close while its log batches wait 30s: the process dies with every
// link signed and stored but not logged. In "clean" mode it closes properly.
// spec: dataDir|n|mode|first.
func crashHelper(spec string) int {
	f := strings.Split(spec, "|")
	n, _ := strconv.Atoi(f[1])
	first := 0
	if len(f) > 3 {
		first, _ = strconv.Atoi(f[3])
	}
	crash := len(f) < 3 || f[2] == "crash"
	ctx := context.Background()
	cas := openCASForHelper(f[0])
	opts := Options{DataDir: f[0], CAS: cas}
	if crash {
		opts.Log.BatchMaxAge = 30 * time.Second
	}
	s, err := Open(ctx, opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	for i := first; i < first+n; i++ {
		if _, err := s.Link(ctx, benchAction(i, 3)); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	if crash {
		return 0 // no Close: a crash
	}
	if err := s.Close(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// TestTwoProcessesLink: a "server" process and a "CLI" process attest into one data
// dir at once; every link of both is logged, indexed and verifies.
func TestTwoProcessesLink(t *testing.T) {
	ctx := context.Background()
	data := t.TempDir()
	// Create the keyring first so both processes share one executor key.
	s0 := openSigner(t, data, Options{})
	s0.Close(ctx)
	const n = 60
	var cmds []*exec.Cmd
	for i := 0; i < 2; i++ {
		c := exec.Command(os.Args[0], "-test.run=^$")
		c.Env = append(os.Environ(), crashEnv+"="+strings.Join([]string{data, strconv.Itoa(n), "clean", strconv.Itoa(i * n)}, "|"))
		c.Stderr = os.Stderr
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, c)
	}
	for _, c := range cmds {
		if err := c.Wait(); err != nil {
			t.Fatalf("linking process: %v", err)
		}
	}
	tr := activeTrust(t, data)
	lv, _ := tr.Log.Verifier()
	st := NewStore(PathsFor(data), openCAS(t, data))
	v, err := NewVerifier(ctx, st, VerifierOptions{Trust: tr, LogVerifier: lv})
	if err != nil {
		t.Fatal(err)
	}
	if v.Checkpoint().Size != 2*n {
		t.Fatalf("log size %d, want %d", v.Checkpoint().Size, 2*n)
	}
	for i := 0; i < 2*n; i++ {
		a := benchAction(i, 3)
		ch, err := v.Chain(ctx, Subject{Name: a.Outputs[0].Path, SHA256: a.Outputs[0].Digest.Hash})
		if err != nil || !ch.OK() {
			t.Fatalf("action %d: %v %v", i, err, ch.Failures)
		}
	}
	if left := st.PendingFiles(); len(left) != 0 {
		t.Fatalf("pending files left: %v", left)
	}
}

// TestSyncLog: with SyncLog, Link returns the link's log index.
func TestSyncLog(t *testing.T) {
	ctx := context.Background()
	s := openSigner(t, t.TempDir(), Options{SyncLog: true})
	r, err := s.Link(ctx, sampleAction())
	if err != nil {
		t.Fatal(err)
	}
	r2, err := s.Link(ctx, linkAction(sampleAction().Outputs[0]))
	if err != nil {
		t.Fatal(err)
	}
	if !r.Logged || !r2.Logged || r.LogIndex != 0 || r2.LogIndex != 1 {
		t.Fatalf("sync links: %+v %+v", r, r2)
	}
}

// crashLinking runs a process that links n actions into data and dies before it logs them.
func crashLinking(t *testing.T, data string, n int) {
	t.Helper()
	c := exec.Command(os.Args[0], "-test.run=^$")
	c.Env = append(os.Environ(), crashEnv+"="+data+"|"+strconv.Itoa(n))
	c.Stderr = os.Stderr
	if err := c.Run(); err != nil {
		t.Fatalf("helper: %v", err)
	}
}

// TestCrashedProcessLinksAreLogged: links a process signed but did not log before it
// died are appended by the next process to open the data dir.
func TestCrashedProcessLinksAreLogged(t *testing.T) {
	ctx := context.Background()
	data := t.TempDir()
	const n = 5
	crashLinking(t, data, n)
	markers, _ := filepath.Glob(filepath.Join(PathsFor(data).Attest, "pending", "*", "*"))
	if len(markers) != n {
		t.Fatalf("%d pending markers after the crash, want %d", len(markers), n)
	}
	s := openSigner(t, data, Options{})
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	markers, _ = filepath.Glob(filepath.Join(PathsFor(data).Attest, "pending", "*"))
	if len(markers) != 0 {
		t.Fatalf("left behind: %v", markers)
	}
	st := NewStore(PathsFor(data), openCAS(t, data))
	trustData := activeTrust(t, data)
	lv, _ := trustData.Log.Verifier()
	v, err := NewVerifier(ctx, st, VerifierOptions{Trust: trustData, LogVerifier: lv})
	if err != nil {
		t.Fatal(err)
	}
	if v.Checkpoint().Size != n {
		t.Fatalf("log size %d after recovery, want %d", v.Checkpoint().Size, n)
	}
	for i := 0; i < n; i++ {
		envs, _ := st.ActionLinks(benchAction(i, 3).ActionDigest.Hash)
		if len(envs) != 1 {
			t.Fatalf("action %d has %d links", i, len(envs))
		}
		if _, err := v.Link(ctx, envs[0]); err != nil {
			t.Fatalf("action %d: %v", i, err)
		}
	}
}

// TestVerifyRightAfterLinking: a verifier started while a running signer still has
// links pending (not yet logged or indexed) waits for them.
func TestVerifyRightAfterLinking(t *testing.T) {
	ctx := context.Background()
	data := t.TempDir()
	s := openSigner(t, data, Options{})
	a := sampleAction()
	if _, err := s.Link(ctx, a); err != nil {
		t.Fatal(err)
	}
	b := linkAction(a.Outputs[0])
	if _, err := s.Link(ctx, b); err != nil {
		t.Fatal(err)
	}
	tr := activeTrust(t, data)
	lv, _ := tr.Log.Verifier()
	v, err := NewVerifier(ctx, NewStore(PathsFor(data), openCAS(t, data)), VerifierOptions{Trust: tr, LogVerifier: lv, WaitCheckpoint: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ch, err := v.Chain(ctx, Subject{Name: "out/hello", SHA256: b.Outputs[0].Digest.Hash})
	if err != nil {
		t.Fatal(err)
	}
	if !ch.OK() || len(ch.Links) != 2 {
		t.Fatalf("chain right after linking: %v", ch.Failures)
	}
}

// TestAdoptedAndSubmittedAgainLoggedOnce: links a crashed process left unlogged are
// adopted at start while their submitter (the cluster's sequencer, draining the
// bucket) appends them again at once: each is logged once, whatever batch both land in.
func TestAdoptedAndSubmittedAgainLoggedOnce(t *testing.T) {
	ctx := context.Background()
	for round := range 3 {
		data := t.TempDir()
		const n = 40
		crashLinking(t, data, n)
		markers, _ := filepath.Glob(filepath.Join(PathsFor(data).Attest, "pending", "*", "*"))
		var envs [][]byte
		for _, m := range markers {
			b, err := os.ReadFile(m)
			if err != nil {
				t.Fatal(err)
			}
			envs = append(envs, b)
		}
		if len(envs) != n {
			t.Fatalf("%d pending links after the crash, want %d", len(envs), n)
		}
		s := openSigner(t, data, Options{})
		errs := make(chan error, n)
		for _, env := range envs {
			go func() {
				_, err := s.Append(ctx, env)
				errs <- err
			}()
		}
		for range envs {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		if err := s.Close(ctx); err != nil {
			t.Fatal(err)
		}
		seen := map[string]int{}
		lk := activeTrust(t, data).Log
		lv, _ := lk.Verifier()
		r := tlog.NewReader(PathsFor(data).Log, lv)
		cp, err := r.Checkpoint(ctx)
		if err != nil {
			t.Fatal(err)
		}
		r.Scan(ctx, cp.Size, func(_ uint64, e []byte) bool {
			seen[string(e)]++
			return true
		})
		if cp.Size != n || len(seen) != n {
			t.Fatalf("round %d: log size %d with %d distinct links, want %d", round, cp.Size, len(seen), n)
		}
	}
}

// TestLingerSharesOneBatch: links that nobody waits for are gathered into one log
// batch while the writer lingers, and Flush appends them without waiting it out.
func TestLingerSharesOneBatch(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s := openSigner(t, t.TempDir(), Options{LogLinger: time.Hour})
	for i := range 5 {
		a := sampleAction()
		a.ActionDigest = blob(fmt.Sprintf("action %d", i))
		if _, err := s.Link(ctx, a); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Flush(ctx); err != nil {
		t.Fatalf("flush while the writer lingers for an hour: %v", err)
	}
	if n := s.batches.Load(); n != 1 {
		t.Fatalf("5 links appended in %d batches, want 1", n)
	}
	if n, err := s.LogSize(ctx); err != nil || n != 5 {
		t.Fatalf("log size %d, %v; want 5", n, err)
	}
}

// TestLingerNotForSyncLog: a link someone waits for is appended at once, however long
// the writer would otherwise linger.
func TestLingerNotForSyncLog(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s := openSigner(t, t.TempDir(), Options{LogLinger: time.Hour, SyncLog: true})
	r, err := s.Link(ctx, sampleAction())
	if err != nil || !r.Logged {
		t.Fatalf("sync link under an hour's linger: %+v, %v", r, err)
	}
}

// TestStoreShardsSpread: on ext2/3/4 the attestation store's shard parents are marked
// so that their shards are placed apart (package dirplace).
func TestStoreShardsSpread(t *testing.T) {
	data := t.TempDir()
	dirplacetest.SkipUnlessExt(t, data)
	s := openSigner(t, data, Options{SyncLog: true})
	if _, err := s.Link(context.Background(), sampleAction()); err != nil {
		t.Fatal(err)
	}
	if err := s.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	attest := PathsFor(data).Attest
	for _, d := range []string{"envelopes", "actions", "logidx", "index/sha256"} {
		if m, err := dirplace.Marked(filepath.Join(attest, d)); err != nil || !m {
			t.Errorf("%s: marked %v, %v", d, m, err)
		}
	}
}
