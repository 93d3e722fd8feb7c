package sandbox

import (
	"runtime"
	"sync"
)

// spawner runs functions on OS threads that never exit while the Runner lives.
//
// Every container process is started with a parent-death signal (SIGKILL), so that
// a dying kiln takes its sandboxes with it. Linux sends that signal when the *thread*
// that forked the process exits, not the process; and the Go runtime does end
// threads: whenever a goroutine that locked its thread returns (kiln's own mount
// binding does this). A sandbox started from such a thread would be killed at a
// random later moment.
// Forking only from threads locked for good avoids that.
type spawner struct {
	reqs chan func()
	wg   sync.WaitGroup
}

func newSpawner(n int) *spawner {
	s := &spawner{reqs: make(chan func())}
	for i := 0; i < n; i++ {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			runtime.LockOSThread() // never unlocked: the thread ends with the Runner
			for f := range s.reqs {
				f()
			}
		}()
	}
	return s
}

// do runs f on one of the spawner's threads and waits for it.
func (s *spawner) do(f func()) {
	done := make(chan struct{})
	s.reqs <- func() {
		defer close(done)
		f()
	}
	<-done
}

// close ends the threads, once nothing started from them is alive.
func (s *spawner) close() {
	close(s.reqs)
	s.wg.Wait()
}
