package reapi

import (
	"encoding/binary"
	"io"

	"github.com/kilnbuild/kiln/cache"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// zstd frame layout (RFC 8878): what windowGuard needs to find each frame's window.
const (
	zstdMagic         = 0xFD2FB528
	zstdSkippableMask = 0xFFFFFFF0
	zstdSkippable     = 0x184D2A50
	zstdMinWindow     = 1 << 10
	zstdMaxBlock      = 128 << 10
	// zstdDecoderFixed is what a streaming decoder (one goroutine, low-memory mode)
	// holds besides its window: block, literal and sequence buffers.
	zstdDecoderFixed = 1 << 20
)

// zstdWindowCost is the memory a streaming decoder allocates for a frame with window
// w, besides zstdDecoderFixed: its history ring, the window plus two blocks of room.
func zstdWindowCost(w int64) int64 { return w + 2*min(w, zstdMaxBlock) }

// windowGuard passes a zstd stream to the decoder and reads each frame's header on the
// way, so that the frame's window is charged (and refused beyond maxWindow, or when the
// budget has no room) before the decoder sees the header and allocates it. Bytes it
// cannot make sense of go through unchanged: the decoder refuses them.
type windowGuard struct {
	r         io.Reader
	d         cache.Digest
	maxWindow int64
	// charge is called with the largest decoder footprint seen so far, each time it grows.
	charge func(cost int64) error

	state   int
	hdr     [18]byte // the field being collected; hdr[17] keeps the frame header descriptor
	have    int
	want    int
	skip    int64 // bytes of a block, skippable frame or checksum still to pass
	after   int   // what follows the skipped bytes
	crc     bool  // the frame ends with a 4-byte checksum
	charged int64
	err     error
}

const (
	gMagic      = iota // collecting a frame's 4-byte magic number
	gSkipSize          // collecting a skippable frame's 4-byte size
	gDescriptor        // the frame header descriptor byte
	gHeader            // collecting the rest of a frame header
	gBlock             // collecting a 3-byte block header
	gSkip              // passing skip bytes, then going on with after
	gDone              // not a stream we understand: the decoder will refuse it
)

// What follows skipped bytes.
const (
	nextBlock    = iota // another block of the frame
	nextFrameEnd        // the frame's checksum, if any, then the next frame
	nextFrame           // the next frame
)

func newWindowGuard(r io.Reader, d cache.Digest, maxWindow int64, charge func(int64) error) *windowGuard {
	return &windowGuard{r: r, d: d, maxWindow: maxWindow, charge: charge, want: 4}
}

func (g *windowGuard) Read(p []byte) (int, error) {
	if g.err != nil {
		return 0, g.err
	}
	n, err := g.r.Read(p)
	if perr := g.scan(p[:n]); perr != nil {
		g.err = perr
		return 0, perr
	}
	return n, err
}

// scan advances the parser over b.
func (g *windowGuard) scan(b []byte) error {
	for len(b) > 0 && g.state != gDone {
		if g.state == gSkip {
			k := min(int64(len(b)), g.skip)
			g.skip -= k
			b = b[k:]
			if g.skip == 0 {
				g.afterSkip()
			}
			continue
		}
		k := copy(g.hdr[g.have:g.want], b)
		g.have += k
		b = b[k:]
		if g.have < g.want {
			return nil
		}
		if err := g.field(); err != nil {
			return err
		}
	}
	return nil
}

func (g *windowGuard) expect(state, n int) { g.state, g.have, g.want = state, 0, n }

// skipBytes passes n bytes, then goes on with after.
func (g *windowGuard) skipBytes(n int64, after int) {
	g.state, g.skip, g.after = gSkip, n, after
	if n == 0 {
		g.afterSkip()
	}
}

func (g *windowGuard) afterSkip() {
	switch g.after {
	case nextBlock:
		g.expect(gBlock, 3)
	case nextFrameEnd:
		if g.crc {
			g.crc = false
			g.skipBytes(4, nextFrame)
			return
		}
		g.expect(gMagic, 4)
	default:
		g.expect(gMagic, 4)
	}
}

// field acts on a complete field in g.hdr[:g.want].
func (g *windowGuard) field() error {
	switch g.state {
	case gMagic:
		m := binary.LittleEndian.Uint32(g.hdr[:4])
		switch {
		case m == zstdMagic:
			g.expect(gDescriptor, 1)
		case m&zstdSkippableMask == zstdSkippable:
			g.expect(gSkipSize, 4)
		default:
			g.state = gDone
		}
	case gSkipSize:
		g.skipBytes(int64(binary.LittleEndian.Uint32(g.hdr[:4])), nextFrame)
	case gDescriptor:
		fhd := g.hdr[0]
		g.hdr[17] = fhd
		g.crc = fhd&0x04 != 0
		n := []int{0, 1, 2, 4}[fhd&3] + []int{0, 2, 4, 8}[fhd>>6] // dictionary id, content size
		if fhd&0x20 == 0 {
			n++ // window descriptor
		} else if fhd>>6 == 0 {
			n++ // a single-segment frame's 1-byte content size
		}
		g.expect(gHeader, n)
	case gHeader:
		return g.header()
	case gBlock:
		h := uint32(g.hdr[0]) | uint32(g.hdr[1])<<8 | uint32(g.hdr[2])<<16
		after := nextBlock
		if h&1 != 0 {
			after = nextFrameEnd
		}
		switch (h >> 1) & 3 {
		case 0, 2: // raw, compressed: the block's bytes follow
			g.skipBytes(int64(h>>3), after)
		case 1: // RLE: one byte
			g.skipBytes(1, after)
		default:
			g.state = gDone
		}
	}
	return nil
}

// header computes the window of the frame whose header is complete and charges it.
func (g *windowGuard) header() error {
	fhd := g.hdr[17]
	single := fhd&0x20 != 0
	rest := g.hdr[:g.want]
	var window int64
	if !single {
		wd := rest[0]
		exp := uint(wd >> 3)
		base := int64(1) << (10 + exp)
		window = base + base/8*int64(wd&7)
		rest = rest[1:]
	}
	rest = rest[[]int{0, 1, 2, 4}[fhd&3]:]
	if single {
		var fcs uint64
		switch len(rest) {
		case 1:
			fcs = uint64(rest[0])
		case 2:
			fcs = uint64(binary.LittleEndian.Uint16(rest)) + 256
		case 4:
			fcs = uint64(binary.LittleEndian.Uint32(rest))
		case 8:
			fcs = binary.LittleEndian.Uint64(rest)
		}
		window = int64(min(max(fcs, zstdMinWindow), 1<<62))
	}
	if window > g.maxWindow {
		return status.Errorf(codes.InvalidArgument, "blob %s: zstd frame needs a %d-byte window, more than the %d bytes kiln accepts", g.d, window, g.maxWindow)
	}
	if cost := zstdWindowCost(window); cost > g.charged {
		if err := g.charge(cost); err != nil {
			return err
		}
		g.charged = cost
	}
	g.expect(gBlock, 3)
	return nil
}
