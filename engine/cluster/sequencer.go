package cluster

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/s3"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/kilnbuild/kiln/engine/attest/tlog"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/secure-systems-lab/go-securesystemslib/dsse"
	"golang.org/x/mod/sumdb/note"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Links in a cluster: a worker signs each link with its own key and stores the
// envelope in the bucket (cas/ and attest/) like any kiln process; instead of
// appending it to a log of its own it writes an empty marker pending/<hash>_<size> to
// the bucket, before the action is acknowledged, and publishes a wake-up on
// kiln.links. The sequencer, the cluster's one log appender, lists pending/, checks
// each envelope's signature against the cluster's trust set, appends it to its
// transparency log (attest.Signer.Append: each distinct link once) and indexes it,
// publishes the log to the bucket (log/: tiles and entry bundles, then the signed
// checkpoint; tlog.Publisher), and only then deletes the marker: a verifier that finds
// no marker finds the link in the published log. While the sequencer is down, markers
// wait in the bucket; it catches up when it comes back (and polls, so a lost wake-up
// only delays).

const pendingPrefix = "pending/"

// LogPrefix is where the sequencer publishes the cluster's transparency log in the
// bucket (C2SP tlog-tiles: checkpoint, tile/..., tile/entries/...). It must have no
// lifecycle rule.
const LogPrefix = "log/"

func pendingKey(env cache.Digest) string {
	return pendingPrefix + env.Hash + "_" + strconv.FormatInt(env.Size, 10)
}

// SharedLog is the cluster's transparency log as its sequencer publishes it in b, for
// verifiers, rebuilds and frontends on any machine (attest.Store.WithLog): a
// link whose marker is still in pending/ is on its way into it.
func SharedLog(b *s3.Bucket) *attest.RemoteLog {
	return &attest.RemoteLog{
		Source: tlog.ObjectSource(b, LogPrefix, 64<<20),
		Pending: func(ctx context.Context, d cache.Digest) bool {
			_, err := b.GetObject(ctx, pendingKey(d), 0)
			return err == nil
		},
	}
}

// LogFor returns store reading the log lv names: the data dir's own when it is lv's
// (the sequencer's data dir, or kiln serve --cluster embedded); otherwise, with shared
// storage b, the one the cluster's sequencer publishes there.
func LogFor(store *attest.Store, lv note.Verifier, b *s3.Bucket) *attest.Store {
	if b == nil || tlog.DirOrigin(store.Paths().Log) == lv.Name() {
		return store
	}
	return store.WithLog(SharedLog(b))
}

// envelopeWait is how long a pending marker may name an envelope that is not in the
// bucket (still being uploaded, or its worker died mid-upload: the retry writes both
// again) before the sequencer gives up on it.
const envelopeWait = 10 * time.Minute

// BucketSink is a worker's attest.LinkSink: a pending marker in the bucket.
type BucketSink struct {
	Bucket *s3.Bucket
	Conn   *Conn // for the wake-up; nil: the sequencer finds the marker when it polls

	mu sync.Mutex
	// queued holds the envelopes whose marker this process put: each is in the log or
	// on its way (a marker goes only once its link is logged, or refused: then a second
	// one would be refused too), so the same link again (the same action run again,
	// byte-identical) needs no second marker.
	queued map[cache.Digest]struct{}
}

// sinkMemo bounds BucketSink's memory of queued envelopes (cleared when full).
const sinkMemo = 1 << 16

// Submit implements attest.LinkSink: it returns once the marker is in the bucket.
func (s *BucketSink) Submit(ctx context.Context, env cache.Digest, _ []byte) error {
	s.mu.Lock()
	_, done := s.queued[env]
	s.mu.Unlock()
	if done {
		return nil
	}
	if err := s.Bucket.PutObject(ctx, pendingKey(env), nil); err != nil {
		return err
	}
	s.mu.Lock()
	if s.queued == nil || len(s.queued) >= sinkMemo {
		s.queued = map[cache.Digest]struct{}{}
	}
	s.queued[env] = struct{}{}
	s.mu.Unlock()
	if s.Conn != nil {
		s.Conn.NC.Publish(linksSubject, nil)
	}
	return nil
}

