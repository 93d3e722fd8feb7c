package toolchains

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	clog "github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// entry is one tar entry of a hand-made layer.
type entry struct {
	name     string
	typ      byte
	mode     int64
	body     string
	link     string
	uid, gid int
	pax      map[string]string
}

func dir(name string, mode int64) entry { return entry{name: name, typ: tar.TypeDir, mode: mode} }
func file(name, body string, mode int64) entry {
	return entry{name: name, typ: tar.TypeReg, mode: mode, body: body}
}
func symlink(name, target string) entry {
	return entry{name: name, typ: tar.TypeSymlink, mode: 0o777, link: target}
}
func hardlink(name, target string) entry {
	return entry{name: name, typ: tar.TypeLink, mode: 0o644, link: target}
}

// tarBytes makes an uncompressed tar of entries.
func tarBytes(t testing.TB, ents []entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: e.mode, Linkname: e.link, Uid: e.uid, Gid: e.gid,
			ModTime: time.Unix(1700000000, 0), PAXRecords: e.pax}
		if e.typ == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		if e.typ == tar.TypeChar {
			h.Devmajor, h.Devminor = 1, 3
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if e.typ == tar.TypeReg {
			if _, err := io.WriteString(tw, e.body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func gzipBytes(t testing.TB, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// layer is a hand-made layer: its uncompressed tar and whether to gzip it.
type layer struct {
	tar  []byte
	gzip bool
}

// testImage is a hand-made OCI image in memory.
type testImage struct {
	blobs    map[digest.Digest][]byte
	manifest ocispec.Descriptor
	config   ocispec.Descriptor
	layers   []ocispec.Descriptor
	diffIDs  []digest.Digest
}

func jsonBlob(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// makeImage builds an OCI image (manifest, config, layers) from layers.
func makeImage(t testing.TB, layers ...layer) *testImage {
	t.Helper()
	im := &testImage{blobs: map[digest.Digest][]byte{}}
	for _, l := range layers {
		b, mt := l.tar, ocispec.MediaTypeImageLayer
		if l.gzip {
			b, mt = gzipBytes(t, l.tar), ocispec.MediaTypeImageLayerGzip
		}
		d := digest.FromBytes(b)
		im.blobs[d] = b
		im.layers = append(im.layers, ocispec.Descriptor{MediaType: mt, Digest: d, Size: int64(len(b))})
		im.diffIDs = append(im.diffIDs, digest.FromBytes(l.tar))
	}
	cfg := jsonBlob(t, ocispec.Image{
		Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: im.diffIDs},
	})
	im.config = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(cfg), Size: int64(len(cfg))}
	im.blobs[im.config.Digest] = cfg
	mf := jsonBlob(t, ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    im.config,
		Layers:    im.layers,
	})
	im.manifest = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(mf), Size: int64(len(mf))}
	im.blobs[im.manifest.Digest] = mf
	return im
}

// writeLayout writes im as an OCI layout directory; index entries get name if set.
func (im *testImage) writeLayout(t testing.TB, dir, name string) {
	t.Helper()
	must(t, os.MkdirAll(filepath.Join(dir, "blobs", "sha256"), 0o755))
	for d, b := range im.blobs {
		must(t, os.WriteFile(filepath.Join(dir, "blobs", "sha256", d.Encoded()), b, 0o644))
	}
	md := im.manifest
	if name != "" {
		md.Annotations = map[string]string{ocispec.AnnotationRefName: name}
	}
	idx := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{md}}
	must(t, os.WriteFile(filepath.Join(dir, "index.json"), jsonBlob(t, idx), 0o644))
	must(t, os.WriteFile(filepath.Join(dir, "oci-layout"), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644))
}

// tarDir writes a tar of the files under dir (an OCI archive when dir is a layout).
func tarDir(t testing.TB, dir, out string) {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	var paths []string
	must(t, filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != dir {
			paths = append(paths, p)
		}
		return nil
	}))
	sort.Strings(paths)
	for _, p := range paths {
		rel, _ := filepath.Rel(dir, p)
		fi, err := os.Lstat(p)
		must(t, err)
		h, err := tar.FileInfoHeader(fi, "")
		must(t, err)
		h.Name = filepath.ToSlash(rel)
		if fi.IsDir() {
			h.Name += "/"
		}
		must(t, tw.WriteHeader(h))
		if fi.Mode().IsRegular() {
			b, err := os.ReadFile(p)
			must(t, err)
			_, err = tw.Write(b)
			must(t, err)
		}
	}
	must(t, tw.Close())
	must(t, os.WriteFile(out, buf.Bytes(), 0o644))
}

// writeDockerSave writes a legacy `docker save` tar (manifest.json, config, layer.tar
// per layer; uncompressed layers) with the given layers and repo tag.
func writeDockerSave(t testing.TB, out, repoTag string, layers ...[]byte) digest.Digest {
	t.Helper()
	var diffIDs []digest.Digest
	files := map[string][]byte{}
	var layerNames []string
	for _, l := range layers {
		d := digest.FromBytes(l)
		diffIDs = append(diffIDs, d)
		n := d.Encoded() + "/layer.tar"
		files[n] = l
		layerNames = append(layerNames, n)
	}
	cfg := jsonBlob(t, ocispec.Image{
		Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: diffIDs},
	})
	cfgName := digest.FromBytes(cfg).Encoded() + ".json"
	files[cfgName] = cfg
	files["manifest.json"] = jsonBlob(t, []map[string]any{{"Config": cfgName, "RepoTags": []string{repoTag}, "Layers": layerNames}})
	var names []string
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, n := range names {
		if dir, _, ok := strings.Cut(n, "/"); ok {
			must(t, tw.WriteHeader(&tar.Header{Name: dir + "/", Typeflag: tar.TypeDir, Mode: 0o755}))
		}
		must(t, tw.WriteHeader(&tar.Header{Name: n, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(files[n]))}))
		_, err := tw.Write(files[n])
		must(t, err)
	}
	must(t, tw.Close())
	must(t, os.WriteFile(out, buf.Bytes(), 0o644))
	return digest.FromBytes(cfg)
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func openStore(t testing.TB, data string, opts Options) *Store {
	t.Helper()
	s, err := Open(context.Background(), data, opts)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// leftovers lists every file under the store that would mean an import left
// something behind: records, blobs, ingests, roots, staging.
func leftovers(t testing.TB, s *Store) []string {
	t.Helper()
	var out []string
	for _, sub := range []string{"images", "indexes", "names", "roots", "tmp", "content/blobs", "content/ingest"} {
		root := filepath.Join(s.dir, sub)
		_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil || p == root || d.IsDir() {
				return nil
			}
			out = append(out, strings.TrimPrefix(p, s.dir+"/"))
			return nil
		})
		// Empty directories in roots/ and tmp/ count too.
		if sub == "roots" || sub == "tmp" || sub == "content/ingest" {
			ents, _ := os.ReadDir(root)
			for _, e := range ents {
				if e.IsDir() {
					out = append(out, sub+"/"+e.Name()+"/")
				}
			}
		}
	}
	return out
}

func TestMain(m *testing.M) {
	// containerd's global logger warns on every store open where fs-verity is missing.
	_ = clog.SetLevel("error")
	os.Exit(m.Run())
}

func timeUnix(sec int64) time.Time { return time.Unix(sec, 0) }
