// Command casbench measures a REAPI server's CAS: ByteStream upload and download of 1 MiB
// blobs over parallel streams, BatchUpdateBlobs of 4 KiB blobs, FindMissingBlobs, and
// single-core SHA-256 for reference (a verifying store cannot stream faster than it
// hashes). It speaks plain REAPI, so the same run measures kiln and its peers: given
// several --server flags, it measures each row on every server in turn, over --rounds
// rounds, and prints the ratios of the first server to the others. Given each
// server's process (--pid), it also reports the CPU the server spent per unit of each
// row (per MiB, per blob, per digest): unlike a rate, that does not depend on how much
// of the machine the server was given, by the load or by a per-client limit.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

type result struct {
	Server          string  `json:"server"`
	UploadMBps      float64 `json:"bytestream_upload_mb_s"`
	DownloadMBps    float64 `json:"bytestream_download_mb_s"`
	BatchBlobsPerS  float64 `json:"batch_update_4k_blobs_s"`
	FindMissingPerS float64 `json:"find_missing_digests_s"`
	SHA256MBps      float64 `json:"sha256_single_core_mb_s"`
	// The server's CPU (user + system) per unit of each row; 0: not measured (no --pid).
	UploadCPU   float64 `json:"upload_cpu_ms_per_mib,omitempty"`
	DownloadCPU float64 `json:"download_cpu_ms_per_mib,omitempty"`
	BatchCPU    float64 `json:"batch_update_cpu_us_per_blob,omitempty"`
	FindCPU     float64 `json:"find_missing_cpu_us_per_1k_digests,omitempty"`
}

// row is one measured figure of a result.
type row struct {
	name string
	get  func(*result) *float64
}

// rows are the measured rows of a result, in print order.
var rows = []row{
	{"upload MB/s", func(r *result) *float64 { return &r.UploadMBps }},
	{"download MB/s", func(r *result) *float64 { return &r.DownloadMBps }},
	{"batch-4KiB blobs/s", func(r *result) *float64 { return &r.BatchBlobsPerS }},
	{"find-missing digests/s", func(r *result) *float64 { return &r.FindMissingPerS }},
}

// cpuRows are the server's CPU per unit of each row, in print order.
var cpuRows = []row{
	{"upload ms/MiB", func(r *result) *float64 { return &r.UploadCPU }},
	{"download ms/MiB", func(r *result) *float64 { return &r.DownloadCPU }},
	{"batch-4KiB us/blob", func(r *result) *float64 { return &r.BatchCPU }},
	{"find-missing us/1k digests", func(r *result) *float64 { return &r.FindCPU }},
}

// server is one REAPI endpoint under test.
type server struct {
	name string
	bs   bytestream.ByteStreamClient
	cas  repb.ContentAddressableStorageClient
	pid  int // its process, for its CPU time; 0: unknown
}

// cpu is the CPU time (user + system, all its threads, live or gone) the server's
// process has used; 0 without a pid.
func (s *server) cpu() time.Duration {
	if s.pid == 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", s.pid))
	if err != nil {
		fail(fmt.Errorf("%s: read its CPU time: %v", s.name, err))
	}
	// The command name (field 2) may hold spaces: fields count from the last ')'.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	utime, _ := strconv.ParseInt(f[11], 10, 64) // field 14
	stime, _ := strconv.ParseInt(f[12], 10, 64) // field 15
	return time.Duration(utime+stime) * time.Second / clockTicks
}

// clockTicks is USER_HZ, the unit of /proc's CPU times: 100 on Linux's every
// architecture that Go supports.
const clockTicks = 100

// measure runs row on s and stores the server's CPU per unit (units of work, in
// scale: 1e3 for ms, 1e6 for us) into *cpu when s has a pid. It first writes out the
// machine's dirty pages (sync): what the rows before wrote, the kernel would otherwise
// write back during this one, on the same cores, whichever server it measures.
func measure(s *server, cpu *float64, units, scale float64, row func()) {
	syscall.Sync()
	before := s.cpu()
	row()
	if s.pid != 0 {
		*cpu = (s.cpu() - before).Seconds() * scale / units
	}
}

