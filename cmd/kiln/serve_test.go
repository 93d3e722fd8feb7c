package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kilnbuild/kiln/engine"
	"github.com/kilnbuild/kiln/engine/server"
)

// runServe runs kiln serve with args and returns the configuration it would serve
// with, what it printed, and its error.
func runServe(t *testing.T, args ...string) (server.Config, string, error) {
	t.Helper()
	var got server.Config
	cmd := newServeCmd(func(_ context.Context, c server.Config) error { got = c; return nil })
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	err := cmd.ExecuteContext(context.Background())
	return got, out.String(), err
}

func writeFile(t *testing.T, name, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestServeDefaults: kiln serve without flags runs as many actions at once as there
// are CPUs and keeps as many sandboxes prepared (issue 12, defect 3: it prepared none,
// having copied the unresolved --concurrency 0), with the documented defaults.
func TestServeDefaults(t *testing.T) {
	cfg, _, err := runServe(t)
	if err != nil {
		t.Fatal(err)
	}
	ex := cfg.Execution
	n := runtime.NumCPU()
	if ex.Concurrency != n || ex.Prestart != n {
		t.Errorf("concurrency %d, prestart %d; want both %d (the CPUs)", ex.Concurrency, ex.Prestart, n)
	}
	want := engine.ExecutionConfig{Concurrency: n, Prestart: n, MaxQueue: 10000, DefaultTimeout: 15 * time.Minute, MaxTimeout: time.Hour}
	if ex != want {
		t.Errorf("execution %+v, want %+v", ex, want)
	}
	if cfg.Listen != "127.0.0.1:8980" || cfg.HTTPListen != "127.0.0.1:8981" || string(cfg.Data) != defaultDataDir() ||
		cfg.MaxSize != 0 || cfg.LogLevel != "info" || cfg.LogFormat != "text" || cfg.Logger == nil || cfg.Version != version {
		t.Errorf("server settings %+v", cfg)
	}
	// Serve, and Open below it, resolve again: nothing changes.
	if again := cfg.Resolved(); !reflect.DeepEqual(again.Options.Execution, cfg.Execution) {
		t.Errorf("resolving twice: %+v", again.Execution)
	}
	// --print-config shows the same.
	_, out, err := runServe(t, "--print-config")
	if err != nil || !strings.Contains(out, "\nconcurrency: "+strconv.Itoa(n)+"\n") || !strings.Contains(out, "\nprestart: "+strconv.Itoa(n)+"\n") {
		t.Fatalf("--print-config: %v\n%s", err, out)
	}
}

// TestServeConfigFile: a YAML or JSON file sets what its keys name, flags on the
// command line override it, and what the file leaves out keeps its default; resolution
// (prestart from concurrency) happens after both.
func TestServeConfigFile(t *testing.T) {
	yml := writeFile(t, "serve.yaml", `# kiln serve
concurrency: 3
max-queue: 7
max-size: 1GiB
default-timeout: 2m
fetch-allow: [a.example, b.example]
data: /srv/kiln
`)
	jsn := writeFile(t, "serve.json", `{"concurrency": 3, "max-queue": 7, "max-size": 1073741824,
	 "default-timeout": "2m", "fetch-allow": ["a.example", "b.example"], "data": "/srv/kiln"}`)
	for _, file := range []string{yml, jsn} {
		cfg, _, err := runServe(t, "--config", file, "--max-queue", "9", "--fetch-allow", "c.example")
		if err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		ex := cfg.Execution
		if ex.Concurrency != 3 || ex.Prestart != 3 || ex.MaxQueue != 9 || ex.DefaultTimeout != 2*time.Minute || ex.MaxTimeout != time.Hour {
			t.Errorf("%s: execution %+v", file, ex)
		}
		if cfg.MaxSize != 1<<30 || string(cfg.Data) != "/srv/kiln" || !reflect.DeepEqual(cfg.FetchAllow, []string{"c.example"}) || cfg.Listen != "127.0.0.1:8980" {
			t.Errorf("%s: %+v", file, cfg)
		}
	}
	// Without the command line's flags, the file's values stand.
	cfg, _, err := runServe(t, "--config", yml)
	if err != nil || cfg.Execution.MaxQueue != 7 || !reflect.DeepEqual(cfg.FetchAllow, []string{"a.example", "b.example"}) {
		t.Fatalf("%+v %v", cfg, err)
	}
}

// TestServeConfigErrors: an unknown key is refused naming the key and its line; so are
// a duplicate key, a value of the wrong type and settings that do not go together.
func TestServeConfigErrors(t *testing.T) {
	for _, c := range []struct {
		name, body string
		want       []string
	}{
		{"unknown key", "concurrency: 2\n\nconcurency: 3\n", []string{"line 3", `unknown key "concurency"`}},
		{"unknown key in JSON", "{\"listen\": \"127.0.0.1:1\",\n \"tls\": {}}", []string{"line 2", `unknown key "tls"`}},
		{"wrong type", "max-queue: lots\n", []string{"line 1", "lots"}},
		{"bad size", "max-size: huge\n", []string{"line 1", "huge"}},
		{"duplicate", "listen: a:1\nlisten: b:2\n", []string{"line 2", "listen"}},
		{"not a mapping", "- listen\n", []string{"line 1"}},
		{"verify rate", "verify-rate: 2\n", []string{"--verify-rate 2"}},
		{"client writes with execution", "allow-client-ac-writes: true\n", []string{"--no-execution"}},
	} {
		f := writeFile(t, "bad.yaml", strings.ReplaceAll(c.body, `\n`, "\n"))
		_, _, err := runServe(t, "--config", f)
		var ee *exitError
		if !errors.As(err, &ee) || ee.code != 2 {
			t.Errorf("%s: %v, want exit 2", c.name, err)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(ee.msg, w) {
				t.Errorf("%s: %q does not say %q", c.name, ee.msg, w)
			}
		}
		if strings.Contains(ee.msg, "\n") {
			t.Errorf("%s: error is not one line: %q", c.name, ee.msg)
		}
	}
	if _, _, err := runServe(t, "--config", filepath.Join(t.TempDir(), "absent.yaml")); err == nil {
		t.Error("a missing config file was accepted")
	}
}

// TestPrintConfigRoundTrip: --print-config prints what --config reads back to the
// same configuration, in YAML, or in JSON for a JSON file.
func TestPrintConfigRoundTrip(t *testing.T) {
	args := []string{"--concurrency", "5", "--max-size", "3GiB", "--fetch-allow", "x.example,y.example",
		"--no-execution", "--allow-client-ac-writes", "--verify-rate", "0.25", "--default-toolchain", "docker://kiln/busybox@sha256:" + strings.Repeat("a", 64),
		"--oidc-issuer", "https://a.example", "--oidc-audience", "kiln-a", "--oidc-issuer", "https://b.example", "--oidc-audience", "kiln-b", "--oidc-max-ttl", "90m"}
	want, _, err := runServe(t, args...)
	if err != nil {
		t.Fatal(err)
	}
	_, out, err := runServe(t, append(args, "--print-config")...)
	if err != nil {
		t.Fatal(err)
	}
	if want.Execution.Prestart != 5 {
		t.Fatalf("prestart %d, want 5", want.Execution.Prestart)
	}
	if o := want.OIDC; len(o.Issuers) != 2 || o.Audiences[1] != "kiln-b" || o.MaxTTL != 90*time.Minute {
		t.Fatalf("oidc settings %+v", o)
	}
	file := writeFile(t, "printed.yaml", out)
	_, again, err := runServe(t, "--config", file, "--print-config")
	if err != nil || again != out {
		t.Fatalf("reading back: %v\nprinted:\n%s\nthen:\n%s", err, out, again)
	}
	got, _, err := runServe(t, "--config", file)
	if err != nil {
		t.Fatal(err)
	}
	got.Logger, want.Logger = nil, nil
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("read back %+v, want %+v", got, want)
	}
	// JSON in, JSON out, and that reads back too.
	jfile := writeFile(t, "in.json", `{"concurrency": 4}`)
	_, jout, err := runServe(t, "--config", jfile, "--print-config")
	if err != nil || !strings.HasPrefix(jout, "{") || !strings.Contains(jout, `"prestart": 4`) {
		t.Fatalf("JSON print: %v\n%s", err, jout)
	}
	_, jagain, err := runServe(t, "--config", writeFile(t, "printed.json", jout), "--print-config")
	if err != nil || jagain != jout {
		t.Fatalf("JSON read back: %v\n%s\nthen\n%s", err, jout, jagain)
	}
}