// SequencerOptions configures a Sequencer.
type SequencerOptions struct {
	// Poll is how often the bucket is listed without a wake-up (0: 5 s).
	Poll time.Duration
	// SealAfter is how long after a key's retirement its bound is recorded (0: 30 s):
	// links it signed before it was retired have reached pending/ by then.
	SealAfter  time.Duration
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// Sequencer appends the cluster's links to the transparency log of its data dir.
type Sequencer struct {
	c      *Conn
	bucket *s3.Bucket
	signer *attest.Signer
	opts   SequencerOptions
	log    *slog.Logger
	pub    *tlog.Publisher

	mLogged   prometheus.Counter
	mRejected prometheus.Counter
	mPending  prometheus.Gauge
}

// NewSequencer returns the sequencer over signer's log (its data dir's); Run starts it.
func NewSequencer(c *Conn, bucket *s3.Bucket, signer *attest.Signer, opts SequencerOptions) *Sequencer {
	if opts.Poll <= 0 {
		opts.Poll = 5 * time.Second
	}
	if opts.SealAfter <= 0 {
		opts.SealAfter = 30 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Sequencer{c: c, bucket: bucket, signer: signer, opts: opts, log: opts.Logger,
		mLogged:   prometheus.NewCounter(prometheus.CounterOpts{Name: "kiln_sequencer_links_logged_total", Help: "Workers' links appended to the transparency log."}),
		mRejected: prometheus.NewCounter(prometheus.CounterOpts{Name: "kiln_sequencer_links_rejected_total", Help: "Pending links refused: not signed by a key the cluster trusts (moved to rejected/ in the bucket)."}),
		mPending:  prometheus.NewGauge(prometheus.GaugeOpts{Name: "kiln_sequencer_links_pending", Help: "Links waiting in the bucket at the last scan."}),
	}
	if opts.Registerer != nil {
		opts.Registerer.MustRegister(s.mLogged, s.mRejected, s.mPending)
	}
	return s
}

// Run holds the data dir's sequencer lock, publishes the log key to the trust set and
// appends pending links until ctx ends.
func (s *Sequencer) Run(ctx context.Context) error {
	unlock, err := lockSequencer(s.signer.Store().Paths().Attest)
	if err != nil {
		return err
	}
	defer unlock()
	lk := s.signer.Keyring().Log()
	if err := retry(ctx, s.log, "publish the log key", func() error { return s.c.publishLogKey(ctx, lk) }); err != nil {
		return err
	}
	lv, err := lk.Verifier()
	if err != nil {
		return err
	}
	if err := retry(ctx, s.log, "open the log in the bucket", func() (err error) {
		s.pub, err = tlog.NewPublisher(ctx, s.signer.Store().Paths().Log, lv, s.bucket, LogPrefix)
		return err
	}); err != nil {
		return err
	}
	wake := make(chan struct{}, 1)
	sub, err := s.c.NC.Subscribe(linksSubject, func(*nats.Msg) {
		select {
		case wake <- struct{}{}:
		default:
		}
	})
	if err != nil {
		return s.c.wrap(err, "subscribe to %s", linksSubject)
	}
	defer sub.Unsubscribe()
	s.log.Info("kiln sequencer appending the cluster's links", "log", s.signer.Store().Paths().Log, "storage", s.bucket.String())
	t := time.NewTicker(s.opts.Poll)
	defer t.Stop()
	for {
		if err := s.drain(ctx); err != nil && ctx.Err() == nil {
			s.log.Warn("appending pending links failed; retrying", "err", err)
		}
		if err := s.publish(ctx); err != nil && ctx.Err() == nil {
			s.log.Warn("publishing the log to the bucket failed; retrying", "err", err)
		}
		if err := s.seal(ctx); err != nil && ctx.Err() == nil {
			s.log.Warn("recording retired keys' bounds failed; retrying", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-wake:
		case <-t.C:
		}
	}
}

// lockSequencer takes the data dir's sequencer lock: one sequencer per log.
func lockSequencer(dir string) (func(), error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, status.Errorf(codes.Internal, "sequencer lock: %v", err)
	}
	p := filepath.Join(dir, "sequencer.lock")
	f, err := os.OpenFile(p, os.O_CREATE|os.O_RDWR|syscall.O_CLOEXEC, 0o644)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "sequencer lock: %v", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, status.Errorf(codes.FailedPrecondition, "another sequencer runs on this data dir (%s is locked)", p)
	}
	return func() { f.Close() }, nil
}

// drain appends every pending link, many at once (the log appends them in batches).
func (s *Sequencer) drain(ctx context.Context) error {
	trust, err := s.c.TrustSet(ctx)
	if err != nil {
		return err
	}
	after := ""
	total := 0
	for {
		keys, err := s.bucket.ListObjects(ctx, pendingPrefix, after, 1000)
		if err != nil {
			return err
		}
		if len(keys) == 0 {
			break
		}
		after = keys[len(keys)-1].Key
		total += len(keys)
		s.mPending.Set(float64(total))
		logged := make([]bool, len(keys))
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(64)
		for i, k := range keys {
			g.Go(func() (err error) {
				logged[i], err = s.append(gctx, k, trust)
				return err
			})
		}
		err = g.Wait()
		// The markers of logged links go once the published log shows them.
		var done []string
		for i, ok := range logged {
			if ok {
				done = append(done, keys[i].Key)
			}
		}
		if len(done) > 0 {
			if perr := s.publish(ctx); perr != nil {
				return perr
			}
			g, gctx := errgroup.WithContext(ctx)
			g.SetLimit(64)
			for _, k := range done {
				g.Go(func() error { return s.bucket.DeleteObject(gctx, k) })
			}
			if derr := g.Wait(); derr != nil {
				return derr
			}
			s.mLogged.Add(float64(len(done)))
		}
		if err != nil {
			return err
		}
		if len(keys) < 1000 {
			break
		}
	}
	s.mPending.Set(0)
	return nil
}

// append logs the link a pending marker names and reports whether it did (the caller
// deletes the marker once the log is published). A link not signed by a key the
// cluster trusts (unknown, or retired and sealed) is moved to rejected/ instead, with
// the reason.
func (s *Sequencer) append(ctx context.Context, obj s3.Object, trust keys.Trust) (bool, error) {
	key := obj.Key
	d, err := cache.ParseDigest(strings.Replace(strings.TrimPrefix(key, pendingPrefix), "_", "/", 1))
	if err != nil {
		s.log.Warn("ignoring a malformed pending marker", "key", key)
		return false, nil
	}
	env, err := cache.ReadAll(ctx, s.bucket.Attestations(), d, 64<<20)
	if status.Code(err) == codes.NotFound {
		env, err = cache.ReadAll(ctx, s.bucket.CAS(), d, 64<<20)
	}
	if err != nil {
		if status.Code(err) == codes.NotFound || status.Code(err) == codes.DataLoss {
			// A worker writes the marker and the envelope at once: wait for it a while.
			if time.Since(obj.Modified) < envelopeWait {
				return false, nil
			}
			return false, s.reject(ctx, key, d, "its envelope is not in the bucket")
		}
		return false, err
	}
	e, err := attest.ParseEnvelope(env)
	if err != nil {
		return false, s.reject(ctx, key, d, status.Convert(err).Message())
	}
	k, err := s.verify(ctx, e, trust)
	if status.Code(err) == codes.PermissionDenied {
		return false, s.reject(ctx, key, d, "not signed by a key the cluster trusts: "+status.Convert(err).Message())
	}
	if err != nil {
		return false, err
	}
	if k.NotAfterLogSize != nil {
		return false, s.reject(ctx, key, d, fmt.Sprintf("signed by key %s, retired on %s", k.KeyID, k.NotAfter.Format(time.RFC3339)))
	}
	idx, err := s.signer.Append(ctx, env)
	if err != nil {
		return false, err
	}
	s.log.Debug("link logged", "envelope", d.String(), "index", idx, "key", k.KeyID)
	return true, nil
}

// verify checks env's signature against trust, the trust set as read at the start of
// the pass. A rejected link never reaches the log, so a signature by a key missing
// from that set is checked again against the key read by itself: a key admitted since,
// or a set read short, leaves the link pending instead. PermissionDenied means no key
// the cluster has admitted signed it.
func (s *Sequencer) verify(ctx context.Context, e *dsse.Envelope, trust keys.Trust) (keys.PublicKey, error) {
	k, _, err := attest.VerifyEnvelope(ctx, e, trust)
	if err == nil {
		return k, nil
	}
	again := keys.Trust{Keys: slices.Clone(trust.Keys), Log: trust.Log}
	for _, sig := range e.Signatures {
		if _, ok := again.Key(sig.KeyID); ok {
			continue
		}
		p, kerr := s.c.trustedKey(ctx, sig.KeyID)
		switch {
		case status.Code(kerr) == codes.NotFound:
			continue
		case kerr != nil:
			return keys.PublicKey{}, kerr
		}
		again.Keys = append(again.Keys, p)
	}
	if len(again.Keys) == len(trust.Keys) {
		return keys.PublicKey{}, status.Error(codes.PermissionDenied, status.Convert(err).Message())
	}
	k, _, err = attest.VerifyEnvelope(ctx, e, again)
	if err != nil {
		return keys.PublicKey{}, status.Error(codes.PermissionDenied, status.Convert(err).Message())
	}
	s.log.Warn("a link's key was missing from the trust set as read for this pass; read again, it verifies", "key", k.KeyID)
	return k, nil
}

// publish has the log sign a checkpoint covering every appended link and copies it,
// with what it covers, to the bucket (nothing when the bucket has it already).
func (s *Sequencer) publish(ctx context.Context) error {
	if err := s.signer.Checkpoint(ctx); err != nil {
		return err
	}
	before := s.pub.Published()
	cp, err := s.pub.Publish(ctx)
	if err != nil {
		return err
	}
	if cp != nil && cp != before {
		s.log.Debug("log published", "size", cp.Size)
	}
	return nil
}

func (s *Sequencer) reject(ctx context.Context, key string, d cache.Digest, why string) error {
	s.log.Error("refusing to log a pending link", "envelope", d.String(), "reason", why)
	if err := s.bucket.PutObject(ctx, "rejected/"+strings.TrimPrefix(key, pendingPrefix), []byte(why+"\n")); err != nil {
		return err
	}
	s.mRejected.Inc()
	return s.bucket.DeleteObject(ctx, key)
}

// seal records the log size as the bound of keys retired more than SealAfter ago,
// once the links pending by then are logged (drain ran just before).
func (s *Sequencer) seal(ctx context.Context) error {
	t, err := s.c.TrustSet(ctx)
	if err != nil {
		return err
	}
	due := false
	for _, k := range t.Keys {
		if !k.Active() && k.NotAfterLogSize == nil {
			if time.Since(*k.NotAfter) < s.opts.SealAfter {
				return nil // wait: its last links may still be on their way
			}
			due = true
		}
	}
	if !due {
		return nil
	}
	if err := s.drain(ctx); err != nil {
		return err
	}
	size, err := s.signer.LogSize(ctx)
	if err != nil {
		return err
	}
	s.log.Info("recording the log size that bounds retired keys", "size", size)
	return s.c.sealRetired(ctx, size)
}
