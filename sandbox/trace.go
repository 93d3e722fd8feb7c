package sandbox

import (
	"fmt"
	"os"
	"strings"
	"sync"
	"time"
)

// trace records phase durations when KILN_SANDBOX_TRACE is set (a development aid for
// the benchmark's breakdown).
type trace struct {
	on    bool
	last  time.Time
	parts []string
}

var traceOn = os.Getenv("KILN_SANDBOX_TRACE") != ""

var traceMu sync.Mutex
var traceSums = map[string]time.Duration{}
var traceN int

func newTrace() *trace { return &trace{on: traceOn, last: time.Now()} }

func (t *trace) mark(name string) {
	if !t.on {
		return
	}
	now := time.Now()
	traceMu.Lock()
	traceSums[name] += now.Sub(t.last)
	traceMu.Unlock()
	t.parts = append(t.parts, fmt.Sprintf("%s=%.2fms", name, float64(now.Sub(t.last).Microseconds())/1000))
	t.last = now
}

func (t *trace) done() {
	if !t.on {
		return
	}
	traceMu.Lock()
	traceN++
	traceMu.Unlock()
	fmt.Fprintln(os.Stderr, "sandbox trace:", strings.Join(t.parts, " "))
}
