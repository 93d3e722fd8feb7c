package test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/tlog"
	"github.com/kilnbuild/kiln/test/harness"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The cluster's log as other machines read it: the sequencer publishes it to the
// bucket (log/), and kiln attest verify, kiln log and kiln rebuild with --storage read it
// there on a data dir that holds none of the cluster's state.

var linkLogged = regexp.MustCompile(`msg="link logged"`)

// checkPublished checks the log published in the bucket as a reader anywhere sees it:
// its checkpoint verifies, the published tiles hash to the checkpoint's root, and every
// entry it covers proves its inclusion. It returns the checkpoint's size (0: none yet).
func checkPublished(t *testing.T, rd *tlog.Reader) uint64 {
	t.Helper()
	ctx := harness.Context(t, time.Minute)
	cp, err := rd.Checkpoint(ctx)
	if status.Code(err) == codes.NotFound {
		return 0
	}
	if err != nil {
		t.Fatalf("the published checkpoint: %v", err)
	}
	root, err := rd.RootAt(ctx, cp.Size)
	if err != nil || !bytes.Equal(root, cp.Root) {
		t.Fatalf("the published tiles do not make the published checkpoint's tree (size %d): %v", cp.Size, err)
	}
	pv, err := rd.Prover(ctx, cp.Size)
	if err != nil {
		t.Fatal(err)
	}
	n := uint64(0)
	if err := rd.Scan(ctx, cp.Size, func(i uint64, e []byte) bool {
		if _, _, err := rd.Include(ctx, e, i, true, cp, pv); err != nil {
			t.Fatalf("published entry %d of %d does not prove its inclusion: %v", i, cp.Size, err)
		}
		n++
		return true
	}); err != nil || n != cp.Size {
		t.Fatalf("the published entries: %d of %d read, %v", n, cp.Size, err)
	}
	return cp.Size
}

// outputOf returns the digest of the one output file of a finished execution.
func outputOf(t *testing.T, x *execution) *repb.Digest {
	t.Helper()
	fs := x.resp.GetResult().GetOutputFiles()
	if len(fs) != 1 {
		t.Fatalf("outputs %v", fs)
	}
	return fs[0].GetDigest()
}

