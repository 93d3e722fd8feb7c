// Command hostile runs the resource attacks of issue 19 on a REAPI server, round after
// round, until it is interrupted: compressed uploads with 64 MiB windows (held open,
// interrupted, closed without finish_write), thousands of unfinished one-byte uploads,
// a frame declaring 2^62 bytes, concurrent GetTree walks of a 700,000-entry directory,
// and Executes of a 21-blob input root claiming 2^20 directories. It connects from
// -from (on loopback, 127.0.0.2 is another client than 127.0.0.1) and prints, per
// attack, the status codes the server answered with. scripts/bench-hostile.sh runs it
// beside an honest Bazel build.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/test/hostile"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8980", "server address")
	from := flag.String("from", "127.0.0.2", "local address to connect from")
	rounds := flag.Int("rounds", 0, "rounds to run (0: until interrupted)")
	execute := flag.Bool("execute", true, "include the Execute attack (needs a server with execution)")
	skip := flag.String("skip", "", "attacks to leave out, comma-separated words of their names (e.g. bombs,GetTree)")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	conn, err := hostile.Dial(*addr, *from)
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	roots, err := hostile.Upload(ctx, conn, hostile.BigDirectory(700_000))
	if err != nil {
		fail(fmt.Errorf("upload the big directory: %w", err))
	}
	var actions []*repb.Digest
	if *execute {
		if actions, err = hostile.HostileActions(ctx, conn, 100, 20); err != nil {
			fail(fmt.Errorf("store the hostile actions: %w", err))
		}
	}
	attacks := []string{"bombs held", "bombs interrupted", "bombs unfinished", "1-byte uploads unfinished", "1-byte uploads interrupted", "1-byte uploads held", "2^62 declared", "GetTree 700k entries", "Execute 2^20-node DAG"}
	counts := map[string]*hostile.Codes{}
	for _, a := range attacks {
		counts[a] = &hostile.Codes{}
	}
	fmt.Fprintln(os.Stderr, "hostile: attacking", *addr, "from", *from)
	start := time.Now()
	n := 0
	for ; ctx.Err() == nil && (*rounds == 0 || n < *rounds); n++ {
		var wg sync.WaitGroup
		skipped := func(name string) bool {
			for _, w := range strings.Split(*skip, ",") {
				if w != "" && strings.Contains(name, w) {
					return true
				}
			}
			return false
		}
		attack := func(name string, f func()) {
			if !skipped(name) {
				wg.Add(1)
				go func() { defer wg.Done(); f() }()
			}
		}
		hctx, release := context.WithTimeout(ctx, 5*time.Second)
		attack("bombs held", func() { hostile.Bombs(hctx, conn, 16, 16, 512, "hold", counts["bombs held"]) })
		attack("bombs interrupted", func() { hostile.Bombs(ctx, conn, 24, 4, 512, "cancel", counts["bombs interrupted"]) })
		attack("bombs unfinished", func() { hostile.Bombs(ctx, conn, 8, 4, 512, "close", counts["bombs unfinished"]) })
		attack("1-byte uploads unfinished", func() { hostile.UnfinishedWrites(ctx, conn, 4096, 64, "close", counts["1-byte uploads unfinished"]) })
		attack("1-byte uploads interrupted", func() { hostile.UnfinishedWrites(ctx, conn, 1024, 64, "cancel", counts["1-byte uploads interrupted"]) })
		attack("1-byte uploads held", func() { hostile.UnfinishedWrites(hctx, conn, 600, 600, "hold", counts["1-byte uploads held"]) })
		attack("2^62 declared", func() { counts["2^62 declared"].Add(hostile.HugeDeclared(ctx, conn, 2048)) })
		attack("GetTree 700k entries", func() { hostile.GetTrees(ctx, conn, roots[0], 20, 20, counts["GetTree 700k entries"]) })
		if *execute {
			attack("Execute 2^20-node DAG", func() { hostile.ExecuteAll(ctx, conn, actions, 100, counts["Execute 2^20-node DAG"]) })
		}
		wg.Wait()
		release()
	}
	fmt.Printf("hostile: %d rounds in %.1f s\n", n, time.Since(start).Seconds())
	for _, a := range attacks {
		fmt.Printf("  %-28s %v\n", a, counts[a])
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "hostile:", err)
	os.Exit(1)
}
