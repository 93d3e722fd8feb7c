package verify

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/kilnbuild/kiln/cache"
)

// Diffoscope locates diffoscope's reports on one difference, relative to the
// report directory.
type Diffoscope struct {
	Text  string `json:"text,omitempty"`
	HTML  string `json:"html,omitempty"`
	Error string `json:"error,omitempty"`

	excerpt string // the text report's first lines, for WriteText
}

// DiffoscopeStatus values of Report.Diffoscope besides "ran".
const (
	DiffoscopeRan          = "ran"
	DiffoscopeNotInstalled = "not installed (no diffoscope on PATH; apt-get install diffoscope-minimal, or diffoscope for every format)"
	DiffoscopeDisabled     = "disabled"
)

// LookDiffoscope returns diffoscope's path on PATH, or "" when it is not installed.
func LookDiffoscope() string {
	p, err := exec.LookPath("diffoscope")
	if err != nil {
		return ""
	}
	return p
}

// ArtifactOptions says what WriteArtifacts writes.
type ArtifactOptions struct {
	// Dir receives everything; it must be absent or empty.
	Dir string
	// KeepAll keeps every run's outputs, not only the versions that differ.
	KeepAll bool
	// Diffoscope is the diffoscope binary to run on each differing pair of blobs;
	// "" means it is not installed, DiffoscopeDisabled that the user turned it off.
	Diffoscope string
	// DiffoscopeTimeout bounds each diffoscope run (default 5 minutes).
	DiffoscopeTimeout time.Duration
	// ExcerptLines of each text report are shown by WriteText (default 40).
	ExcerptLines int
}

// WriteArtifacts writes under opts.Dir: run-N/out/PATH, run-N/stdout and
// run-N/stderr for the baseline and every run named by a difference (every run
// with KeepAll); diffoscope/out/PATH.{txt,html} (diffoscope/stdout.*, ...) for each
// difference between two blobs when diffoscope is available; and report.json and
// report.txt. It records all of it in r.
func WriteArtifacts(ctx context.Context, cas cache.BlobStore, r *Report, opts ArtifactOptions) error {
	if opts.DiffoscopeTimeout == 0 {
		opts.DiffoscopeTimeout = 5 * time.Minute
	}
	if opts.ExcerptLines == 0 {
		opts.ExcerptLines = 40
	}
	if err := emptyDir(opts.Dir); err != nil {
		return err
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return err
	}
	r.ReportDir = dir
	keep := map[int]bool{}
	if len(r.Runs) > 0 {
		keep[1] = true
	}
	for _, d := range r.Differences {
		keep[d.Run] = true
	}
	for i := range r.Runs {
		idx := r.Runs[i].Index
		if !opts.KeepAll && !keep[idx] {
			continue
		}
		rel := "run-" + strconv.Itoa(idx)
		if err := writeManifest(ctx, cas, r.manifests[i], filepath.Join(dir, rel), opts.KeepAll, r.Differences); err != nil {
			return fmt.Errorf("keep the outputs of run %d: %w", idx, err)
		}
		if opts.KeepAll {
			r.Runs[i].OutputDir = rel
		}
	}
	if len(r.Differences) > 0 {
		switch opts.Diffoscope {
		case "":
			r.Diffoscope = DiffoscopeNotInstalled
		case DiffoscopeDisabled:
			r.Diffoscope = DiffoscopeDisabled
		default:
			r.Diffoscope = DiffoscopeRan
			for i := range r.Differences {
				if err := runDiffoscope(ctx, dir, &r.Differences[i], opts); err != nil {
					return err
				}
			}
		}
	}
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := writeFileAtomic(filepath.Join(dir, "report.json"), bytes.NewReader(append(js, '\n')), 0o644); err != nil {
		return err
	}
	var txt bytes.Buffer
	WriteText(&txt, r)
	return writeFileAtomic(filepath.Join(dir, "report.txt"), &txt, 0o644)
}

// emptyDir creates dir, or accepts it when it exists and is empty: nothing a user
// already has there is overwritten.
func emptyDir(dir string) error {
	if dir == "" {
		return errors.New("no report directory given")
	}
	ents, err := os.ReadDir(dir)
	if os.IsNotExist(err) {
		return os.MkdirAll(dir, 0o755)
	}
	if err != nil {
		return err
	}
	if len(ents) > 0 {
		return fmt.Errorf("%s is not empty: give a new or empty directory", dir)
	}
	return nil
}

// blobRel is where a difference's blob is kept inside run-N.
func blobRel(d Difference) string {
	switch d.Kind {
	case KindStdout, KindStderr:
		return d.Kind
	}
	return filepath.Join("out", filepath.FromSlash(d.Output))
}

