package ui

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/disk"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/tlog"
	"github.com/kilnbuild/kiln/engine/history"
	"github.com/kilnbuild/kiln/engine/quarantine"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

func init() { tlog.RouteLibraryLogs(nil) }

// fixture is a data dir with n executed actions, signed, logged and indexed as kiln
// serve would have them: every action compiles src/I.c into out/I.o; every tenth one
// links the nine objects before it into bin/appI.
type fixture struct {
	data    string
	cas     *disk.Store
	ui      *UI
	h       *history.Index
	q       *quarantine.List
	actions []cache.Digest
	// objects[i] and apps[i] are the SHA-256s of out/i.o and bin/appI (i%10 == 9).
	objects map[int]string
	apps    map[int]string
	reg     *prometheus.Registry
}

// hostile strings the fixture's action 0 carries in its argv, output path and stdout.
const (
	hostileArgv   = `<script>alert("argv")</script>`
	hostilePath   = `out/"'><img src=x onerror=alert(1)>.o`
	hostileStdout = `</pre><script>alert('stdout')</script>`
)

func newFixture(t testing.TB, n int) *fixture {
	t.Helper()
	ctx := context.Background()
	f := &fixture{data: t.TempDir(), objects: map[int]string{}, apps: map[int]string{}}
	var err error
	f.cas, err = disk.Open(ctx, attest.PathsFor(f.data).CAS, disk.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.cas.Close() })
	signer, err := attest.Open(ctx, attest.Options{DataDir: f.data, CAS: f.cas, Log: tlog.Options{CheckpointInterval: 50 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	if f.q, err = quarantine.Open(f.data); err != nil {
		t.Fatal(err)
	}
	if f.h, err = history.Open(filepath.Join(f.data, "history", "index.db"), nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.h.Close() })
	put := func(b []byte) cache.Digest {
		d, err := cache.PutBytes(ctx, f.cas, b)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	toolchain := "sha256:" + cache.DigestOf([]byte("toolchain manifest")).Hash
	start := time.Now().Add(-time.Hour)
	for i := 0; i < n; i++ {
		src := put([]byte(fmt.Sprintf("int f%d(void) { return %d; }\n", i, i)))
		obj := []byte(fmt.Sprintf("object %d", i))
		od := put(obj)
		f.objects[i] = od.Hash
		outPath := fmt.Sprintf("out/%d.o", i)
		argv := []string{"cc", "-c", fmt.Sprintf("src/%d.c", i), "-o", outPath}
		stdout := []byte(fmt.Sprintf("compiled %d\n", i))
		if i == 0 {
			outPath = hostilePath
			argv = append(argv, hostileArgv)
			stdout = []byte(hostileStdout + "\n")
		}
		inputs := []attest.File{{Path: fmt.Sprintf("src/%d.c", i), Digest: src}}
		outputs := []attest.File{{Path: outPath, Digest: od}}
		root := &repb.Directory{Directories: []*repb.DirectoryNode{}}
		srcDir := &repb.Directory{Files: []*repb.FileNode{{Name: fmt.Sprintf("%d.c", i), Digest: src.Proto()}}}
		sb, _ := proto.Marshal(srcDir)
		root.Directories = append(root.Directories, &repb.DirectoryNode{Name: "src", Digest: put(sb).Proto()})
		if i%10 == 9 { // a link step: the last ten objects
			argv = []string{"ld", "-o", fmt.Sprintf("bin/app%d", i)}
			inputs = nil
			objDir := &repb.Directory{}
			for j := i - 9; j < i; j++ {
				p := fmt.Sprintf("out/%d.o", j)
				if j == 0 {
					p = hostilePath
				}
				d := cache.Digest{Hash: f.objects[j], Size: int64(len(fmt.Sprintf("object %d", j)))}
				inputs = append(inputs, attest.File{Path: p, Digest: d})
				argv = append(argv, p)
				objDir.Files = append(objDir.Files, &repb.FileNode{Name: filepath.Base(p), Digest: d.Proto()})
			}
			app := put([]byte(fmt.Sprintf("app %d", i)))
			f.apps[i] = app.Hash
			outputs = []attest.File{{Path: fmt.Sprintf("bin/app%d", i), Digest: app}}
			ob, _ := proto.Marshal(objDir)
			root.Directories = []*repb.DirectoryNode{{Name: "out", Digest: put(ob).Proto()}}
		}
		rb, _ := proto.Marshal(root)
		rootD := put(rb)
		cmd := &repb.Command{Arguments: argv, EnvironmentVariables: []*repb.Command_EnvironmentVariable{{Name: "PATH", Value: "/bin"}}}
		for _, o := range outputs {
			cmd.OutputPaths = append(cmd.OutputPaths, o.Path)
		}
		cb, _ := proto.Marshal(cmd)
		cd := put(cb)
		ab, _ := proto.Marshal(&repb.Action{CommandDigest: cd.Proto(), InputRootDigest: rootD.Proto(),
			Platform: &repb.Platform{Properties: []*repb.Platform_Property{{Name: "container-image", Value: "docker://kiln/cc@" + toolchain}}}})
		ad := put(ab)
		f.actions = append(f.actions, ad)
		exit := 0
		if i%7 == 3 {
			exit = 1
		}
		sd := put(stdout)
		linked, err := signer.Link(ctx, attest.Action{ActionDigest: ad, CommandDigest: cd, Toolchain: toolchain, Inputs: inputs, Outputs: outputs,
			Argv: argv, ExitCode: exit, Stdout: sd, Stderr: cache.EmptyDigest, KilnVersion: "test"})
		if err != nil {
			t.Fatal(err)
		}
		res := &repb.ActionResult{ExitCode: int32(exit), StdoutDigest: sd.Proto(), ExecutionMetadata: &repb.ExecutedActionMetadata{}}
		for _, o := range outputs {
			res.OutputFiles = append(res.OutputFiles, &repb.OutputFile{Path: o.Path, Digest: o.Digest.Proto()})
		}
		t0 := start.Add(time.Duration(i) * time.Second)
		md := res.ExecutionMetadata
		md.QueuedTimestamp, md.WorkerStartTimestamp = timestamppb.New(t0), timestamppb.New(t0.Add(time.Millisecond))
		md.InputFetchStartTimestamp, md.InputFetchCompletedTimestamp = timestamppb.New(t0.Add(time.Millisecond)), timestamppb.New(t0.Add(3*time.Millisecond))
		md.ExecutionStartTimestamp, md.ExecutionCompletedTimestamp = timestamppb.New(t0.Add(3*time.Millisecond)), timestamppb.New(t0.Add(40*time.Millisecond))
		md.WorkerCompletedTimestamp = timestamppb.New(t0.Add(45 * time.Millisecond))
		attest.AttachToResult(res, linked.Digest)
		outcome := history.OK
		if exit != 0 {
			outcome = history.Failed
		}
		f.h.Record(history.RunFromExecution(history.Execution{Action: ad, Clients: []string{fmt.Sprintf("ci-%d", i%3)}, Submitted: t0, Done: t0.Add(50 * time.Millisecond),
			Outcome: outcome, Response: &repb.ExecuteResponse{Result: res}}))
		if i%5 == 0 { // a later cache hit
			f.h.Record(history.RunFromExecution(history.Execution{Action: ad, Clients: []string{"dev-ann"}, Submitted: t0, Done: t0.Add(time.Second),
				Outcome: history.Cached, Response: &repb.ExecuteResponse{Result: res, CachedResult: true}}))
		}
	}
	f.h.Flush()
	if err := signer.Close(ctx); err != nil {
		t.Fatal(err)
	}
	kr := signer.Keyring()
	lk := kr.Log()
	lv, err := lk.Verifier()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.h.CatchUp(ctx, history.Links{Log: tlog.NewReader(attest.PathsFor(f.data).Log, lv), Envelopes: attest.NewStore(attest.PathsFor(f.data), f.cas)}); err != nil {
		t.Fatal(err)
	}
	f.reg = prometheus.NewRegistry()
	s := NewSampler(f.reg, 0, nil)
	s.Add(s.Take())
	f.ui, err = New(Config{CAS: f.cas, Attest: attest.NewStore(attest.PathsFor(f.data), f.cas), Keys: kr, Quarantine: f.q, History: f.h, Metrics: s, Version: "test"})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// get serves one request and returns the response and its body.
func (f *fixture) get(t testing.TB, url string) (*http.Response, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	f.ui.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, url, nil))
	res := rec.Result()
	b, _ := io.ReadAll(res.Body)
	return res, string(b)
}