// TestClusterLogFromBucket: the sequencer is killed -9 again and again while it catches
// up with waiting links; after every kill the log published in the bucket is consistent (its
// checkpoint never names a tree whose tiles or entries are missing, and never goes
// back). Then, on data dirs of a machine that has none of the cluster's state, kiln
// attest verify, kiln log checkpoint, prove and consistency read the bucket's log, and
// the frontend's web UI follows it and verifies the workers' links.
func TestClusterLogFromBucket(t *testing.T) {
	e := newCluster(t, clusterOpts{frontends: 1, workers: 2})
	conn := dial(t, e.frontends[0].Addr)
	ctx := harness.Context(t, 5*time.Minute)
	rd := e.bucketLog(t)
	var as []clusterAction
	var xs []*execution
	var last uint64
	e.seq.Kill()
	for i := range 10 {
		// Links wait in the bucket while the sequencer is down; started again, it catches
		// up (append, publish, delete markers) and is killed at a different moment of
		// that each time.
		a, x := e.executeAll(t, ctx, conn, 3, func(j int) string { return fmt.Sprintf("echo published-%d-%d > out.txt", i, j) })
		for j, x := range x {
			x.check(t, fmt.Sprintf("action %d of round %d", j, i))
		}
		as, xs = append(as, a...), append(xs, x...)
		e.seq.Restart(t, seqReady)
		when := fmt.Sprintf("%d ms after it was ready", i*20)
		if i%2 == 1 { // right after it appended a link: before or while it publishes
			e.seq.WaitLog(t, linkLogged, 30*time.Second)
			when = "as it logged a link"
		} else {
			time.Sleep(time.Duration(i*20) * time.Millisecond)
		}
		e.seq.Kill()
		n := checkPublished(t, rd)
		if n < last {
			t.Fatalf("the published log went back from size %d to %d", last, n)
		}
		pending, _ := os.ReadDir(filepath.Join(e.s3.Dir, "kiln-cache", "c", "pending"))
		t.Logf("killed %s: published size %d of %d links, %d markers left", when, n, len(as), len(pending))
		last = n
	}
	e.seq.Restart(t, seqReady)
	for i, x := range xs {
		x.check(t, fmt.Sprintf("action %d", i))
	}
	e.checkAll(t, conn, as)
	size := checkPublished(t, rd)
	if size < uint64(len(as)) {
		t.Fatalf("published log size %d, want at least %d links", size, len(as))
	}

	// kiln log on another machine: the checkpoint is the bucket's.
	elsewhere := t.TempDir()
	remote := []string{"--cluster", e.nats.URL, "--storage", e.storage, "--data", elsewhere, "--json"}
	r := harness.Run(t, append([]string{"log", "checkpoint"}, remote...)...)
	var cp struct{ Size uint64 }
	if r.Code != 0 || json.Unmarshal([]byte(r.Stdout), &cp) != nil || cp.Size != size {
		t.Fatalf("kiln log checkpoint on another machine: exit %d, size %d, want %d\n%s%s", r.Code, cp.Size, size, r.Stdout, r.Stderr)
	}
	if _, err := os.Stat(filepath.Join(elsewhere, "log", "checkpoint")); err == nil {
		t.Fatal("the other machine's data dir has a log of its own")
	}
	// kiln log prove of a link, by digest and by hash alone (searched in the log).
	var link string
	var index uint64
	rd.Scan(ctx, size, func(i uint64, en []byte) bool {
		if d, ok := attest.ParseLinkLogEntry(en); ok && i > 0 {
			link, index = d.String(), i
			return false
		}
		return true
	})
	for _, arg := range []string{link, strings.Split(link, "/")[0]} {
		r = harness.Run(t, append([]string{"log", "prove", arg}, remote...)...)
		var p struct {
			Index    uint64
			TreeSize uint64 `json:"tree_size"`
			Verified bool
		}
		if r.Code != 0 || json.Unmarshal([]byte(r.Stdout), &p) != nil || !p.Verified || p.Index != index || p.TreeSize != size {
			t.Fatalf("kiln log prove %s on another machine: exit %d %+v (want index %d of %d)\n%s%s", arg, r.Code, p, index, size, r.Stdout, r.Stderr)
		}
	}
	r = harness.Run(t, append([]string{"log", "consistency", "--from", "1"}, remote...)...)
	if r.Code != 0 || !strings.Contains(r.Stdout, `"verified": true`) {
		t.Fatalf("kiln log consistency on another machine: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
	// The frontend's web UI follows the same log and verifies a worker's link.
	fe := e.frontends[0]
	page := func(path string) string {
		resp, err := http.Get("http://" + fe.HTTP + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(250 * time.Millisecond) {
		body := page("/log")
		if strings.Contains(body, fmt.Sprintf(`<b id="log-size">%d</b>`, size)) && strings.Contains(body, fmt.Sprintf(`<b>%d</b> indexed for search`, size)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the frontend's web UI does not show the cluster's log (size %d) indexed:\n%s", size, body)
		}
	}
	if body := page("/action/" + as[0].digest.GetHash() + "/" + fmt.Sprint(as[0].digest.GetSizeBytes())); !strings.Contains(body, "Link verified by the server") {
		t.Fatalf("the frontend's action page does not verify the worker's link:\n%s", body)
	}

	// Without --storage that machine has no log to verify against: a clear refusal.
	out := outputOf(t, xs[0])
	r = harness.Run(t, "attest", "verify", "--cluster", e.nats.URL, "--data", t.TempDir(), "--subject", "sha256:"+out.GetHash())
	if r.Code == 0 || !strings.Contains(r.Stderr, "checkpoint") {
		t.Fatalf("kiln attest verify without the bucket's log: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
}

// TestClusterRebuild: an artifact built by a cluster worker is rebuilt on a machine
// outside the cluster: its provenance is made there from the bucket's log and blobs, and
// kiln rebuild --cluster --storage verifies the worker's link against the cluster's
// trust set and published log, re-executes the action locally (the toolchain comes
// from the bucket) and finds the same output: PASSED.
func TestClusterRebuild(t *testing.T) {
	e := newCluster(t, clusterOpts{frontends: 1, workers: 1})
	conn := dial(t, e.frontends[0].Addr)
	ctx := harness.Context(t, 3*time.Minute)
	a := e.upload(t, conn, "echo rebuilt-from-the-cluster | tr a-z A-Z > out.txt", "out.txt")
	x := execute(ctx, conn, a)
	x.check(t, "the action")
	e.checkAll(t, conn, []clusterAction{a})
	out := outputOf(t, x)

	pdata := t.TempDir()
	prov := filepath.Join(t.TempDir(), "provenance.json")
	if r := harness.Run(t, "attest", "provenance", "--cluster", e.nats.URL, "--storage", e.storage, "--data", pdata, "--subject", "sha256:"+out.GetHash(), "--out", prov); r.Code != 0 {
		t.Fatalf("attest provenance on another machine: exit %d\n%s", r.Code, r.Stderr)
	}
	pk := harness.Run(t, "attest", "pubkey", "--data", pdata, "--all", "--json")
	keys := filepath.Join(t.TempDir(), "keys.json")
	os.WriteFile(keys, []byte(pk.Stdout), 0o644)

	rdata, vsa := t.TempDir(), filepath.Join(t.TempDir(), "vsa.json")
	rebuild := func(args ...string) harness.Result {
		return harness.Run(t, append([]string{"rebuild", prov, "--key", keys, "--storage", e.storage, "--data", rdata, "--out", vsa, "--json"}, args...)...)
	}
	r := rebuild("--cluster", e.nats.URL)
	var v struct {
		Verdict string `json:"verdict"`
		Actions []struct {
			Action string `json:"action"`
		} `json:"actions"`
	}
	if r.Code != 0 || json.Unmarshal([]byte(r.Stdout), &v) != nil || v.Verdict != "PASSED" || len(v.Actions) != 1 || !strings.HasPrefix(strings.TrimPrefix(v.Actions[0].Action, "sha256:"), a.digest.GetHash()) {
		t.Fatalf("kiln rebuild --cluster --storage: exit %d %+v\n%s%s", r.Code, v, r.Stdout, r.Stderr)
	}
	// The promotion gate on a third machine: the links and the cluster's log from the
	// bucket, the workers' keys from the cluster, the provenance's and the summary's
	// keys from their signers.
	vk := harness.Run(t, "attest", "pubkey", "--data", rdata, "--all", "--json")
	vkeys := filepath.Join(t.TempDir(), "verifier-keys.json")
	os.WriteFile(vkeys, []byte(vk.Stdout), 0o644)
	policy := filepath.Join(t.TempDir(), "policy.yaml")
	os.WriteFile(policy, []byte(clusterGatePolicy), 0o644)
	gate := func(args ...string) harness.Result {
		return harness.Run(t, append([]string{"gate", "--policy", policy, "--storage", e.storage, "--data", t.TempDir(), "--subject", "sha256:" + out.GetHash(),
			"--provenance", prov, "--vsa", vsa, "--keys", keys, "--keys", vkeys, "--json"}, args...)...)
	}
	if g := gate("--cluster", e.nats.URL); g.Code != 0 || !strings.Contains(g.Stdout, `"allow": true`) {
		t.Fatalf("kiln gate --cluster --storage: exit %d\n%s%s", g.Code, g.Stdout, g.Stderr)
	}
	// Without --cluster neither the workers' keys nor the cluster's log key are trusted.
	if g := gate(); g.Code != 1 || !strings.Contains(g.Stdout, `"allow": false`) || !strings.Contains(g.Stdout, `"rule": "log-verified"`) {
		t.Fatalf("kiln gate without --cluster: exit %d, want a denial by log-verified\n%s%s", g.Code, g.Stdout, g.Stderr)
	}
	// Without --cluster the worker's key is not trusted: the provenance does not verify
	// and nothing runs.
	if r := rebuild(); r.Code != 1 || strings.Contains(r.Stdout, "PASSED") {
		t.Fatalf("kiln rebuild without --cluster: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
}

// clusterGatePolicy promotes what verifies (the log, the provenance, every link, the
// chain) and was rebuilt bit for bit once.
const clusterGatePolicy = `stage: cluster-e2e
rules:
  - name: log-verified
    require: input.log.verified
    message: '"the log does not verify: " + input.log.error'
  - name: provenance-verified
    require: input.provenance.present && input.provenance.verified
    message: '"the provenance does not verify: " + input.provenance.error'
  - name: chain-verified
    require: input.chain.verified
    message: 'input.chain.failures.join("; ")'
  - name: links-verified
    for_each: input.links
    require: item.verified
    attestation: '"link " + item.envelope'
    message: item.error
  - name: rebuilt
    require: input.vsas.filter(v, v.verified && v.result == "PASSED" && v.subject_matches && v.provenance_matches).size() >= 1
    message: '"no PASSED rebuild of this provenance"'
`

// TestClusterRetireKey: a worker's key is retired while it runs an action. The worker
// takes no more work; once the sequencer has recorded the key's bound, the link of the
// action it finishes afterwards is refused (moved to rejected/ with the reason) and its
// output does not verify, while the link it made before stays valid; a newly admitted
// worker takes over and its links verify.
func TestClusterRetireKey(t *testing.T) {
	e := newCluster(t, clusterOpts{frontends: 1, workers: 1, sealAfter: "1s"})
	conn := dial(t, e.frontends[0].Addr)
	ctx := harness.Context(t, 3*time.Minute)
	before := e.upload(t, conn, "echo before-retirement > out.txt", "out.txt")
	xb := execute(ctx, conn, before)
	xb.check(t, "the action before the retirement")
	e.waitLinksLogged(t)

	long := e.upload(t, conn, "sleep 10; echo after-retirement > out.txt", "out.txt")
	xl := execute(ctx, conn, long)
	if w := e.runningOn(t, long, time.Minute); w != e.workers[0] {
		t.Fatalf("ran on %s", w.Name)
	}
	pk := harness.Run(t, "attest", "pubkey", "--data", e.workerData[0], "--json")
	var exp struct {
		ActiveKeyID string `json:"active_keyid"`
	}
	if err := json.Unmarshal([]byte(pk.Stdout), &exp); err != nil || exp.ActiveKeyID == "" {
		t.Fatalf("worker key: %v %s", err, pk.Stderr)
	}
	if r := harness.Run(t, "cluster", "retire-key", "--cluster", e.nats.URL, exp.ActiveKeyID); r.Code != 0 {
		t.Fatalf("cluster retire-key: %s", r.Stderr)
	}
	e.seq.WaitLog(t, regexp.MustCompile(`recording the log size that bounds retired keys`), 30*time.Second)
	xl.check(t, "the action running while its worker's key was retired")
	e.workers[0].WaitLog(t, regexp.MustCompile(`key is no longer trusted; taking no more work`), 30*time.Second)

	// Its link is refused with the reason, not logged.
	e.waitLinksLogged(t)
	rejected, _ := os.ReadDir(filepath.Join(e.s3.Dir, "kiln-cache", "c", "rejected"))
	if len(rejected) != 1 {
		t.Fatalf("%d rejected links, want 1:\n%s", len(rejected), e.seq.Log())
	}
	why, _ := os.ReadFile(filepath.Join(e.s3.Dir, "kiln-cache", "c", "rejected", rejected[0].Name()))
	if !strings.Contains(string(why), "signed by key "+exp.ActiveKeyID) || !strings.Contains(string(why), "retired") {
		t.Fatalf("rejected for %q", why)
	}
	verify := func(d *repb.Digest) harness.Result {
		return harness.Run(t, "attest", "verify", "--cluster", e.nats.URL, "--storage", e.storage, "--data", t.TempDir(), "--subject", "sha256:"+d.GetHash())
	}
	if r := verify(outputOf(t, xl)); r.Code != 1 {
		t.Fatalf("the output whose link came after the key's retirement verified: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
	if r := verify(outputOf(t, xb)); r.Code != 0 {
		t.Fatalf("the output linked before the retirement no longer verifies: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}

	// A new worker with an admitted key takes the next action; the retired one does not.
	e.addWorker(t, "w2")
	next := e.upload(t, conn, "echo new-key > out.txt", "out.txt")
	xn := execute(ctx, conn, next)
	xn.check(t, "the action after the retirement")
	if w := e.runningOn(t, next, time.Second); w != e.workers[1] {
		t.Fatalf("the action after the retirement ran on %s", w.Name)
	}
	e.checkAll(t, conn, []clusterAction{before, next})
}
