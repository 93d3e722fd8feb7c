// Command casbench measures a REAPI server's CAS: ByteStream upload and download of 1 MiB
// blobs over parallel streams, BatchUpdateBlobs of 4 KiB blobs, FindMissingBlobs, and
// single-core SHA-256 for reference (a verifying store cannot stream faster than it
// hashes). It speaks plain REAPI, so the same run measures kiln and its peers.
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
	"strings"
	"sync"
	"sync/atomic"
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
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8980", "server address")
	name := flag.String("name", "kiln", "label for the server")
	streams := flag.Int("streams", 8, "parallel streams")
	bigCount := flag.Int("blobs", 512, "number of 1 MiB blobs to upload and download")
	smallCount := flag.Int("small", 64000, "number of 4 KiB blobs for BatchUpdateBlobs")
	fmDigests := flag.Int("find", 2_000_000, "digests to send to FindMissingBlobs")
	asJSON := flag.Bool("json", false, "print JSON")
	save := flag.String("save", "", "also write the result as JSON to this file")
	vs := flag.String("vs", "", "print this run's ratios to the result saved in this file (by --save)")
	compare := flag.Bool("compare", false, "measure nothing: print the ratios of saved results A to saved results B (args: A1.json[,A2.json...] B1.json[,B2.json...]; several rounds are reduced to their medians)")
	flag.Parse()
	if *compare {
		if flag.NArg() != 2 {
			fail(fmt.Errorf("--compare wants two lists of saved results"))
		}
		a, b := median(strings.Split(flag.Arg(0), ",")), median(strings.Split(flag.Arg(1), ","))
		printRatios(a, b)
		return
	}

	conn, err := grpc.NewClient(*addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20), grpc.MaxCallSendMsgSize(64<<20)))
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	ctx := context.Background()
	bs := bytestream.NewByteStreamClient(conn)
	cas := repb.NewContentAddressableStorageClient(conn)
	seed := uint64(time.Now().UnixNano())
	r := result{Server: *name}

	// ByteStream upload: 1 MiB blobs, one 1 MiB message each (the remote-apis-sdks
	// default chunk), *streams at once.
	big := make([]digestBlob, *bigCount)
	for i := range big {
		big[i] = randomBlob(seed, i, 1<<20)
	}
	var next atomic.Int64
	start := time.Now()
	parallel(*streams, func() error {
		for {
			i := int(next.Add(1)) - 1
			if i >= len(big) {
				return nil
			}
			b := big[i]
			st, err := bs.Write(ctx)
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
	r.UploadMBps = mbps(int64(len(big))<<20, time.Since(start))

	next.Store(0)
	start = time.Now()
	parallel(*streams, func() error {
		for {
			i := int(next.Add(1)) - 1
			if i >= len(big) {
				return nil
			}
			b := big[i]
			st, err := bs.Read(ctx, &bytestream.ReadRequest{ResourceName: fmt.Sprintf("blobs/%s/%d", b.hash, len(b.data))})
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
				return fmt.Errorf("read %d of %d bytes", n, len(b.data))
			}
		}
	})
	r.DownloadMBps = mbps(int64(len(big))<<20, time.Since(start))

	// BatchUpdateBlobs: 4 KiB blobs, 900 per request (under a 4 MiB batch limit).
	small := make([]digestBlob, *smallCount)
	for i := range small {
		small[i] = randomBlob(seed+1, i, 4<<10)
	}
	const perBatch = 900
	next.Store(0)
	start = time.Now()
	parallel(*streams, func() error {
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
			resp, err := cas.BatchUpdateBlobs(ctx, req)
			if err != nil {
				return err
			}
			for _, x := range resp.GetResponses() {
				if x.GetStatus().GetCode() != 0 {
					return fmt.Errorf("batch update: %s", x.GetStatus().GetMessage())
				}
			}
		}
	})
	r.BatchBlobsPerS = float64(len(small)) / time.Since(start).Seconds()

	// FindMissingBlobs: 10k digests per request, half present (the small blobs).
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
	start = time.Now()
	parallel(*streams, func() error {
		for sent.Add(perFind) <= int64(*fmDigests) {
			if _, err := cas.FindMissingBlobs(ctx, req); err != nil {
				return err
			}
		}
		return nil
	})
	r.FindMissingPerS = float64(*fmDigests) / time.Since(start).Seconds()

	// Single-core SHA-256 over the same 1 MiB blobs.
	start = time.Now()
	for _, b := range big {
		sha256.Sum256(b.data)
	}
	r.SHA256MBps = mbps(int64(len(big))<<20, time.Since(start))

	if *save != "" {
		b, _ := json.Marshal(r)
		if err := os.WriteFile(*save, b, 0o644); err != nil {
			fail(err)
		}
	}
	if *vs != "" {
		defer printRatios(r, load(*vs))
	}
	if *asJSON {
		json.NewEncoder(os.Stdout).Encode(r)
		return
	}
	fmt.Printf("%-14s upload %7.0f MB/s (%.2fx SHA-256)  download %7.0f MB/s  batch-4KiB %8.0f blobs/s  find-missing %9.0f digests/s  sha256 %6.0f MB/s\n",
		r.Server, r.UploadMBps, r.UploadMBps/r.SHA256MBps, r.DownloadMBps, r.BatchBlobsPerS, r.FindMissingPerS, r.SHA256MBps)
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

// median reduces saved results to the median of each rate.
func median(files []string) result {
	var rs []result
	for _, f := range files {
		rs = append(rs, load(f))
	}
	med := func(get func(result) float64) float64 {
		v := make([]float64, len(rs))
		for i, r := range rs {
			v[i] = get(r)
		}
		sort.Float64s(v)
		if len(v)%2 == 1 {
			return v[len(v)/2]
		}
		return (v[len(v)/2-1] + v[len(v)/2]) / 2
	}
	m := result{
		Server:          fmt.Sprintf("%s (median of %d)", rs[0].Server, len(rs)),
		UploadMBps:      med(func(r result) float64 { return r.UploadMBps }),
		DownloadMBps:    med(func(r result) float64 { return r.DownloadMBps }),
		BatchBlobsPerS:  med(func(r result) float64 { return r.BatchBlobsPerS }),
		FindMissingPerS: med(func(r result) float64 { return r.FindMissingPerS }),
		SHA256MBps:      med(func(r result) float64 { return r.SHA256MBps }),
	}
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
