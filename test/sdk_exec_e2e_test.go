package test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bazelbuild/remote-apis-sdks/go/pkg/client"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/command"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/digest"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/filemetadata"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/outerr"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/rexec"
	"github.com/kilnbuild/kiln/test/harness"
)

// busyboxServer starts kiln serve with the busybox toolchain as the default.
func busyboxServer(t *testing.T, args ...string) (*harness.Server, string) {
	t.Helper()
	if testing.Short() {
		t.Skip("e2e")
	}
	data := t.TempDir()
	bb := harness.RecipeToolchain(t, data, "busybox")
	return harness.StartServer(t, append([]string{"--data", data, "--default-toolchain", bb}, args...)...), bb
}

func rexecClient(t *testing.T, addr string) *rexec.Client {
	t.Helper()
	return &rexec.Client{FileMetadataCache: filemetadata.NewNoopCache(), GrpcClient: sdkClient(t, addr, client.RetryTransient())}
}

// TestSDKRexec: the remote-apis-sdks rexec client runs a command with an input file
// through kiln and downloads its outputs.
func TestSDKRexec(t *testing.T) {
	srv, bb := busyboxServer(t)
	c := rexecClient(t, srv.Addr)
	root := t.TempDir()
	os.WriteFile(filepath.Join(root, "in.txt"), []byte("hello from the sdk\n"), 0o644)
	cmd := &command.Command{
		Args:        []string{"/bin/sh", "-c", "tr a-z A-Z < in.txt > out/up.txt && mkdir -p dir && echo x > dir/f && echo done"},
		ExecRoot:    root,
		InputSpec:   &command.InputSpec{Inputs: []string{"in.txt"}},
		OutputFiles: []string{"out/up.txt"},
		OutputDirs:  []string{"dir"},
		Platform:    map[string]string{"container-image": "docker://kiln/busybox@" + bb},
		Identifiers: &command.Identifiers{ToolName: "kiln-e2e"},
	}
	oe := outerr.NewRecordingOutErr()
	res, _ := c.Run(context.Background(), cmd, command.DefaultExecutionOptions(), oe)
	if res.Err != nil || res.ExitCode != 0 {
		t.Fatalf("rexec: %+v stderr=%s", res, oe.Stderr())
	}
	if got, _ := os.ReadFile(filepath.Join(root, "out/up.txt")); string(got) != "HELLO FROM THE SDK\n" {
		t.Fatalf("downloaded output %q", got)
	}
	if got, _ := os.ReadFile(filepath.Join(root, "dir/f")); string(got) != "x\n" {
		t.Fatalf("downloaded output dir file %q", got)
	}
	if strings.TrimSpace(string(oe.Stdout())) != "done" {
		t.Fatalf("stdout %q", oe.Stdout())
	}
	// Run again: an action-cache hit.
	res, _ = c.Run(context.Background(), cmd, command.DefaultExecutionOptions(), outerr.NewRecordingOutErr())
	if res.Status != command.CacheHitResultStatus {
		t.Fatalf("second run: status %v, want a cache hit", res.Status)
	}
}

// TestExecutionLoad: 200 distinct actions plus 50 duplicates at once from several
// clients: every one completes with its own output, duplicates are merged, nothing runs
// twice, and CAS calls are answered meanwhile.
func TestExecutionLoad(t *testing.T) {
	srv, bb := busyboxServer(t, "--concurrency", "2")
	const distinct, dupOf, dupEach = 200, 10, 5
	clients := make([]*rexec.Client, 5)
	for i := range clients {
		clients[i] = rexecClient(t, srv.Addr)
	}
	type job struct{ n int }
	var jobs []job
	for i := 0; i < distinct; i++ {
		jobs = append(jobs, job{i})
	}
	for i := 0; i < dupOf; i++ {
		for k := 0; k < dupEach; k++ {
			jobs = append(jobs, job{i})
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	// CAS traffic during the load.
	var casCalls atomic.Int64
	stopCAS := make(chan struct{})
	casDone := make(chan error, 1)
	go func() {
		c := sdkClient(t, srv.Addr)
		d := digest.NewFromBlob([]byte("probe"))
		for {
			select {
			case <-stopCAS:
				casDone <- nil
				return
			default:
			}
			cctx, ccancel := context.WithTimeout(ctx, 30*time.Second)
			_, err := c.MissingBlobs(cctx, []digest.Digest{d})
			ccancel()
			if err != nil {
				casDone <- err
				return
			}
			casCalls.Add(1)
			time.Sleep(20 * time.Millisecond)
		}
	}()
	var wg sync.WaitGroup
	errs := make(chan error, len(jobs))
	for i, j := range jobs {
		wg.Add(1)
		go func(i int, j job) {
			defer wg.Done()
			root := t.TempDir()
			cmd := &command.Command{
				Args:        []string{"/bin/sh", "-c", fmt.Sprintf("echo action-%d > out.txt", j.n)},
				ExecRoot:    root,
				InputSpec:   &command.InputSpec{},
				OutputFiles: []string{"out.txt"},
				Platform:    map[string]string{"container-image": "docker://kiln/busybox@" + bb},
				Identifiers: &command.Identifiers{ToolName: "kiln-load"},
			}
			res, _ := clients[i%len(clients)].Run(ctx, cmd, command.DefaultExecutionOptions(), outerr.NewRecordingOutErr())
			if res.Err != nil || res.ExitCode != 0 {
				errs <- fmt.Errorf("action %d: %+v", j.n, res)
				return
			}
			got, _ := os.ReadFile(filepath.Join(root, "out.txt"))
			if string(got) != fmt.Sprintf("action-%d\n", j.n) {
				errs <- fmt.Errorf("action %d: output %q", j.n, got)
			}
		}(i, j)
	}
	wg.Wait()
	close(stopCAS)
	if err := <-casDone; err != nil {
		t.Fatalf("CAS call failed during the load: %v", err)
	}
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	ok := srv.Metric(t, "kiln_executions_total", `outcome="ok"`)
	merged := srv.Metric(t, "kiln_executions_merged_total")
	cached := srv.Metric(t, "kiln_executions_total", `outcome="cached"`)
	t.Logf("executed %v, merged %v, cache hits %v, CAS calls during the load %d", ok, merged, cached, casCalls.Load())
	if int(ok) != distinct {
		t.Fatalf("%v executions for %d distinct actions: something ran twice or was lost", ok, distinct)
	}
	if merged == 0 {
		t.Fatal("no duplicate was merged into an execution in flight")
	}
	if casCalls.Load() < 10 {
		t.Fatalf("only %d CAS calls completed during the load", casCalls.Load())
	}
}