// TestServeStorageConfig: shared storage comes from --storage (a URL) or the storage:
// section of the configuration file, the flag overriding the file; --print-config
// prints the section with its defaults resolved, in a form --config reads back; a
// section that names no bucket is refused.
func TestServeStorageConfig(t *testing.T) {
	yml := writeFile(t, "serve.yaml", `
storage:
  s3:
    bucket: build-cache
    prefix: team/kiln
    endpoint: http://127.0.0.1:7070
    path-style: true
    exists-ttl: 10m
`)
	cfg, _, err := runServe(t, "--config", yml)
	if err != nil {
		t.Fatal(err)
	}
	s := cfg.Storage.S3
	if s == nil || s.Bucket != "build-cache" || s.Prefix != "team/kiln/" || s.Endpoint != "http://127.0.0.1:7070" || !s.PathStyle ||
		s.ExistsTTL != 10*time.Minute || s.RefreshAfter != 24*time.Hour {
		t.Fatalf("storage from the file: %+v", s)
	}
	cfg, _, err = runServe(t, "--config", yml, "--storage", "s3://other/p?endpoint=https://s3.example&region=eu-west-1")
	if err != nil || cfg.Storage.S3 == nil || cfg.Storage.S3.Bucket != "other" || cfg.Storage.S3.Region != "eu-west-1" || cfg.Storage.S3.PathStyle {
		t.Fatalf("--storage over the file: %+v, %v", cfg.Storage.S3, err)
	}
	_, out, err := runServe(t, "--config", yml, "--print-config")
	if err != nil || !strings.Contains(out, "storage:\n    s3:\n        bucket: build-cache\n") {
		t.Fatalf("print-config: %v\n%s", err, out)
	}
	again, _, err := runServe(t, "--config", writeFile(t, "printed.yaml", out))
	if err != nil || !reflect.DeepEqual(again.Storage, cfg2(t, yml).Storage) {
		t.Fatalf("printed storage does not read back: %+v, %v", again.Storage.S3, err)
	}
	if none, _, _ := runServe(t); none.Storage.S3 != nil {
		t.Fatal("storage without --storage or a storage section")
	}
	if _, _, err := runServe(t, "--storage", "s3://b?colour=blue"); err == nil {
		t.Fatal("a bad --storage URL was accepted")
	}
	if _, _, err := runServe(t, "--config", writeFile(t, "nobucket.yaml", "storage:\n  s3:\n    prefix: x\n")); err == nil || !strings.Contains(err.Error(), "no bucket") {
		t.Fatalf("a storage section without a bucket: %v", err)
	}
}