// serverList collects repeated --server NAME=ADDR flags.
type serverList []string

func (l *serverList) String() string     { return strings.Join(*l, ",") }
func (l *serverList) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	addr := flag.String("addr", "127.0.0.1:8980", "server address (without --server)")
	name := flag.String("name", "kiln", "label for the server (without --server)")
	var servers, pids serverList
	flag.Var(&pids, "pid", "NAME=PID of a server's process: also report the CPU it spends per unit of each row (repeat per server)")
	flag.Var(&servers, "server", "NAME=ADDR of a server to measure; repeat it to compare servers in one run, each row measured server after server (the first is the one ratios are of)")
	rounds := flag.Int("rounds", 1, "measure every row this many times, interleaving the servers (alternating their order), and print medians, every round's ratio and the median of those")
	streams := flag.Int("streams", 8, "parallel streams")
	bigCount := flag.Int("blobs", 512, "number of 1 MiB blobs to upload and download")
	smallCount := flag.Int("small", 64000, "number of 4 KiB blobs for BatchUpdateBlobs")
	fmDigests := flag.Int("find", 2_000_000, "digests to send to FindMissingBlobs")
	asJSON := flag.Bool("json", false, "print JSON (the medians of each server)")
	save := flag.String("save", "", "also write the (first server's) result as JSON to this file")
	vs := flag.String("vs", "", "print this run's (first server's) ratios to the result saved in this file (by --save)")
	compare := flag.Bool("compare", false, "measure nothing: print the ratios of saved results A to saved results B (args: A1.json[,A2.json...] B1.json[,B2.json...]; several rounds are reduced to their medians)")
	flag.Parse()
	if *compare {
		if flag.NArg() != 2 {
			fail(fmt.Errorf("--compare wants two lists of saved results"))
		}
		a, b := medianOf(strings.Split(flag.Arg(0), ",")), medianOf(strings.Split(flag.Arg(1), ","))
		printRatios(a, b)
		return
	}
	if len(servers) == 0 {
		servers = serverList{*name + "=" + *addr}
	}
	var ss []*server
	for _, sv := range servers {
		n, a, ok := strings.Cut(sv, "=")
		if !ok {
			fail(fmt.Errorf("--server %q: want NAME=ADDR", sv))
		}
		conn, err := grpc.NewClient(a, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20), grpc.MaxCallSendMsgSize(64<<20)))
		if err != nil {
			fail(err)
		}
		defer conn.Close()
		ss = append(ss, &server{name: n, bs: bytestream.NewByteStreamClient(conn), cas: repb.NewContentAddressableStorageClient(conn)})
	}
	for _, p := range pids {
		n, v, _ := strings.Cut(p, "=")
		pid, err := strconv.Atoi(v)
		found := false
		for _, s := range ss {
			if s.name == n && err == nil {
				s.pid, found = pid, true
			}
		}
		if !found {
			fail(fmt.Errorf("--pid %q: want NAME=PID of a --server NAME", p))
		}
	}
	ctx := context.Background()
	seed := uint64(time.Now().UnixNano())
	res := make([][]result, len(ss)) // [server][round]
	for round := 0; round < *rounds; round++ {
		// Fresh blobs every round, the same for every server: nothing is present yet.
		big := make([]digestBlob, *bigCount)
		for i := range big {
			big[i] = randomBlob(seed+uint64(2*round), i, 1<<20)
		}
		small := make([]digestBlob, *smallCount)
		for i := range small {
			small[i] = randomBlob(seed+uint64(2*round+1), i, 4<<10)
		}
		order := make([]int, len(ss))
		for i := range order {
			order[i] = i
			if round%2 == 1 {
				order[i] = len(ss) - 1 - i
			}
		}
		rr := make([]result, len(ss))
		for i := range rr {
			rr[i].Server = ss[i].name
		}
		mib := float64(len(big))
		for _, i := range order {
			measure(ss[i], &rr[i].UploadCPU, mib, 1e3, func() { rr[i].UploadMBps = upload(ctx, ss[i], big, *streams) })
		}
		for _, i := range order {
			measure(ss[i], &rr[i].DownloadCPU, mib, 1e3, func() { rr[i].DownloadMBps = download(ctx, ss[i], big, *streams) })
		}
		for _, i := range order {
			measure(ss[i], &rr[i].BatchCPU, float64(len(small)), 1e6, func() { rr[i].BatchBlobsPerS = batchUpdate(ctx, ss[i], small, *streams) })
		}
		for _, i := range order {
			measure(ss[i], &rr[i].FindCPU, float64(*fmDigests)/1000, 1e6, func() {
				rr[i].FindMissingPerS = findMissing(ctx, ss[i], small, *fmDigests, *streams, seed)
			})
		}
		// Single-core SHA-256 over the same 1 MiB blobs, once per server slot: the load
		// on the machine at the time, for reference.
		start := time.Now()
		for _, b := range big {
			sha256.Sum256(b.data)
		}
		sha := mbps(int64(len(big))<<20, time.Since(start))
		for i := range rr {
			rr[i].SHA256MBps = sha
			res[i] = append(res[i], rr[i])
		}
		if !*asJSON && *rounds > 1 {
			for i := range rr {
				fmt.Printf("round %d  ", round+1)
				printResult(rr[i])
			}
		}
	}
	meds := make([]result, len(ss))
	for i := range ss {
		meds[i] = median(res[i])
	}
	if *save != "" {
		b, _ := json.Marshal(meds[0])
		if err := os.WriteFile(*save, b, 0o644); err != nil {
			fail(err)
		}
	}
	if *vs != "" {
		defer printRatios(meds[0], load(*vs))
	}
	if *asJSON {
		json.NewEncoder(os.Stdout).Encode(meds)
		return
	}
	if *rounds > 1 {
		fmt.Printf("medians of %d rounds:\n", *rounds)
	}
	for _, m := range meds {
		printResult(m)
	}
	// Each round's ratio compares measurements made a moment apart; their median is the
	// ratio printed first.
	for i := 1; i < len(ss); i++ {
		printRoundRatios(fmt.Sprintf("%s / %s:", ss[0].name, ss[i].name), rows, res[0], res[i], *rounds)
	}
	if ss[0].pid == 0 {
		return
	}
	for _, m := range meds {
		if m.UploadCPU == 0 && m.BatchCPU == 0 {
			continue
		}
		fmt.Printf("%-14s server CPU:", m.Server)
		for _, row := range cpuRows {
			fmt.Printf("  %s %.2f", row.name, *row.get(&m))
		}
		fmt.Println()
	}
	// The peer's CPU over the first server's: above 1, the first spends less per unit.
	for i := 1; i < len(ss); i++ {
		if ss[i].pid != 0 {
			printRoundRatios(fmt.Sprintf("server CPU per unit, %s / %s:", ss[i].name, ss[0].name), cpuRows, res[i], res[0], *rounds)
		}
	}
}

