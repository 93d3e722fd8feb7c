package history

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/disk"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/tlog"
)

func init() { tlog.RouteLibraryLogs(nil) }

func openIndex(t *testing.T, path string) *Index {
	t.Helper()
	x, err := Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	return x
}

func run(i int, outcome string, client string, paths ...string) Run {
	r := Run{Time: time.Unix(int64(i), 0), Source: FromScheduler, Action: cache.DigestOf([]byte(fmt.Sprint("action", i))), Outcome: outcome, Clients: []string{client}}
	for _, p := range paths {
		r.Outputs = append(r.Outputs, Output{Path: p, SHA256: cache.DigestOf([]byte(p)).Hash})
	}
	return r
}

func TestSearch(t *testing.T) {
	x := openIndex(t, filepath.Join(t.TempDir(), "h.db"))
	defer x.Close()
	x.Record(run(1, OK, "ci", "bazel-out/k8/bin/app/hello", "bazel-out/k8/bin/app/hello.o"))
	x.Record(run(2, Failed, "dev", "bazel-out/k8/bin/lib/libgreet.a"))
	x.Record(run(3, Error, "ci"))
	x.Record(run(4, Cached, "dev", "bazel-out/k8/bin/app/hello"))
	x.Flush()
	count := func(q Query) []int {
		p, err := x.Search(q)
		if err != nil {
			t.Fatal(err)
		}
		var out []int
		for _, r := range p.Runs {
			out = append(out, int(r.Time.Unix()))
		}
		return out
	}
	for _, c := range []struct {
		q    Query
		want string
	}{
		{Query{}, "[4 3 2 1]"},
		{Query{Path: "hello"}, "[4 1]"},
		{Query{Path: "app/hello.o"}, "[1]"},
		{Query{Path: "bin/lib"}, "[2]"},
		{Query{Path: "ello"}, "[]"}, // not at a component boundary
		{Query{Path: "/bazel-out/k8/bin/app/hello"}, "[4 1]"},
		{Query{Client: "dev"}, "[4 2]"},
		{Query{Client: "dev", Path: "hello"}, "[4]"},
		{Query{Outcome: Failures}, "[3 2]"},
		{Query{Outcome: OK, Client: "ci"}, "[1]"},
		{Query{Action: "sha256:" + cache.DigestOf([]byte("action2")).Hash[:10]}, "[2]"},
		{Query{Limit: 2}, "[4 3]"},
		{Query{Before: 3}, "[2 1]"},
	} {
		if got := fmt.Sprint(count(c.q)); got != c.want {
			t.Errorf("%+v: %s, want %s", c.q, got, c.want)
		}
	}
	p, _ := x.Search(Query{Limit: 3})
	if p.Next != 2 {
		t.Errorf("next page after 3 of 4 runs: before %d, want 2", p.Next)
	}
	c, _ := x.Count()
	if c.Runs != 4 || c.ByOutcome[OK] != 1 || c.ByOutcome[Cached] != 1 {
		t.Errorf("counts %+v", c)
	}
}

