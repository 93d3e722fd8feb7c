package verify

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"path"
	"sort"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Kinds of things an action produces, as compared and reported.
const (
	KindFile      = "file"
	KindSymlink   = "symlink"
	KindDirectory = "directory"
	KindStdout    = "stdout"
	KindStderr    = "stderr"
	KindExitCode  = "exit_code"
)

// Entry is one thing a run produced: an output file, symlink or directory, its
// stdout or stderr, or its exit code.
type Entry struct {
	Kind       string `json:"kind"`
	Digest     string `json:"digest,omitempty"` // "sha256:HEX/SIZE" of a file, stdout or stderr
	Size       int64  `json:"size"`
	Executable bool   `json:"executable,omitempty"`
	Target     string `json:"target,omitempty"`    // a symlink's target
	ExitCode   *int   `json:"exit_code,omitempty"` // KindExitCode only
}

// FileEntry is the Entry of a file with digest d (also for stdout and stderr with kind).
func FileEntry(kind string, d cache.Digest, executable bool) Entry {
	return Entry{Kind: kind, Digest: "sha256:" + d.String(), Size: d.Size, Executable: executable}
}

// BlobDigest returns the digest of a file, stdout or stderr entry.
func (e Entry) BlobDigest() (cache.Digest, bool) {
	if len(e.Digest) < len("sha256:") || e.Digest[:len("sha256:")] != "sha256:" {
		return cache.Digest{}, false
	}
	d, err := cache.ParseDigest(e.Digest[len("sha256:"):])
	return d, err == nil
}

func (e Entry) equal(o Entry) bool {
	return e.Kind == o.Kind && e.Digest == o.Digest && e.Size == o.Size && e.Executable == o.Executable &&
		e.Target == o.Target && (e.ExitCode == nil) == (o.ExitCode == nil) && (e.ExitCode == nil || *e.ExitCode == *o.ExitCode)
}

// Manifest is everything one run produced, keyed for comparison. A rebuild can
// build one from recorded product digests and compare it with a fresh run's.
type Manifest struct {
	// Outputs holds files, symlinks and directories by path relative to the working
	// directory, including everything inside output directories.
	Outputs  map[string]Entry
	Stdout   Entry
	Stderr   Entry
	ExitCode int
}

// ManifestOf lists what an ActionResult holds, reading output directories' Trees
// from the CAS.
func ManifestOf(ctx context.Context, cas cache.BlobStore, r *repb.ActionResult) (Manifest, error) {
	m := Manifest{Outputs: map[string]Entry{}, ExitCode: int(r.GetExitCode())}
	for _, f := range r.GetOutputFiles() {
		d, err := cache.FromProto(f.GetDigest())
		if err != nil {
			return m, grpcerr.Wrap(err, "output %s", f.GetPath())
		}
		m.Outputs[f.GetPath()] = FileEntry(KindFile, d, f.GetIsExecutable())
	}
	//lint:ignore SA1019 results for REAPI 2.0 clients list symlinks in the deprecated fields
	for _, list := range [][]*repb.OutputSymlink{r.GetOutputSymlinks(), r.GetOutputFileSymlinks(), r.GetOutputDirectorySymlinks()} {
		for _, s := range list {
			m.Outputs[s.GetPath()] = Entry{Kind: KindSymlink, Target: s.GetTarget()}
		}
	}
	for _, od := range r.GetOutputDirectories() {
		if err := addTree(ctx, cas, od, m.Outputs); err != nil {
			return m, err
		}
	}
	var err error
	if m.Stdout, err = logEntry(KindStdout, r.GetStdoutDigest()); err != nil {
		return m, err
	}
	if m.Stderr, err = logEntry(KindStderr, r.GetStderrDigest()); err != nil {
		return m, err
	}
	return m, nil
}

func logEntry(kind string, p *repb.Digest) (Entry, error) {
	if p == nil || p.GetHash() == "" {
		return FileEntry(kind, cache.EmptyDigest, false), nil
	}
	d, err := cache.FromProto(p)
	if err != nil {
		return Entry{}, grpcerr.Wrap(err, "%s digest", kind)
	}
	return FileEntry(kind, d, false), nil
}

// addTree adds an output directory and everything in it.
func addTree(ctx context.Context, cas cache.BlobStore, od *repb.OutputDirectory, out map[string]Entry) error {
	td, err := cache.FromProto(od.GetTreeDigest())
	if err != nil {
		return grpcerr.Wrap(err, "output directory %s", od.GetPath())
	}
	tree := &repb.Tree{}
	if err := cache.ReadProto(ctx, cas, td, tree, cache.MaxTreeSize); err != nil {
		return grpcerr.Wrap(err, "output directory %s: tree %s", od.GetPath(), td)
	}
	root, dirs, err := cache.TreeDirectories(tree)
	if err != nil {
		return err
	}
	err = cache.WalkAll(ctx, root, dirs, cache.WalkOptions{MaxDepth: 512}, func(it cache.WalkItem, dir *repb.Directory) error {
		rel := path.Join(od.GetPath(), it.Path)
		out[rel] = Entry{Kind: KindDirectory}
		for _, f := range dir.GetFiles() {
			d, err := cache.FromProto(f.GetDigest())
			if err != nil {
				return grpcerr.Wrap(err, "output %s", path.Join(rel, f.GetName()))
			}
			out[path.Join(rel, f.GetName())] = FileEntry(KindFile, d, f.GetIsExecutable())
		}
		for _, s := range dir.GetSymlinks() {
			out[path.Join(rel, s.GetName())] = Entry{Kind: KindSymlink, Target: s.GetTarget()}
		}
		return nil
	})
	return grpcerr.Wrap(err, "output directory %s: tree %s", od.GetPath(), td)
}

