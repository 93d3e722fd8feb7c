package reapi

import (
	"bytes"
	"log/slog"
	"strconv"
	"strings"
	"testing"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/limits"
	"github.com/klauspost/compress/zstd"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// FuzzParseResource: whatever the name, the parsers either refuse it with
// INVALID_ARGUMENT or return a resource whose every part is sound: an instance name
// the other services accept, a well-formed digest whose size is written the one
// canonical way, no NUL, empty, '.' or '..' segment anywhere; and the canonical name
// of what was parsed parses to the same resource. Corpus: testdata/fuzz/FuzzParseResource.
func FuzzParseResource(f *testing.F) {
	h := strings.Repeat("a1", 32)
	for _, s := range []string{
		"blobs/" + h + "/5", "a/b/blobs/" + h + "/0", "compressed-blobs/zstd/" + h + "/7",
		"blobs/sha256/" + h + "/1", "uploads/u/blobs/" + h + "/3/meta/data",
		"i/uploads/u/compressed-blobs/zstd/sha256/" + h + "/9", "blobs/" + h + "/+5", "blobs/" + h + "/05",
		"uploads/u/blobs/" + h + "/3/../../x", "in\x00st/blobs/" + h + "/1", "/blobs/" + h + "/1", "uploads/../blobs/" + h + "/1",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		for _, upload := range []bool{false, true} {
			parse := parseReadResource
			if upload {
				parse = parseWriteResource
			}
			r, err := parse(name)
			if err != nil {
				if status.Code(err) != codes.InvalidArgument {
					t.Fatalf("%q: refused with %v, want INVALID_ARGUMENT", name, err)
				}
				continue
			}
			if strings.ContainsRune(name, 0) {
				t.Fatalf("%q: accepted a NUL", name)
			}
			for _, seg := range strings.Split(name, "/") {
				if seg == "" || seg == "." || seg == ".." {
					t.Fatalf("%q: accepted an empty, '.' or '..' segment", name)
				}
			}
			if err := CheckInstance(r.instance); err != nil {
				t.Fatalf("%q: instance %q that the other services refuse: %v", name, r.instance, err)
			}
			if _, err := cache.NewDigest(r.digest.Hash, r.digest.Size); err != nil {
				t.Fatalf("%q: bad digest %v", name, r.digest)
			}
			if !strings.Contains(name+"/", "/"+strconv.FormatInt(r.digest.Size, 10)+"/") {
				t.Fatalf("%q: size %d not written canonically", name, r.digest.Size)
			}
			canon := ""
			if r.instance != "" {
				canon = r.instance + "/"
			}
			if upload {
				canon += "uploads/" + r.uuid + "/"
			}
			if r.compressor != "" {
				canon += "compressed-blobs/" + r.compressor + "/"
			} else {
				canon += "blobs/"
			}
			canon += r.digest.String()
			again, err := parse(canon)
			if err != nil || again != r {
				t.Fatalf("%q parsed to %+v, whose canonical name %q parses to %+v, %v", name, r, canon, again, err)
			}
		}
	})
}

// FuzzZstdUpload drives the compressed upload path (the byteStream's Put behind its
// window guard and decoder, under a memory budget) with arbitrary bytes cut into
// arbitrary chunks: it never panics, refuses only with INVALID_ARGUMENT or
// RESOURCE_EXHAUSTED, stores a blob only when the bytes decompress to exactly it,
// accepts every stream a reference decoder accepts within the same window bound, and
// gives back all its memory and its slot. Corpus: testdata/fuzz/FuzzZstdUpload.
func FuzzZstdUpload(f *testing.F) {
	enc, _ := zstd.NewWriter(nil, zstd.WithEncoderCRC(true))
	plain := bytes.Repeat([]byte("kiln "), 2000)
	f.Add(enc.EncodeAll(plain, nil), uint16(0))
	f.Add(enc.EncodeAll(plain, nil), uint16(3))
	f.Add(append(enc.EncodeAll(plain[:10], nil), enc.EncodeAll(plain, nil)...), uint16(100))
	f.Add(append([]byte{0x50, 0x2a, 0x4d, 0x18, 2, 0, 0, 0, 'h', 'i'}, enc.EncodeAll(nil, nil)...), uint16(1))
	f.Add(windowBomb(4), uint16(5))
	f.Add([]byte{0x28, 0xb5, 0x2f, 0xfd, 0x20, 0x05, 0x29, 0x00, 0x00, 'h', 'e', 'l', 'l', 'o'}, uint16(2))
	f.Add([]byte("garbage garbage"), uint16(0))
	const maxWindow = 1 << 20
	f.Fuzz(func(t *testing.T, comp []byte, chunk uint16) {
		if len(comp) > 1<<20 {
			return
		}
		ref, refErr := refDecode(comp, maxWindow)
		d := cache.DigestOf(ref)
		if refErr != nil {
			d = cache.DigestOf(comp) // some digest the bytes cannot decompress to
		}
		mem := limits.NewBudget(64<<20, 0)
		store := cache.NewMemoryStore()
		b := newByteStream(store, slog.New(slog.DiscardHandler), mem, 1, 1)
		defer b.close()
		b.maxWindow = maxWindow
		u, err := b.begin("fuzz", "uploads/f/compressed-blobs/zstd/"+d.String(), resource{uuid: "f", compressor: "zstd", digest: d})
		if err != nil {
			t.Fatal(err)
		}
		n := int(chunk)%4096 + 1
		for rest := comp; len(rest) > 0; {
			k := min(n, len(rest))
			if err := u.pipe.Give(rest[:k], nil); err != nil {
				break
			}
			rest = rest[k:]
		}
		u.pipe.Close()
		<-u.done
		err = u.err
		if c := status.Code(err); c != codes.OK && c != codes.InvalidArgument && c != codes.ResourceExhausted {
			t.Fatalf("refused with %v, want INVALID_ARGUMENT or RESOURCE_EXHAUSTED", err)
		}
		if used, slots := mem.Used(""), b.slots.InUse(""); used != 0 || slots != 0 {
			t.Fatalf("%d bytes and %d slots still held after the upload ended", used, slots)
		}
		if err == nil {
			got, gerr := cache.ReadAll(t.Context(), store, d, 0)
			if refErr != nil || gerr != nil || !bytes.Equal(got, ref) {
				t.Fatalf("stored %s, but the reference decoder says %v", d, refErr)
			}
		} else if refErr == nil {
			t.Fatalf("refused a stream the reference decoder takes (%d bytes): %v", len(ref), err)
		}
	})
}

// refDecode decompresses b in one go, as a second opinion on the streaming decoder.
func refDecode(b []byte, maxWindow uint64) ([]byte, error) {
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(maxWindow), zstd.WithDecoderMaxMemory(4<<20))
	if err != nil {
		return nil, err
	}
	defer dec.Close()
	return dec.DecodeAll(b, nil)
}
