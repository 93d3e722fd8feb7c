package reapi

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

// recorder keeps the buffers written to it, as they are.
type recorder struct{ got [][]byte }

func (r *recorder) Write(p []byte) (int, error) { r.got = append(r.got, p); return len(p), nil }

// TestHandoffWriteTo: WriteTo hands the given buffers over as they are (no copy), each
// buffer's done comes after the reader is through with it, and a clean close ends it.
func TestHandoffWriteTo(t *testing.T) {
	h := newHandoff()
	bufs := [][]byte{[]byte("hello "), []byte("world")}
	dones := make(chan int, len(bufs))
	go func() {
		for i, b := range bufs {
			if err := h.Give(b, func() { dones <- i }); err != nil {
				t.Error(err)
			}
		}
		h.Close()
	}()
	var rec recorder
	n, err := h.WriteTo(&rec)
	if err != nil || n != 11 || len(rec.got) != 2 {
		t.Fatalf("WriteTo: %d bytes in %d writes, %v", n, len(rec.got), err)
	}
	for i := range bufs {
		if &rec.got[i][0] != &bufs[i][0] {
			t.Errorf("buffer %d was copied", i)
		}
		if d := <-dones; d != i {
			t.Errorf("done of buffer %d, want %d", d, i)
		}
	}
}

// TestHandoffRead: Read copies in pieces; a writer's error reaches the reader after
// the bytes given; a reader's close fails the writer's Give and calls its done.
func TestHandoffRead(t *testing.T) {
	h := newHandoff()
	bad := errors.New("broken stream")
	go func() {
		h.Give([]byte("abcdef"), nil)
		h.CloseWithError(bad)
	}()
	var out bytes.Buffer
	buf := make([]byte, 4)
	for {
		n, err := h.Read(buf)
		out.Write(buf[:n])
		if err != nil {
			if err != bad {
				t.Fatalf("read ended with %v, want the writer's error", err)
			}
			break
		}
	}
	if out.String() != "abcdef" {
		t.Fatalf("read %q", out.String())
	}

	h = newHandoff()
	refused := errors.New("no room")
	result := make(chan error)
	done := make(chan struct{})
	go func() { result <- h.Give([]byte("x"), func() { close(done) }) }()
	h.CloseRead(refused)
	if err := <-result; err != refused {
		t.Fatalf("Give to a closed reader: %v, want the reader's error", err)
	}
	<-done // a buffer never taken is done at once
	if err := h.Give([]byte("y"), nil); err != refused {
		t.Fatalf("Give after the reader's close: %v", err)
	}
	if _, err := io.Copy(io.Discard, newClosedHandoff()); err != nil {
		t.Fatalf("copying a cleanly closed handoff: %v", err)
	}
}

func newClosedHandoff() *handoff { h := newHandoff(); h.Close(); return h }
