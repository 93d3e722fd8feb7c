// Package logtest is a log sink that tests read back: a Buffer safe for the concurrent
// writes of a logger.
package logtest

import (
	"bytes"
	"sync"
)

// Buffer collects what is written to it, from any number of goroutines.
type Buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

// Write implements io.Writer.
func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String returns everything written so far.
func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