// printRoundRatios prints, row by row, the median over the rounds of a's value over
// b's, and every round's ratio.
func printRoundRatios(label string, rows []row, a, b []result, rounds int) {
	fmt.Print(label)
	for _, row := range rows {
		var per []string
		var ratios []float64
		for r := 0; r < rounds; r++ {
			x := *row.get(&a[r]) / *row.get(&b[r])
			ratios = append(ratios, x)
			per = append(per, fmt.Sprintf("%.2f", x))
		}
		sort.Float64s(ratios)
		m := ratios[len(ratios)/2]
		if len(ratios)%2 == 0 {
			m = (ratios[len(ratios)/2-1] + ratios[len(ratios)/2]) / 2
		}
		fmt.Printf("  %s %.2fx", row.name, m)
		if rounds > 1 {
			fmt.Printf(" (rounds %s)", strings.Join(per, " "))
		}
	}
	fmt.Println()
}

func printResult(r result) {
	fmt.Printf("%-14s upload %7.0f MB/s (%.2fx SHA-256)  download %7.0f MB/s  batch-4KiB %8.0f blobs/s  find-missing %9.0f digests/s  sha256 %6.0f MB/s\n",
		r.Server, r.UploadMBps, r.UploadMBps/r.SHA256MBps, r.DownloadMBps, r.BatchBlobsPerS, r.FindMissingPerS, r.SHA256MBps)
}

