package executor_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/executor/executortest"
)

// Input trees and outputs at scale (issue 15): an action with 10,000 input files in 100
// directories and 1,000 output files, run by the executor over a disk store (the fake
// sandbox: the command's own cost is a few writes), beside what the same tree costs
// coreutils to lay out and remove as hard links (`cp -al`, the floor of a hard-linked
// exec root) and as symlinks (`cp -as`, what Bazel's own sandboxes make per action):
//
//	go test -run '^$' -bench InputTreeAtScale -benchtime 20x -count 3 ./engine/executor
//
// kiln's input_fetch is reading and checking the 101 Directory messages and linking
// every file into a fresh exec root; output_upload is hashing and adopting the 1,000
// outputs and building their Tree; the whole op adds the run and removing the exec root.
const (
	scaleDirs     = 100
	scaleFiles    = 100 // per directory
	scaleOutputs  = 1000
	scaleFileSize = 200
)

func BenchmarkInputTreeAtScale(b *testing.B) {
	b.Run("kiln", func(b *testing.B) {
		e := executortest.NewEnv(b, nil)
		root := scaleTree(b, e)
		args := []string{"mkdir", "out"}
		for i := 0; i < scaleOutputs; i++ {
			args = append(args, "write", fmt.Sprintf("out/o%04d", i), fmt.Sprintf("output %d", i))
		}
		cmd := &repb.Command{Arguments: args, OutputDirectories: []string{"out"}}
		var fetch, upload time.Duration
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			salt := []byte(fmt.Sprintf("run %d %d", i, time.Now().UnixNano())) // never a cache hit
			d := e.Action(b, cmd, root, func(a *repb.Action) { a.Salt = salt })
			b.StartTimer()
			ex, err := e.Run(b, d)
			if err != nil {
				b.Fatal(err)
			}
			if n := len(ex.Result.GetOutputDirectories()); n != 1 || ex.Result.GetExitCode() != 0 {
				b.Fatalf("exit %d, %d output directories", ex.Result.GetExitCode(), n)
			}
			md := ex.Result.GetExecutionMetadata()
			fetch += md.GetInputFetchCompletedTimestamp().AsTime().Sub(md.GetInputFetchStartTimestamp().AsTime())
			upload += md.GetOutputUploadCompletedTimestamp().AsTime().Sub(md.GetOutputUploadStartTimestamp().AsTime())
		}
		b.ReportMetric(float64(fetch.Microseconds())/1e3/float64(b.N), "input_fetch_ms/op")
		b.ReportMetric(float64(upload.Microseconds())/1e3/float64(b.N), "output_upload_ms/op")
	})
	for _, peer := range []struct{ name, flag string }{{"cp-al", "-al"}, {"cp-as", "-as"}} {
		b.Run(peer.name, func(b *testing.B) {
			src := filepath.Join(b.TempDir(), "src")
			for d := 0; d < scaleDirs; d++ {
				dir := filepath.Join(src, fmt.Sprintf("d%03d", d))
				if err := os.MkdirAll(dir, 0o755); err != nil {
					b.Fatal(err)
				}
				for f := 0; f < scaleFiles; f++ {
					if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%03d", f)), scaleContent(d, f), 0o644); err != nil {
						b.Fatal(err)
					}
				}
			}
			dst := filepath.Join(filepath.Dir(src), "dst")
			var made time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				start := time.Now()
				if out, err := exec.Command("cp", peer.flag, src, dst).CombinedOutput(); err != nil {
					b.Fatalf("cp %s: %v %s", peer.flag, err, out)
				}
				made += time.Since(start)
				if out, err := exec.Command("rm", "-rf", dst).CombinedOutput(); err != nil {
					b.Fatalf("rm: %v %s", err, out)
				}
			}
			b.ReportMetric(float64(made.Microseconds())/1e3/float64(b.N), "lay_out_ms/op")
		})
	}
}

// scaleTree stores the 10,000 input files and their 101 directories; it returns the
// root's digest.
func scaleTree(b *testing.B, e *executortest.Env) cache.Digest {
	root := &repb.Directory{}
	for d := 0; d < scaleDirs; d++ {
		dir := &repb.Directory{}
		for f := 0; f < scaleFiles; f++ {
			fd := e.PutBytes(b, scaleContent(d, f))
			dir.Files = append(dir.Files, &repb.FileNode{Name: fmt.Sprintf("f%03d", f), Digest: fd.Proto()})
		}
		dd := e.Put(b, dir)
		root.Directories = append(root.Directories, &repb.DirectoryNode{Name: fmt.Sprintf("d%03d", d), Digest: dd.Proto()})
	}
	return e.Put(b, root)
}

// scaleContent is input file f of directory d: distinct bytes, so every file is a blob
// of its own.
func scaleContent(d, f int) []byte {
	b := make([]byte, scaleFileSize)
	copy(b, fmt.Sprintf("input %d/%d\n", d, f))
	return b
}
