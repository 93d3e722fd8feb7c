// Package hostile makes the attacks of issue 19 on a REAPI server the way a hostile
// client would, over the network: for the end-to-end tests (test/hostile_e2e_test.go)
// and scripts/bench-hostile.sh (test/bench/hostile).
package hostile

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// Dial connects to addr from the local address from ("" for any): on loopback,
// 127.0.0.2 is another client than 127.0.0.1 as far as the server can tell.
func Dial(addr, from string) (*grpc.ClientConn, error) {
	opts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20), grpc.MaxCallSendMsgSize(64<<20))}
	if from != "" {
		local := &net.TCPAddr{IP: net.ParseIP(from)}
		opts = append(opts, grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) {
			d := net.Dialer{LocalAddr: local}
			return d.DialContext(ctx, "tcp", a)
		}))
	}
	return grpc.NewClient(addr, opts...)
}

// WindowBomb is a zstd frame header declaring a 64 MiB window (28 B5 2F FD 00 80),
// which a decoder allocates, and n RLE blocks of 128 KiB (02 00 10 XX), which fill it:
// 4 bytes on the wire per 128 KiB of the server's memory.
func WindowBomb(n int) []byte {
	b := []byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x80}
	for i := 0; i < n; i++ {
		b = append(b, 0x02, 0x00, 0x10, byte(i))
	}
	return b
}

// UUID is a fresh random upload id.
func UUID() string {
	var b [16]byte
	rand.Read(b[:])
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

// junkHash is a digest hash no attack's bytes ever match.
func junkHash() string {
	var b [32]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// BombUpload is the resource name of a compressed upload the bomb of n blocks can never
// complete: it declares one byte more than the bomb decompresses to.
func BombUpload(n int) string {
	return fmt.Sprintf("uploads/%s/compressed-blobs/zstd/%s/%d", UUID(), junkHash(), int64(n)<<17+1)
}

// Codes counts the status codes the server answered an attack with.
type Codes struct {
	mu sync.Mutex
	m  map[codes.Code]int
}

// Add counts err's code.
func (c *Codes) Add(err error) {
	c.mu.Lock()
	if c.m == nil {
		c.m = map[codes.Code]int{}
	}
	c.m[status.Code(err)]++
	c.mu.Unlock()
}

// Get is how many answers had code k.
func (c *Codes) Get(k codes.Code) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.m[k]
}

func (c *Codes) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var parts []string
	for k, n := range c.m {
		parts = append(parts, fmt.Sprintf("%v=%d", k, n))
	}
	return strings.Join(parts, " ")
}

