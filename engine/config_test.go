package engine

import (
	"runtime"
	"testing"
)

// TestExecutionResolved: the zero ExecutionConfig (kiln exec, verify) runs on every CPU
// with nothing prepared; Prestart -1 (kiln serve's default) prepares a sandbox for each
// action that may run at once, whatever Concurrency resolves to.
func TestExecutionResolved(t *testing.T) {
	n := runtime.NumCPU()
	if got := (ExecutionConfig{}).Resolved(); got != (ExecutionConfig{Concurrency: n, MaxQueue: DefaultMaxQueue, DefaultTimeout: DefaultTimeout, MaxTimeout: DefaultMaxTimeout}) {
		t.Errorf("zero config resolved to %+v", got)
	}
	if got := (ExecutionConfig{Prestart: -1}).Resolved(); got.Concurrency != n || got.Prestart != n {
		t.Errorf("serve's default resolved to concurrency %d, prestart %d; want %d and %d", got.Concurrency, got.Prestart, n, n)
	}
	if got := (ExecutionConfig{Concurrency: 3, Prestart: -1}).Resolved(); got.Prestart != 3 {
		t.Errorf("prestart %d, want 3", got.Prestart)
	}
	o := Options{Execution: ExecutionConfig{Prestart: -1, MaxQueue: 5}}.Resolved()
	if o.Execution.Prestart != n || o.Execution.MaxQueue != 5 || o.Resolved().Execution != o.Execution {
		t.Errorf("options resolved to %+v", o.Execution)
	}
}
