package server

import (
	"os"
	"runtime/debug"

	"github.com/kilnbuild/kiln/engine/limits"
	"github.com/kilnbuild/kiln/engine/reapi"
	"github.com/kilnbuild/kiln/engine/scheduler"
	"github.com/kilnbuild/kiln/internal/bytesize"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Limits bound what clients can make kiln serve hold, in all and per client (clients
// are told apart by certificate, or else by IP address; reapi.ClientID). Each key is
// its flag's name; 0 means the default, which Resolved makes explicit.
type Limits struct {
	// MaxMemory is the memory budget requests are charged to; 0: limits.DefaultMemory.
	MaxMemory bytesize.Size `yaml:"max-memory"`
	// ClientMemory is the most of it one client may hold; 0: a quarter of MaxMemory.
	ClientMemory bytesize.Size `yaml:"client-max-memory"`
	// ClientUploads and MaxUploads bound ByteStream uploads in progress per client and
	// in all; 0: reapi.DefaultClientUploads and reapi.DefaultMaxUploads.
	ClientUploads int `yaml:"client-max-uploads"`
	MaxUploads    int `yaml:"max-uploads"`
	// ClientTrees bounds one client's GetTree calls in progress; 0: reapi.DefaultClientTrees.
	ClientTrees int `yaml:"client-max-trees"`
	// ClientQueued bounds one client's executions waiting for a slot (or being
	// validated); 0: scheduler.DefaultClientQueued.
	ClientQueued int `yaml:"client-max-queued"`
	// ClientCalls bounds the calls one client may start per second; beyond, they wait
	// their turn. 0: limits.DefaultClientCalls.
	ClientCalls float64 `yaml:"client-max-calls"`
	// ClientCPUs bounds the cores one client's decompressing, hashing and tree parsing
	// may use over time while other clients have calls in progress (or always, with
	// ClientCPUsAlways: a machine shared with other work); 0: limits.DefaultClientCPUs.
	ClientCPUs       float64 `yaml:"client-max-cpus"`
	ClientCPUsAlways bool    `yaml:"client-max-cpus-always"`
}

// maxStreams bounds the concurrent calls of one connection (gRPC's own default is
// unbounded, and each costs a goroutine and buffers).
const maxStreams = 1024

// Resolved returns l with every default made explicit.
func (l Limits) Resolved() Limits {
	if l.MaxMemory <= 0 {
		l.MaxMemory = bytesize.Size(limits.DefaultMemory())
	}
	if l.ClientMemory <= 0 {
		l.ClientMemory = l.MaxMemory / 4
		if l.ClientMemory >= 1<<20 {
			l.ClientMemory &^= 1<<20 - 1 // whole MiB
		}
	}
	if l.ClientUploads <= 0 {
		l.ClientUploads = reapi.DefaultClientUploads
	}
	if l.MaxUploads <= 0 {
		l.MaxUploads = reapi.DefaultMaxUploads
	}
	if l.ClientTrees <= 0 {
		l.ClientTrees = reapi.DefaultClientTrees
	}
	if l.ClientQueued <= 0 {
		l.ClientQueued = scheduler.DefaultClientQueued
	}
	if l.ClientCalls <= 0 {
		l.ClientCalls = limits.DefaultClientCalls
	}
	if l.ClientCPUs <= 0 {
		l.ClientCPUs = limits.DefaultClientCPUs()
	}
	return l
}

// Check refuses limits that cannot work (INVALID_ARGUMENT, naming the flag).
func (l Limits) Check() error {
	for _, c := range []struct {
		flag string
		bad  bool
	}{
		{"--max-memory", l.MaxMemory < 0}, {"--client-max-memory", l.ClientMemory < 0},
		{"--client-max-uploads", l.ClientUploads < 0}, {"--max-uploads", l.MaxUploads < 0},
		{"--client-max-trees", l.ClientTrees < 0}, {"--client-max-queued", l.ClientQueued < 0},
		{"--client-max-calls", l.ClientCalls < 0 || l.ClientCalls != l.ClientCalls},
		{"--client-max-cpus", l.ClientCPUs < 0 || l.ClientCPUs != l.ClientCPUs},
	} {
		if c.bad {
			return status.Errorf(codes.InvalidArgument, "%s: want a positive number (or 0 for the default)", c.flag)
		}
	}
	if l.MaxMemory > 0 && l.ClientMemory > l.MaxMemory {
		return status.Errorf(codes.InvalidArgument, "--client-max-memory %v is more than --max-memory %v", l.ClientMemory, l.MaxMemory)
	}
	return nil
}

// newBudget makes the server's memory budget from resolved limits and, unless
// GOMEMLIMIT is set, tells the Go runtime to collect garbage harder as the heap nears
// half as much again (what the budget does not count: the store's index, gRPC's
// connections, garbage not yet collected), so the process stays near its budget.
func newBudget(l Limits) *limits.Budget {
	total := int64(l.MaxMemory)
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(total + total/2)
	}
	return limits.NewBudget(total, int64(l.ClientMemory))
}