// writeManifest writes a run's outputs under dir: all of them, or only those that
// differ somewhere.
func writeManifest(ctx context.Context, cas cache.BlobStore, m Manifest, dir string, all bool, diffs []Difference) error {
	want := map[string]bool{}
	for _, d := range diffs {
		want[d.Output] = true
	}
	var paths []string
	for p := range m.Outputs {
		if all || want[p] {
			paths = append(paths, p)
		}
	}
	sort.Strings(paths) // a directory before what it holds
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	var links []string
	for _, p := range paths {
		if !filepath.IsLocal(filepath.FromSlash(p)) {
			return fmt.Errorf("output path %q is not a local path", p)
		}
		dst := filepath.Join(dir, "out", filepath.FromSlash(p))
		e := m.Outputs[p]
		switch e.Kind {
		case KindDirectory:
			if err := os.MkdirAll(dst, 0o755); err != nil {
				return err
			}
		case KindSymlink:
			links = append(links, p) // last: nothing is written through them
		case KindFile:
			if err := writeBlob(ctx, cas, e, dst); err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
		}
	}
	for _, p := range links {
		dst := filepath.Join(dir, "out", filepath.FromSlash(p))
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		if err := os.Symlink(m.Outputs[p].Target, dst); err != nil {
			return err
		}
	}
	for _, l := range []struct {
		name string
		e    Entry
	}{{KindStdout, m.Stdout}, {KindStderr, m.Stderr}} {
		if all || want[l.name] {
			if err := writeBlob(ctx, cas, l.e, filepath.Join(dir, l.name)); err != nil {
				return fmt.Errorf("%s: %w", l.name, err)
			}
		}
	}
	return nil
}

// writeBlob writes the blob of a file entry to dst.
func writeBlob(ctx context.Context, cas cache.BlobStore, e Entry, dst string) error {
	d, ok := e.BlobDigest()
	if !ok {
		return fmt.Errorf("no digest")
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	rc, err := cas.Get(ctx, d, 0)
	if err != nil {
		return err
	}
	defer rc.Close()
	mode := os.FileMode(0o644)
	if e.Executable {
		mode = 0o755
	}
	return writeFileAtomic(dst, rc, mode)
}

func writeFileAtomic(dst string, r io.Reader, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(dst), ".kiln-tmp-*")
	if err != nil {
		return err
	}
	_, err = io.Copy(f, r)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(f.Name(), mode)
	}
	if err == nil {
		err = os.Rename(f.Name(), dst)
	}
	if err != nil {
		os.Remove(f.Name())
	}
	return err
}

// runDiffoscope compares the two kept versions of one difference. diffoscope's own
// failures are recorded in the difference, not returned: the verdict stands.
func runDiffoscope(ctx context.Context, dir string, d *Difference, opts ArtifactOptions) error {
	if d.Baseline == nil || d.Other == nil {
		return nil
	}
	if _, ok := d.Baseline.BlobDigest(); !ok {
		return nil
	}
	if _, ok := d.Other.BlobDigest(); !ok {
		return nil
	}
	a := filepath.Join("run-1", blobRel(*d))
	b := filepath.Join("run-"+strconv.Itoa(d.Run), blobRel(*d))
	name := filepath.Join("diffoscope", blobRel(*d))
	if err := os.MkdirAll(filepath.Join(dir, filepath.Dir(name)), 0o755); err != nil {
		return err
	}
	ds := &Diffoscope{Text: name + ".txt", HTML: name + ".html"}
	d.Diffoscope = ds
	cctx, cancel := context.WithTimeout(ctx, opts.DiffoscopeTimeout)
	defer cancel()
	cmd := exec.CommandContext(cctx, opts.Diffoscope, "--no-progress", "--text-color", "never",
		"--text", ds.Text, "--html", ds.HTML, a, b)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil: // "no differences": diffoscope saw none (e.g. only metadata)
	case errors.As(err, &ee) && ee.ExitCode() == 1: // differences found
	case ctx.Err() != nil:
		return ctx.Err()
	default:
		ds.Error = strings.TrimSpace(fmt.Sprintf("%v: %s", err, lastLine(stderr.String())))
	}
	for _, p := range []*string{&ds.Text, &ds.HTML} {
		if _, err := os.Stat(filepath.Join(dir, *p)); err != nil {
			*p = ""
		}
	}
	if ds.Text != "" {
		ds.excerpt = headLines(filepath.Join(dir, ds.Text), opts.ExcerptLines)
	}
	return nil
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// headLines returns the first n lines of a file, with a marker when there are more.
func headLines(p string, n int) string {
	f, err := os.Open(p)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var b strings.Builder
	for i := 0; sc.Scan(); i++ {
		if i == n {
			b.WriteString("... (the rest is in the text report)\n")
			break
		}
		line := sc.Text()
		if len(line) > 200 {
			line = line[:200] + "..."
		}
		b.WriteString(line + "\n")
	}
	return b.String()
}