// median is the row-by-row median of rs.
func median(rs []result) result {
	m := result{Server: rs[0].Server}
	all := append(append(rows[:len(rows):len(rows)], cpuRows...), row{"sha256", func(r *result) *float64 { return &r.SHA256MBps }})
	for _, row := range all {
		var v []float64
		for i := range rs {
			v = append(v, *row.get(&rs[i]))
		}
		sort.Float64s(v)
		x := v[len(v)/2]
		if len(v)%2 == 0 {
			x = (v[len(v)/2-1] + v[len(v)/2]) / 2
		}
		*row.get(&m) = x
	}
	return m
}

// upload writes every blob through ByteStream, one 1 MiB message each (the
// remote-apis-sdks default chunk), streams at once, and returns MB/s.
func upload(ctx context.Context, s *server, big []digestBlob, streams int) float64 {
	var next atomic.Int64
	start := time.Now()
	parallel(streams, func() error {
		for {
			i := int(next.Add(1)) - 1
			if i >= len(big) {
				return nil
			}
			b := big[i]
			st, err := s.bs.Write(ctx)
			if err != nil {
				return err
			}
			if err := st.Send(&bytestream.WriteRequest{
				ResourceName: fmt.Sprintf("uploads/%d/blobs/%s/%d", i, b.hash, len(b.data)),
				Data:         b.data, FinishWrite: true,
			}); err != nil {
				return err
			}
			if _, err := st.CloseAndRecv(); err != nil {
				return err
			}
		}
	})
	return mbps(int64(len(big))<<20, time.Since(start))
}

// download reads every blob back through ByteStream and returns MB/s.
func download(ctx context.Context, s *server, big []digestBlob, streams int) float64 {
	var next atomic.Int64
	start := time.Now()
	parallel(streams, func() error {
		for {
			i := int(next.Add(1)) - 1
			if i >= len(big) {
				return nil
			}
			b := big[i]
			st, err := s.bs.Read(ctx, &bytestream.ReadRequest{ResourceName: fmt.Sprintf("blobs/%s/%d", b.hash, len(b.data))})
			if err != nil {
				return err
			}
			n := 0
			for {
				resp, err := st.Recv()
				if err != nil {
					break
				}
				n += len(resp.GetData())
			}
			if n != len(b.data) {
				return fmt.Errorf("%s: read %d of %d bytes", s.name, n, len(b.data))
			}
		}
	})
	return mbps(int64(len(big))<<20, time.Since(start))
}

// batchUpdate uploads the small blobs with BatchUpdateBlobs, 900 per request (under a
// 4 MiB batch limit), and returns blobs per second.
func batchUpdate(ctx context.Context, s *server, small []digestBlob, streams int) float64 {
	const perBatch = 900
	var next atomic.Int64
	start := time.Now()
	parallel(streams, func() error {
		for {
			lo := int(next.Add(perBatch)) - perBatch
			if lo >= len(small) {
				return nil
			}
			req := &repb.BatchUpdateBlobsRequest{}
			for _, b := range small[lo:min(lo+perBatch, len(small))] {
				req.Requests = append(req.Requests, &repb.BatchUpdateBlobsRequest_Request{
					Digest: &repb.Digest{Hash: b.hash, SizeBytes: int64(len(b.data))}, Data: b.data})
			}
			resp, err := s.cas.BatchUpdateBlobs(ctx, req)
			if err != nil {
				return err
			}
			for _, x := range resp.GetResponses() {
				if x.GetStatus().GetCode() != 0 {
					return fmt.Errorf("%s: batch update: %s", s.name, x.GetStatus().GetMessage())
				}
			}
		}
	})
	return float64(len(small)) / time.Since(start).Seconds()
}