// Count is the number of outputs (files, symlinks, directories) in m.
func (m Manifest) Count() int { return len(m.Outputs) }

// Difference is one output that is not the same in two runs (or in a recorded
// product and a rebuild).
type Difference struct {
	// Output is the path relative to the working directory, or "stdout", "stderr",
	// "exit code" for those kinds.
	Output string `json:"output"`
	Kind   string `json:"kind"`
	// Run is the index (1-based) of the first run whose output differed from the
	// baseline (run 1).
	Run      int    `json:"run"`
	Baseline *Entry `json:"baseline"` // nil: the baseline did not produce it
	Other    *Entry `json:"other"`    // nil: run Run did not produce it
	// FirstDifferentByte is the offset of the first byte that differs between the two
	// contents (the shorter size when one is a prefix of the other); -1 when the
	// contents are not two blobs (absent, symlink, directory, exit code) or unknown.
	FirstDifferentByte int64 `json:"first_different_byte"`
	// Causes are the variations that alone make this output differ, as narrowed
	// down by rerunning with one variation at a time (see CauseText).
	Causes     []string    `json:"causes"`
	Diffoscope *Diffoscope `json:"diffoscope,omitempty"`
}

// key identifies a difference's subject across runs.
func (d *Difference) key() string { return d.Kind + "\x00" + d.Output }

// Compare lists what differs between a baseline and another manifest, in a stable
// order: outputs by path, then stdout, stderr, exit code. FirstDifferentByte is -1
// until FillOffsets computes it.
func Compare(base, other Manifest) []Difference {
	var diffs []Difference
	paths := make([]string, 0, len(base.Outputs)+len(other.Outputs))
	for p := range base.Outputs {
		paths = append(paths, p)
	}
	for p := range other.Outputs {
		if _, ok := base.Outputs[p]; !ok {
			paths = append(paths, p)
		}
	}
	sort.Strings(paths)
	for _, p := range paths {
		b, inB := base.Outputs[p]
		o, inO := other.Outputs[p]
		if inB && inO && b.equal(o) {
			continue
		}
		d := Difference{Output: p, FirstDifferentByte: -1}
		if inB {
			d.Baseline, d.Kind = ptr(b), b.Kind
		}
		if inO {
			d.Other = ptr(o)
			if !inB {
				d.Kind = o.Kind
			}
		}
		diffs = append(diffs, d)
	}
	for _, l := range []struct {
		name string
		b, o Entry
	}{{"stdout", base.Stdout, other.Stdout}, {"stderr", base.Stderr, other.Stderr}} {
		if !l.b.equal(l.o) {
			diffs = append(diffs, Difference{Output: l.name, Kind: l.b.Kind, Baseline: ptr(l.b), Other: ptr(l.o), FirstDifferentByte: -1})
		}
	}
	if base.ExitCode != other.ExitCode {
		b, o := base.ExitCode, other.ExitCode
		diffs = append(diffs, Difference{Output: "exit code", Kind: KindExitCode, FirstDifferentByte: -1,
			Baseline: &Entry{Kind: KindExitCode, ExitCode: &b}, Other: &Entry{Kind: KindExitCode, ExitCode: &o}})
	}
	return diffs
}

func ptr(e Entry) *Entry { return &e }

// FillOffsets computes FirstDifferentByte of every difference between two blobs
// still in the CAS; blobs that are gone leave it at -1.
func FillOffsets(ctx context.Context, cas cache.BlobStore, diffs []Difference) error {
	for i := range diffs {
		d := &diffs[i]
		if d.Baseline == nil || d.Other == nil {
			continue
		}
		a, okA := d.Baseline.BlobDigest()
		b, okB := d.Other.BlobDigest()
		if !okA || !okB {
			continue
		}
		off, err := FirstDifference(ctx, cas, a, b)
		if status.Code(err) == codes.NotFound {
			continue
		}
		if err != nil {
			return grpcerr.Wrap(err, "compare %s", d.Output)
		}
		d.FirstDifferentByte = off
	}
	return nil
}

// FirstDifference returns the offset of the first byte where blobs a and b differ,
// the shorter size when one is a prefix of the other, and -1 when they are equal.
func FirstDifference(ctx context.Context, cas cache.BlobStore, a, b cache.Digest) (int64, error) {
	if a == b {
		return -1, nil
	}
	ra, err := cas.Get(ctx, a, 0)
	if err != nil {
		return -1, err
	}
	defer ra.Close()
	rb, err := cas.Get(ctx, b, 0)
	if err != nil {
		return -1, err
	}
	defer rb.Close()
	const chunk = 64 << 10
	bufA, bufB := make([]byte, chunk), make([]byte, chunk)
	var off int64
	for {
		na, errA := io.ReadFull(ra, bufA)
		nb, errB := io.ReadFull(rb, bufB)
		if errA != nil && errA != io.EOF && errA != io.ErrUnexpectedEOF {
			return -1, errA
		}
		if errB != nil && errB != io.EOF && errB != io.ErrUnexpectedEOF {
			return -1, errB
		}
		n := min(na, nb)
		if i := firstMismatch(bufA[:n], bufB[:n]); i >= 0 {
			return off + int64(i), nil
		}
		if na != nb {
			return off + int64(n), nil
		}
		if na < chunk { // both ended at the same length with the same bytes
			if a.Size != b.Size {
				return off + int64(n), nil
			}
			return -1, fmt.Errorf("blobs %s and %s have the same content", a, b)
		}
		off += int64(n)
		if err := ctx.Err(); err != nil {
			return -1, status.FromContextError(err).Err()
		}
	}
}

func firstMismatch(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return len(a)
}
