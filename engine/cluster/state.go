package cluster

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// The state bucket (KILN_EXEC) holds, under these keys:
//
//	x.<exec>  execRecord: one run of an action, from queued to its response
//	o.<op>    opRecord: what one Execute call got (its execution, owner, cancellation)
//	f.<key>   the exec id of the in-flight execution of a cacheable action, keyed by
//	          SHA-256(instance NUL action): created with a KV create, so only one
//	          frontend starts it and every other joins it
//
// Every record is JSON, written whole; changes to x. and o. records are compare-and-set
// on the KV revision, so concurrent frontends and workers never lose one another's.

// execRecord is one execution of an action.
type execRecord struct {
	ID       string                    `json:"id"`
	Instance string                    `json:"instance"`
	Action   string                    `json:"action"` // HASH/SIZE
	Platform string                    `json:"platform"`
	InFlight string                    `json:"inflight,omitempty"` // its f. key, for cacheable actions
	Stage    repb.ExecutionStage_Value `json:"stage"`
	Queued   time.Time                 `json:"queued"`
	Worker   string                    `json:"worker,omitempty"`
	Attempt  int                       `json:"attempt,omitempty"` // deliveries to workers so far
	// Returned counts deliveries a worker handed back on purpose (it was stopping):
	// they do not count against max-deliver, which counts workers lost.
	Returned  int  `json:"returned,omitempty"`
	Live      int  `json:"live"`             // operations not cancelled
	Cancel    bool `json:"cancel,omitempty"` // every operation was cancelled: stop it
	SkipCache bool `json:"skip_cache,omitempty"`
	// Ran is how long the worker's run of the recorded response took (its executor's
	// time): what the cluster adds around it is measured without it.
	Ran time.Duration `json:"ran_ns,omitempty"`
	// Response is the ExecuteResponse (protobuf) once COMPLETED; a large one is kept in
	// the CAS and named by ResponseBlob instead.
	Response     []byte `json:"response,omitempty"`
	ResponseBlob string `json:"response_blob,omitempty"`
}

func (r *execRecord) done() bool { return r.Stage == repb.ExecutionStage_COMPLETED }

// opRecord is one operation: one client's Execute call.
type opRecord struct {
	Exec   string `json:"exec"`
	Owner  string `json:"owner"`
	Action string `json:"action"`
	// Response answers the operation instead of its execution's: set when it was
	// cancelled, or when Execute was answered from the action cache (no execution).
	Response []byte `json:"response,omitempty"`
}

// work is the message a frontend queues for a worker.
type work struct {
	Exec      string    `json:"exec"`
	Instance  string    `json:"instance"`
	Action    string    `json:"action"`
	Queued    time.Time `json:"queued"`
	SkipCache bool      `json:"skip_cache,omitempty"`
	// Blobs are the Action, the Command and the input tree's Directory messages (as
	// many as fit in seedBytes), by digest: the worker checks each against its digest
	// and puts it in its local tier, saving a serial bucket read for each. They are in
	// the bucket too: a worker that gets fewer reads the rest from there.
	Blobs map[string][]byte `json:"blobs,omitempty"`
}

// seedBytes bounds the blobs a work message carries.
const seedBytes = 128 << 10

// inlineResponse bounds a response kept in the execution record itself (NATS messages
// default to at most 1 MiB); a larger one goes to the CAS.
const inlineResponse = 256 << 10

func execKey(id string) string { return "x." + id }
func opKey(id string) string   { return "o." + id }

// inFlightKey names the in-flight execution of action in instance.
func inFlightKey(instance string, action cache.Digest) string {
	h := sha256.Sum256([]byte(instance + "\x00" + action.String()))
	return "f." + hex.EncodeToString(h[:])
}

// newID is a random id for an execution or operation.
func newID() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// opName is the REAPI operation name of op id; opID its inverse.
func opName(id string) string { return "operations/" + id }

func opID(name string) (string, bool) {
	const p = "operations/"
	if len(name) != len(p)+32 || name[:len(p)] != p {
		return "", false
	}
	if _, err := hex.DecodeString(name[len(p):]); err != nil {
		return "", false
	}
	return name[len(p):], true
}

