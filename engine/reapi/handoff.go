package reapi

import (
	"io"
	"sync"
)

// handoff is an in-memory pipe, like io.Pipe, that hands the writer's buffers over
// rather than copying them: Give offers a buffer and returns once the reader has taken
// it, and the reader calls the buffer's done when it is through with it (the writer
// must not touch the buffer after Give; done tells it the memory is free). Its reader
// also implements io.WriterTo, so a consumer that copies with WriteTo
// (cache.CopyVerified does) gets each message as it is, hashing and writing it with no
// copy into a buffer of its own and in one piece; and the writer receives its next
// message while the reader works on the last, one message ahead, not more.
type handoff struct {
	mu      sync.Mutex
	data    []byte        // what the current Give offers; nil: nothing
	done    func()        // the offered buffer's done, until the reader takes it
	more    chan struct{} // signalled when data is offered or the pipe closes
	took    chan struct{} // signalled when the reader has taken the data offered
	werr    error         // set by the writer's close: what the reader gets (io.EOF)
	rerr    error         // set by the reader's close: what writers get
	closed  chan struct{} // closed by the reader's close
	closing sync.Once
}

func newHandoff() *handoff {
	return &handoff{more: make(chan struct{}, 1), took: make(chan struct{}, 1), closed: make(chan struct{})}
}

// Give offers p to the reader and waits until it has taken it, or closed; done (if
// not nil) is called once the reader is through with p, or at once if it never takes
// it.
func (h *handoff) Give(p []byte, done func()) error {
	if done == nil {
		done = func() {}
	}
	if len(p) == 0 {
		done()
		return nil
	}
	h.mu.Lock()
	err := h.rerr
	if err == nil && h.werr != nil {
		err = io.ErrClosedPipe
	}
	if err != nil {
		h.mu.Unlock()
		done()
		return err
	}
	h.data, h.done = p, done
	h.mu.Unlock()
	h.signal(h.more)
	select {
	case <-h.took:
		return nil
	case <-h.closed:
		h.mu.Lock()
		left := h.done
		h.data, h.done = nil, nil
		err := h.rerr
		h.mu.Unlock()
		if left != nil {
			left() // never taken
		}
		return err
	}
}

// CloseWithError ends the writer's side: the reader gets err after what was written
// (io.EOF for nil).
func (h *handoff) CloseWithError(err error) {
	h.setErr(&h.werr, err, io.EOF)
	h.signal(h.more)
}

// setErr sets *p to err (or def for nil), unless a side's close set it already.
func (h *handoff) setErr(p *error, err, def error) {
	if err == nil {
		err = def
	}
	h.mu.Lock()
	if *p == nil {
		*p = err
	}
	h.mu.Unlock()
}

// Close ends the writer's side cleanly.
func (h *handoff) Close() error { h.CloseWithError(nil); return nil }

// CloseRead ends the reader's side: writers, waiting or to come, get err
// (io.ErrClosedPipe for nil).
func (h *handoff) CloseRead(err error) {
	h.setErr(&h.rerr, err, io.ErrClosedPipe)
	h.closing.Do(func() { close(h.closed) })
}

func (h *handoff) signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// next waits for data offered, or the writer's close (then nil and its error).
func (h *handoff) next() ([]byte, error) {
	for {
		h.mu.Lock()
		if h.data != nil {
			p := h.data
			h.mu.Unlock()
			return p, nil
		}
		err := h.werr
		if err == nil {
			err = h.rerr
		}
		h.mu.Unlock()
		if err != nil {
			return nil, err
		}
		select {
		case <-h.more:
		case <-h.closed:
		}
	}
}

// take takes the data offered as a whole: the writer goes on, and the reader calls the
// returned done when it is through with the data.
func (h *handoff) take() func() {
	h.mu.Lock()
	done := h.done
	h.data, h.done = nil, nil
	h.mu.Unlock()
	h.signal(h.took)
	return done
}

// Read copies what is offered into p; a buffer copied whole is taken and done.
func (h *handoff) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	data, err := h.next()
	if err != nil {
		return 0, err
	}
	n := copy(p, data)
	h.mu.Lock()
	h.data = h.data[n:]
	all := len(h.data) == 0
	h.mu.Unlock()
	if all {
		h.take()()
	}
	return n, nil
}

// WriteTo hands each message given to w as it is, until the writer's close; a clean
// close ends it with nil, as io.WriterTo asks.
func (h *handoff) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		data, err := h.next()
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
		done := h.take()
		n, err := w.Write(data)
		done()
		total += int64(n)
		if err == nil && n < len(data) {
			err = io.ErrShortWrite
		}
		if err != nil {
			return total, err
		}
	}
}