// findMissing sends FindMissingBlobs of 10k digests, half present (small blobs), until
// total digests are sent, and returns digests per second.
func findMissing(ctx context.Context, s *server, small []digestBlob, total, streams int, seed uint64) float64 {
	const perFind = 10000
	req := &repb.FindMissingBlobsRequest{}
	for i := 0; i < perFind; i++ {
		if i%2 == 0 {
			b := small[i%len(small)]
			req.BlobDigests = append(req.BlobDigests, &repb.Digest{Hash: b.hash, SizeBytes: int64(len(b.data))})
		} else {
			h := sha256.Sum256([]byte(fmt.Sprint("absent", seed, i)))
			req.BlobDigests = append(req.BlobDigests, &repb.Digest{Hash: hex.EncodeToString(h[:]), SizeBytes: 100})
		}
	}
	var sent atomic.Int64
	start := time.Now()
	parallel(streams, func() error {
		for sent.Add(perFind) <= int64(total) {
			if _, err := s.cas.FindMissingBlobs(ctx, req); err != nil {
				return err
			}
		}
		return nil
	})
	return float64(total) / time.Since(start).Seconds()
}

type digestBlob struct {
	hash string
	data []byte
}

func randomBlob(seed uint64, i, n int) digestBlob {
	var key [32]byte
	copy(key[:], fmt.Sprint(seed, "/", i))
	b := make([]byte, n)
	rand.NewChaCha8(key).Read(b)
	h := sha256.Sum256(b)
	return digestBlob{hex.EncodeToString(h[:]), b}
}

func parallel(n int, f func() error) {
	var wg sync.WaitGroup
	var once sync.Once
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(); err != nil {
				once.Do(func() { fail(err) })
			}
		}()
	}
	wg.Wait()
}

func mbps(bytes int64, d time.Duration) float64 { return float64(bytes) / 1e6 / d.Seconds() }

func fail(err error) {
	fmt.Fprintln(os.Stderr, "casbench:", err)
	os.Exit(1)
}

// load reads a result saved with --save.
func load(file string) result {
	b, err := os.ReadFile(file)
	if err != nil {
		fail(err)
	}
	var r result
	if err := json.Unmarshal(b, &r); err != nil {
		fail(err)
	}
	return r
}

// medianOf reduces saved results to the median of each rate, and prints it.
func medianOf(files []string) result {
	var rs []result
	for _, f := range files {
		rs = append(rs, load(f))
	}
	m := median(rs)
	m.Server = fmt.Sprintf("%s (median of %d)", rs[0].Server, len(rs))
	fmt.Printf("%-28s upload %7.0f MB/s  download %7.0f MB/s  batch-4KiB %8.0f blobs/s  find-missing %9.0f digests/s\n",
		m.Server, m.UploadMBps, m.DownloadMBps, m.BatchBlobsPerS, m.FindMissingPerS)
	return m
}

// printRatios prints r's rates divided by o's.
func printRatios(r, o result) {
	ratio := func(a, b float64) float64 {
		if b == 0 {
			return 0
		}
		return a / b
	}
	fmt.Printf("%-14s vs %-14s upload %.2fx  download %.2fx  batch-4KiB %.2fx  find-missing %.2fx\n", r.Server, o.Server,
		ratio(r.UploadMBps, o.UploadMBps), ratio(r.DownloadMBps, o.DownloadMBps), ratio(r.BatchBlobsPerS, o.BatchBlobsPerS), ratio(r.FindMissingPerS, o.FindMissingPerS))
}