func cfg2(t *testing.T, file string) server.Config {
	t.Helper()
	c, _, err := runServe(t, "--config", file)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestServeClusterConfig: the cluster comes from --cluster flags or the cluster:
// section, flags over the file, defaults resolved and printed in a form --config reads
// back; a cluster without shared storage, or with --no-execution, is refused.
func TestServeClusterConfig(t *testing.T) {
	yml := writeFile(t, "serve.yaml", `
storage: {s3: {bucket: b, endpoint: "http://127.0.0.1:7070", path-style: true}}
cluster:
  url: nats://10.0.0.2:4222,nats://10.0.0.3:4222
  creds: /etc/kiln/nats.creds
  tls-ca: /etc/kiln/nats-ca.pem
`)
	cfg, _, err := runServe(t, "--config", yml)
	if err != nil {
		t.Fatal(err)
	}
	c := cfg.Cluster
	if len(c.Servers()) != 2 || c.Creds != "/etc/kiln/nats.creds" || c.TLSCA != "/etc/kiln/nats-ca.pem" || c.AckWait != 30*time.Second || c.MaxDeliver != 3 || c.Retain != 24*time.Hour {
		t.Fatalf("cluster from the file: %+v", c)
	}
	cfg, _, err = runServe(t, "--config", yml, "--cluster", "embedded", "--cluster-listen", "127.0.0.1:4222")
	if err != nil || !cfg.Cluster.IsEmbedded() || cfg.Cluster.Listen != "127.0.0.1:4222" || cfg.Cluster.Creds != "/etc/kiln/nats.creds" {
		t.Fatalf("--cluster over the file: %+v, %v", cfg.Cluster, err)
	}
	_, out, err := runServe(t, "--config", yml, "--print-config")
	if err != nil || !strings.Contains(out, "cluster:\n    url: nats://10.0.0.2:4222,nats://10.0.0.3:4222\n") || !strings.Contains(out, "ack-wait: 30s") {
		t.Fatalf("print-config: %v\n%s", err, out)
	}
	again, _, err := runServe(t, "--config", writeFile(t, "printed.yaml", out))
	if err != nil || !reflect.DeepEqual(again.Cluster, cfg2(t, yml).Cluster) {
		t.Fatalf("printed cluster does not read back: %+v, %v", again.Cluster, err)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--cluster", "nats://a:4222"}, "--cluster needs --storage"},
		{[]string{"--config", yml, "--no-execution"}, "do not go together"},
		{[]string{"--config", yml, "--cluster", "embedded"}, "needs --cluster-listen"},
	} {
		if _, _, err := runServe(t, c.args...); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("kiln serve %v: %v, want %q", c.args, err, c.want)
		}
	}
}