// TestFromLog: links in the log become runs; the scheduler's record of the same
// execution merges with its link's whichever comes first; a removed index is rebuilt
// from the log alone.
func TestFromLog(t *testing.T) {
	ctx := context.Background()
	data := t.TempDir()
	cas, err := disk.Open(ctx, attest.PathsFor(data).CAS, disk.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer cas.Close()
	s, err := attest.Open(ctx, attest.Options{DataDir: data, CAS: cas, Log: tlog.Options{CheckpointInterval: 20 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	blob := func(b string) cache.Digest { d, _ := cache.PutBytes(ctx, cas, []byte(b)); return d }
	obj := blob("object")
	link := func(i int, inputs, outputs []attest.File) (cache.Digest, cache.Digest) {
		ad := blob(fmt.Sprint("action", i))
		l, err := s.Link(ctx, attest.Action{ActionDigest: ad, CommandDigest: blob("cmd"), Toolchain: "sha256:" + blob("tc").Hash,
			Inputs: inputs, Outputs: outputs, Argv: []string{"cc", fmt.Sprint(i)}, Stdout: cache.EmptyDigest, Stderr: cache.EmptyDigest})
		if err != nil {
			t.Fatal(err)
		}
		return ad, l.Digest
	}
	a1, e1 := link(1, []attest.File{{Path: "a.c", Digest: blob("a.c")}}, []attest.File{{Path: "out/a.o", Digest: obj}})
	a2, _ := link(2, []attest.File{{Path: "out/a.o", Digest: obj}, {Path: "b.c", Digest: blob("b.c")}}, []attest.File{{Path: "bin/app", Digest: blob("app")}})
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	db := filepath.Join(data, "history", "index.db")
	x := openIndex(t, db)
	// The scheduler's record of action 1 comes before its link is indexed.
	sched := Run{Time: time.Unix(100, 0), Source: FromScheduler, Action: a1, Outcome: OK, Clients: []string{"ci"}, Envelope: e1,
		Phases: []Phase{{"sandbox", 0.5}}, Outputs: []Output{{Path: "out/a.o", SHA256: obj.Hash, Size: obj.Size}}}
	x.Record(sched)
	kr := s.Keyring()
	lk := kr.Log()
	lv, _ := lk.Verifier()
	src := Links{Log: tlog.NewReader(attest.PathsFor(data).Log, lv), Envelopes: attest.NewStore(attest.PathsFor(data), cas)}
	if n, err := x.CatchUp(ctx, src); err != nil || n != 2 {
		t.Fatalf("catch up: %d entries, %v", n, err)
	}
	if n, _ := x.CatchUp(ctx, src); n != 0 {
		t.Fatalf("a second catch-up read %d entries again", n)
	}
	r1, err := x.ByAction(a1.Hash)
	if err != nil || len(r1) != 1 {
		t.Fatalf("action 1: %v %v (scheduler and link records not merged)", r1, err)
	}
	if r := r1[0]; r.Toolchain == "" || len(r.Clients) != 1 || r.Clients[0] != "ci" || len(r.Phases) != 1 || !r.Logged || r.Outputs[0].Size != obj.Size {
		t.Fatalf("merged run %+v", r)
	}
	cons, _ := x.Consumers(obj.Hash)
	if len(cons) != 1 || cons[0].Action != a2 {
		t.Fatalf("consumers of the object: %v", cons)
	}
	prods, _ := x.Producers(obj.Hash)
	if len(prods) != 1 || prods[0].Action != a1 {
		t.Fatalf("producers of the object: %v", prods)
	}
	if p, _ := x.Search(Query{Path: "app", Toolchain: blob("tc").Hash[:8]}); len(p.Runs) != 1 || p.Runs[0].Action != a2 || p.Runs[0].Source != FromLog {
		t.Fatalf("search by path and toolchain: %+v", p.Runs)
	}
	x.Close()

	// Rebuilt from the log: the same links, without what only the scheduler knew.
	os.Remove(db)
	x = openIndex(t, db)
	defer x.Close()
	if n, err := x.CatchUp(ctx, src); err != nil || n != 2 {
		t.Fatalf("rebuild: %d entries, %v", n, err)
	}
	c, _ := x.Count()
	if c.Runs != 2 || x.LogSize() != 2 {
		t.Fatalf("rebuilt index: %+v, log size %d", c, x.LogSize())
	}
	if cons, _ := x.Consumers(obj.Hash); len(cons) != 1 {
		t.Fatalf("rebuilt consumers: %v", cons)
	}
}

// TestLingerSharesOneWrite: runs recorded while the writer lingers share one
// transaction, and Flush writes them without waiting the linger out.
func TestLingerSharesOneWrite(t *testing.T) {
	x, err := open(filepath.Join(t.TempDir(), "index.db"), nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	defer x.Close()
	for i := range 5 {
		x.Record(run(i, OK, "c", fmt.Sprintf("out/%d", i)))
		time.Sleep(10 * time.Millisecond) // a writer that did not linger writes each alone
	}
	done := make(chan struct{})
	go func() { x.Flush(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("Flush waited for the writer's hour-long linger")
	}
	if n := x.writes.Load(); n != 1 {
		t.Fatalf("5 runs written in %d transactions, want 1", n)
	}
	if p, err := x.Search(Query{}); err != nil || len(p.Runs) != 5 {
		t.Fatalf("%d runs in the index (%v), want 5", len(p.Runs), err)
	}
}