// getRecord reads the JSON record at key into v and returns its revision; a missing
// key is NOT_FOUND.
func (c *Conn) getRecord(ctx context.Context, key string, v any) (uint64, error) {
	e, err := c.State.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
		return 0, status.Errorf(codes.NotFound, "%s not found", key)
	}
	if err != nil {
		return 0, c.wrap(err, "read %s", key)
	}
	if err := json.Unmarshal(e.Value(), v); err != nil {
		return 0, status.Errorf(codes.DataLoss, "%s: %v", key, err)
	}
	return e.Revision(), nil
}

// createRecord writes v at key if no record is there (ALREADY_EXISTS otherwise).
func (c *Conn) createRecord(ctx context.Context, key string, v any) (uint64, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return 0, status.Errorf(codes.Internal, "%s: %v", key, err)
	}
	rev, err := c.State.Create(ctx, key, b)
	if errors.Is(err, jetstream.ErrKeyExists) {
		return 0, status.Errorf(codes.AlreadyExists, "%s exists", key)
	}
	if err != nil {
		return 0, c.wrap(err, "create %s", key)
	}
	return rev, nil
}

// putRecord writes v at key if its revision is still rev and returns the new one
// (ABORTED if the key was written meanwhile).
func (c *Conn) putRecord(ctx context.Context, key string, v any, rev uint64) (uint64, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return 0, status.Errorf(codes.Internal, "%s: %v", key, err)
	}
	n, err := c.State.Update(ctx, key, b, rev)
	if errors.Is(err, jetstream.ErrKeyRevisionMismatch) || errors.Is(err, jetstream.ErrKeyExists) {
		return 0, status.Errorf(codes.Aborted, "%s changed", key)
	}
	if err != nil {
		return 0, c.wrap(err, "update %s", key)
	}
	return n, nil
}

// errUnchanged makes updateRecord stop without writing.
var errUnchanged = errors.New("unchanged")

// updateRecord reads the record at key, lets change modify it, and writes it back if
// the key was not written meanwhile, else starts over. change returning errUnchanged
// ends it without a write (nil error); any other error ends it with that error.
func updateRecord[T any](ctx context.Context, c *Conn, key string, change func(*T) error) (*T, error) {
	for {
		var v T
		rev, err := c.getRecord(ctx, key, &v)
		if err != nil {
			return nil, err
		}
		if err := change(&v); err != nil {
			if errors.Is(err, errUnchanged) {
				return &v, nil
			}
			return nil, err
		}
		b, err := json.Marshal(&v)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "%s: %v", key, err)
		}
		_, err = c.State.Update(ctx, key, b, rev)
		if errors.Is(err, jetstream.ErrKeyRevisionMismatch) || errors.Is(err, jetstream.ErrKeyExists) {
			continue
		}
		if err != nil {
			return nil, c.wrap(err, "update %s", key)
		}
		return &v, nil
	}
}

// response decodes the ExecuteResponse of a completed execution.
func (r *execRecord) response(ctx context.Context, cas cache.BlobStore) (*repb.ExecuteResponse, error) {
	raw := r.Response
	if r.ResponseBlob != "" {
		d, err := cache.ParseDigest(r.ResponseBlob)
		if err != nil {
			return nil, status.Errorf(codes.DataLoss, "execution %s: response blob: %v", r.ID, err)
		}
		if raw, err = cache.ReadAll(ctx, cas, d, 64<<20); err != nil {
			return nil, status.Errorf(status.Code(err), "execution %s: response: %v", r.ID, status.Convert(err).Message())
		}
	}
	resp := &repb.ExecuteResponse{}
	if err := proto.Unmarshal(raw, resp); err != nil {
		return nil, status.Errorf(codes.DataLoss, "execution %s: response: %v", r.ID, err)
	}
	return resp, nil
}

// setResponse stores resp in r, in the CAS if it is large.
func (r *execRecord) setResponse(ctx context.Context, cas cache.BlobStore, resp *repb.ExecuteResponse) error {
	raw, err := proto.Marshal(resp)
	if err != nil {
		return status.Errorf(codes.Internal, "execution %s: response: %v", r.ID, err)
	}
	r.Response, r.ResponseBlob = raw, ""
	if len(raw) > inlineResponse {
		d, err := cache.PutBytes(ctx, cas, raw)
		if err != nil {
			return err
		}
		r.Response, r.ResponseBlob = nil, d.String()
	}
	return nil
}
