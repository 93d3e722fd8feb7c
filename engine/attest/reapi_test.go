package attest

import (
	"context"
	"strings"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
)

func TestNewActionFromREAPI(t *testing.T) {
	ctx := context.Background()
	cas := cache.NewMemoryStore()
	put := func(s string) *repb.Digest {
		d, err := cache.PutBytes(ctx, cas, []byte(s))
		if err != nil {
			t.Fatal(err)
		}
		return d.Proto()
	}
	putDir := func(d *repb.Directory) *repb.Digest {
		dd, err := cache.PutProto(ctx, cas, d)
		if err != nil {
			t.Fatal(err)
		}
		return dd.Proto()
	}
	include := &repb.Directory{
		Files:    []*repb.FileNode{{Name: "a.h", Digest: put("A")}},
		Symlinks: []*repb.SymlinkNode{{Name: "b.h", Target: "a.h"}},
	}
	root := &repb.Directory{
		Files:       []*repb.FileNode{{Name: "hello.c", Digest: put("C")}},
		Directories: []*repb.DirectoryNode{{Name: "include", Digest: putDir(include)}},
	}
	sub := &repb.Directory{Files: []*repb.FileNode{{Name: "y.txt", Digest: put("Y")}}}
	_, subD, _ := cache.DigestOfProto(sub)
	tree := &repb.Tree{
		Root:     &repb.Directory{Files: []*repb.FileNode{{Name: "x.txt", Digest: put("X")}}, Directories: []*repb.DirectoryNode{{Name: "sub", Digest: subD.Proto()}}},
		Children: []*repb.Directory{sub},
	}
	treeD, _ := cache.PutProto(ctx, cas, tree)
	//lint:ignore SA1019 Command.platform is what REAPI 2.0 clients send.
	cmd := &repb.Command{Arguments: []string{"cc", "-c", "hello.c"}, WorkingDirectory: "work", Platform: &repb.Platform{Properties: []*repb.Platform_Property{{Name: "OSFamily", Value: "linux"}}}}
	cmdD, _ := cache.PutProto(ctx, cas, cmd)
	act := &repb.Action{CommandDigest: cmdD.Proto(), InputRootDigest: putDir(root)}
	actD, _ := cache.PutProto(ctx, cas, act)
	res := &repb.ActionResult{
		OutputFiles:       []*repb.OutputFile{{Path: "out/hello.o", Digest: put("O")}},
		OutputSymlinks:    []*repb.OutputSymlink{{Path: "out/link", Target: "hello.o"}},
		OutputDirectories: []*repb.OutputDirectory{{Path: "out/gen", TreeDigest: treeD.Proto()}},
		ExitCode:          3,
		StdoutRaw:         []byte("hi\n"),
	}
	a, err := NewAction(ctx, cas, actD, act, cmd, res)
	if err != nil {
		t.Fatal(err)
	}
	var ins, outs []string
	for _, f := range a.Inputs {
		ins = append(ins, f.Path+"="+f.SymlinkTarget)
	}
	for _, f := range a.Outputs {
		outs = append(outs, f.Path+"="+f.SymlinkTarget)
	}
	if got := strings.Join(ins, " "); got != "hello.c= include/a.h= include/b.h=a.h" {
		t.Errorf("inputs %s", got)
	}
	if got := strings.Join(outs, " "); got != "work/out/gen/sub/y.txt= work/out/gen/x.txt= work/out/hello.o= work/out/link=hello.o" {
		t.Errorf("outputs %s", got)
	}
	if a.ExitCode != 3 || a.Stdout != cache.DigestOf([]byte("hi\n")) || a.Stderr != cache.EmptyDigest || a.CommandDigest != cmdD || len(a.Platform) != 1 {
		t.Errorf("action %+v", a)
	}
	a.KilnVersion = "test"
	if _, err := a.Payload(); err != nil {
		t.Fatal(err)
	}

	// A tree that references a directory it does not carry is refused.
	bad := &repb.Tree{Root: tree.Root}
	badD, _ := cache.PutProto(ctx, cas, bad)
	res.OutputDirectories[0].TreeDigest = badD.Proto()
	if _, err := NewAction(ctx, cas, actD, act, cmd, res); err == nil {
		t.Fatal("a tree missing a child directory was accepted")
	}
}

func TestAttachToResult(t *testing.T) {
	r := &repb.ActionResult{}
	if _, ok, _ := LinkFromResult(r); ok {
		t.Fatal("found a link in an empty result")
	}
	d1, d2 := blob("env1"), blob("env2")
	AttachToResult(r, d1)
	AttachToResult(r, d2) // replaces
	if n := len(r.ExecutionMetadata.AuxiliaryMetadata); n != 1 {
		t.Fatalf("%d aux entries", n)
	}
	got, ok, err := LinkFromResult(r)
	if err != nil || !ok || got != d2 {
		t.Fatalf("LinkFromResult = %v %v %v", got, ok, err)
	}
	// The Any decodes as a plain REAPI Digest with the standard protobuf machinery.
	var d repb.Digest
	if err := r.ExecutionMetadata.AuxiliaryMetadata[0].UnmarshalTo(&d); err != nil || d.Hash != d2.Hash {
		t.Fatalf("UnmarshalTo: %v %v", err, &d)
	}
}
