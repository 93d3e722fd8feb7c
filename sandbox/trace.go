package sandbox

import (
	"fmt"
	"os"
	"strings"
	"sync"
	"time"
)

// trace records how long each phase of a Run takes when KILN_SANDBOX_TRACE names a
// file: one line per Run is appended to it. A development aid for the benchmark's
// breakdown (scripts/bench-sandbox.sh); off, it costs a time.Now per phase.
type trace struct {
	last  time.Time
	parts []string
}

var (
	traceOnce sync.Once
	traceMu   sync.Mutex
	traceFile *os.File
)

func newTrace() *trace {
	traceOnce.Do(func() {
		if p := os.Getenv("KILN_SANDBOX_TRACE"); p != "" {
			traceFile, _ = os.OpenFile(p, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		}
	})
	if traceFile == nil {
		return nil
	}
	return &trace{last: time.Now()}
}

func (t *trace) mark(name string) {
	if t == nil {
		return
	}
	now := time.Now()
	t.parts = append(t.parts, fmt.Sprintf("%s=%.2fms", name, float64(now.Sub(t.last).Microseconds())/1000))
	t.last = now
}

func (t *trace) done() {
	if t == nil {
		return
	}
	traceMu.Lock()
	defer traceMu.Unlock()
	fmt.Fprintln(traceFile, "sandbox trace:", strings.Join(t.parts, " "))
}
