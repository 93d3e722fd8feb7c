package attest

import (
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
)

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
