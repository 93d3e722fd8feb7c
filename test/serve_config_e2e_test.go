package test

import (
	"context"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/test/harness"
)

// TestServeConfigE2E: the real kiln serve reads its settings from --config (the flags
// of the command line still override them), refuses an unknown key with its line, and
// --print-config without flags shows a sandbox prepared for each CPU.
func TestServeConfigE2E(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	dir := t.TempDir()
	cfg := filepath.Join(dir, "serve.yaml")
	os.WriteFile(cfg, []byte("no-execution: true\nallow-client-ac-writes: true\nlisten: 127.0.0.1:1\n"), 0o644)
	srv := harness.StartServer(t, "--config", cfg) // the harness's --listen 127.0.0.1:0 overrides the file's
	caps, err := repb.NewCapabilitiesClient(sdkClient(t, srv.Addr).Connection()).GetCapabilities(context.Background(), &repb.GetCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if caps.GetExecutionCapabilities().GetExecEnabled() || !caps.GetCacheCapabilities().GetActionCacheUpdateCapabilities().GetUpdateEnabled() {
		t.Fatalf("capabilities %v: want the file's cache-only server with client writes", caps)
	}

	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("concurrency: 2\nmax-sise: 1GiB\n"), 0o644)
	res := harness.Run(t, "serve", "--config", bad, "--data", t.TempDir())
	if res.Code != 2 || !strings.Contains(res.Stderr, `line 2: unknown key "max-sise"`) || strings.Count(strings.TrimSpace(res.Stderr), "\n") != 0 {
		t.Fatalf("unknown key: exit %d, stderr %q", res.Code, res.Stderr)
	}

	res = harness.Run(t, "serve", "--print-config")
	n := strconv.Itoa(runtime.NumCPU())
	if res.Code != 0 || !strings.Contains(res.Stdout, "\nconcurrency: "+n+"\n") || !strings.Contains(res.Stdout, "\nprestart: "+n+"\n") {
		t.Fatalf("--print-config: exit %d\n%s%s", res.Code, res.Stdout, res.Stderr)
	}
}
