package clock

import (
	"context"
	"testing"
	"time"
)

func TestFake(t *testing.T) {
	start := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	f := NewFake(start)
	var order []string
	f.AfterFunc(2*time.Second, func() { order = append(order, "b") })
	f.AfterFunc(time.Second, func() { order = append(order, "a") })
	stopped := f.AfterFunc(time.Second, func() { order = append(order, "stopped") })
	if !stopped.Stop() || stopped.Stop() {
		t.Fatal("Stop: want true once, then false")
	}
	f.Advance(999 * time.Millisecond)
	if len(order) != 0 || f.Pending() != 2 {
		t.Fatalf("ran early: %v", order)
	}
	if err := f.Sleep(context.Background(), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if len(order) != 2 || order[0] != "a" || order[1] != "b" || f.Pending() != 0 {
		t.Fatalf("order %v", order)
	}
	if got := f.Now().Sub(start); got != 5999*time.Millisecond {
		t.Fatalf("now moved %v", got)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if f.Sleep(ctx, time.Hour) == nil || f.Now().Sub(start) != 5999*time.Millisecond {
		t.Fatal("Sleep with an ended context moved the clock")
	}
}

func TestSystemSleepEnds(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := System().Sleep(ctx, time.Hour); err != context.Canceled {
		t.Fatalf("%v", err)
	}
}