// write sends data as name's first message and, unless finish, ends the stream as
// end says: "close" half-closes without finish_write, "cancel" breaks the stream once
// the server has taken the data (an interrupted upload), "hold" keeps it open until
// ctx ends.
func write(ctx context.Context, bs bytestream.ByteStreamClient, name string, data []byte, end string) error {
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := bs.Write(cctx)
	if err != nil {
		return err
	}
	for off := 0; off == 0 || off < len(data); off += 1 << 20 {
		req := &bytestream.WriteRequest{WriteOffset: int64(off), Data: data[off:min(off+1<<20, len(data))]}
		if off == 0 {
			req.ResourceName = name
		}
		req.FinishWrite = end == "finish" && off+1<<20 >= len(data)
		if err := st.Send(req); err != nil {
			_, err := st.CloseAndRecv()
			return err
		}
	}
	switch end {
	case "finish", "close":
		_, err := st.CloseAndRecv()
		return err
	}
	ended := make(chan error, 1)
	go func() { ended <- st.RecvMsg(new(bytestream.WriteResponse)) }()
	// Wait until the server has the data (or refused it).
	for {
		select {
		case err := <-ended:
			return err
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		q, err := bs.QueryWriteStatus(ctx, &bytestream.QueryWriteStatusRequest{ResourceName: name})
		if err == nil && q.GetCommittedSize() >= int64(len(data)) {
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	if end == "hold" {
		select {
		case err := <-ended:
			return err
		case <-ctx.Done():
		}
	}
	return nil // cancelled by the deferred cancel: interrupted
}

// Bombs sends a window bomb of blocks blocks on n uploads, parallel at a time, each
// ended as end says ("close", "cancel", "hold"; see write).
func Bombs(ctx context.Context, conn *grpc.ClientConn, n, parallel, blocks int, end string, c *Codes) {
	bs := bytestream.NewByteStreamClient(conn)
	bomb := WindowBomb(blocks)
	Each(ctx, n, parallel, func() { c.Add(write(ctx, bs, BombUpload(blocks), bomb, end)) })
}

// UnfinishedWrites makes n one-byte uploads, parallel at a time, each ended as end says.
func UnfinishedWrites(ctx context.Context, conn *grpc.ClientConn, n, parallel int, end string, c *Codes) {
	bs := bytestream.NewByteStreamClient(conn)
	Each(ctx, n, parallel, func() {
		c.Add(write(ctx, bs, "uploads/"+UUID()+"/blobs/"+junkHash()+"/100", []byte{1}, end))
	})
}

// HugeDeclared sends a frame of blocks RLE blocks on an upload that declares 2^62 bytes.
func HugeDeclared(ctx context.Context, conn *grpc.ClientConn, blocks int) error {
	bs := bytestream.NewByteStreamClient(conn)
	return write(ctx, bs, fmt.Sprintf("uploads/%s/compressed-blobs/zstd/%s/%d", UUID(), junkHash(), int64(1)<<62), WindowBomb(blocks), "finish")
}

// Each runs f n times, parallel at a time, until ctx ends.
func Each(ctx context.Context, n, parallel int, f func()) {
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	for i := 0; i < n && ctx.Err() == nil; i++ {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			f()
		}()
	}
	wg.Wait()
}

// Store uploads blobs with BatchUpdateBlobs.
func Store(ctx context.Context, conn *grpc.ClientConn, blobs ...[]byte) ([]*repb.Digest, error) {
	req := &repb.BatchUpdateBlobsRequest{}
	var ds []*repb.Digest
	for _, b := range blobs {
		d := digestOf(b)
		ds = append(ds, d)
		req.Requests = append(req.Requests, &repb.BatchUpdateBlobsRequest_Request{Digest: d, Data: b})
	}
	resp, err := repb.NewContentAddressableStorageClient(conn).BatchUpdateBlobs(ctx, req)
	if err != nil {
		return nil, err
	}
	for _, r := range resp.GetResponses() {
		if r.GetStatus().GetCode() != 0 {
			return nil, status.ErrorProto(r.GetStatus())
		}
	}
	return ds, nil
}

func digestOf(b []byte) *repb.Digest {
	h := sha256.Sum256(b)
	return &repb.Digest{Hash: hex.EncodeToString(h[:]), SizeBytes: int64(len(b))}
}

// Upload stores messages (deterministically marshalled) with BatchUpdateBlobs, in
// batches under 4 MiB, or with ByteStream when one is larger, and returns their digests.
func Upload(ctx context.Context, conn *grpc.ClientConn, msgs ...proto.Message) ([]*repb.Digest, error) {
	var ds []*repb.Digest
	var batch [][]byte
	size := 0
	flush := func() error {
		if len(batch) == 0 {
			return nil
		}
		_, err := Store(ctx, conn, batch...)
		batch, size = nil, 0
		return err
	}
	for _, m := range msgs {
		b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
		if err != nil {
			return nil, err
		}
		ds = append(ds, digestOf(b))
		if len(b) > 2<<20 {
			if err := write(ctx, bytestream.NewByteStreamClient(conn), fmt.Sprintf("uploads/%s/blobs/%s/%d", UUID(), ds[len(ds)-1].GetHash(), len(b)), b, "finish"); err != nil {
				return nil, err
			}
			continue
		}
		if size+len(b) > 2<<20 {
			if err := flush(); err != nil {
				return nil, err
			}
		}
		batch = append(batch, b)
		size += len(b)
	}
	return ds, flush()
}

// DoublingDAG is issue 19's hostile input root: levels+1 Directory messages, each level
// two children pointing at the next, claiming 2^levels directories; the root is last.
func DoublingDAG(levels int) []proto.Message {
	d := &repb.Directory{}
	out := []proto.Message{d}
	for i := 0; i < levels; i++ {
		b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(d)
		dg := digestOf(b)
		d = &repb.Directory{Directories: []*repb.DirectoryNode{{Name: "a", Digest: dg}, {Name: "b", Digest: dg}}}
		out = append(out, d)
	}
	return out
}

// BigDirectory is a Directory of n FileNodes naming the empty blob (about 80 bytes each).
func BigDirectory(n int) *repb.Directory {
	dir := &repb.Directory{}
	empty := digestOf(nil)
	for i := 0; i < n; i++ {
		dir.Files = append(dir.Files, &repb.FileNode{Name: fmt.Sprintf("f%08d", i), Digest: empty})
	}
	return dir
}

// Action stores a Command and an Action running it on the input root and returns the
// Action's digest.
func Action(ctx context.Context, conn *grpc.ClientConn, cmd *repb.Command, root *repb.Digest) (*repb.Digest, error) {
	ds, err := Upload(ctx, conn, cmd)
	if err != nil {
		return nil, err
	}
	ds, err = Upload(ctx, conn, &repb.Action{CommandDigest: ds[0], InputRootDigest: root})
	if err != nil {
		return nil, err
	}
	return ds[0], nil
}

// Execute runs an action and returns its ExecuteResponse.
func Execute(ctx context.Context, conn *grpc.ClientConn, action *repb.Digest, skipCache bool) (*repb.ExecuteResponse, error) {
	st, err := repb.NewExecutionClient(conn).Execute(ctx, &repb.ExecuteRequest{ActionDigest: action, SkipCacheLookup: skipCache})
	if err != nil {
		return nil, err
	}
	for {
		op, err := st.Recv()
		if err != nil {
			return nil, err
		}
		if op.GetDone() {
			resp := &repb.ExecuteResponse{}
			if err := op.GetResponse().UnmarshalTo(resp); err != nil {
				return nil, err
			}
			return resp, nil
		}
	}
}

// HostileActions stores n distinct actions (args distinguish them) whose input root
// is a DoublingDAG of levels levels.
func HostileActions(ctx context.Context, conn *grpc.ClientConn, n, levels int) ([]*repb.Digest, error) {
	ds, err := Upload(ctx, conn, DoublingDAG(levels)...)
	if err != nil {
		return nil, err
	}
	root := ds[len(ds)-1]
	var msgs []proto.Message
	for i := 0; i < n; i++ {
		msgs = append(msgs, &repb.Command{Arguments: []string{"/bin/true", fmt.Sprint(i), UUID()}})
	}
	cmds, err := Upload(ctx, conn, msgs...)
	if err != nil {
		return nil, err
	}
	msgs = msgs[:0]
	for _, c := range cmds {
		msgs = append(msgs, &repb.Action{CommandDigest: c, InputRootDigest: root})
	}
	return Upload(ctx, conn, msgs...)
}

// ExecuteAll executes actions, parallel at a time, and counts the status of each
// ExecuteResponse (or of the call).
func ExecuteAll(ctx context.Context, conn *grpc.ClientConn, actions []*repb.Digest, parallel int, c *Codes) {
	var next int
	var mu sync.Mutex
	Each(ctx, len(actions), parallel, func() {
		mu.Lock()
		a := actions[next]
		next++
		mu.Unlock()
		resp, err := Execute(ctx, conn, a, true)
		if err == nil {
			err = status.ErrorProto(resp.GetStatus())
		}
		c.Add(err)
	})
}

// GetTrees walks the tree under root with n GetTree calls of page_size 0, parallel at a
// time, reading every page.
func GetTrees(ctx context.Context, conn *grpc.ClientConn, root *repb.Digest, n, parallel int, c *Codes) {
	cas := repb.NewContentAddressableStorageClient(conn)
	Each(ctx, n, parallel, func() {
		st, err := cas.GetTree(ctx, &repb.GetTreeRequest{RootDigest: root})
		for err == nil {
			_, err = st.Recv()
		}
		if err == io.EOF {
			err = nil
		}
		c.Add(err)
	})
}
