package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/disk"
	"github.com/kilnbuild/kiln/cache/s3"
	"github.com/kilnbuild/kiln/cache/tiered"
	"github.com/kilnbuild/kiln/engine/asset"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/execution"
	"github.com/kilnbuild/kiln/engine/executor"
	"github.com/kilnbuild/kiln/engine/quarantine"
	"github.com/kilnbuild/kiln/engine/revoke"
	"github.com/kilnbuild/kiln/engine/scheduler"
	"github.com/kilnbuild/kiln/internal/dirplace"
	"github.com/kilnbuild/kiln/sandbox"
	"github.com/kilnbuild/kiln/toolchains"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Engine is an open data dir with everything needed to execute actions.
type Engine struct {
	Data    DataDir
	Options Options     // what Open ran with, resolved
	Store   cache.Store // the storage backend: the disk store under Data, or a tiered store of Bucket and it
	// Bucket is the shared storage, if Options.Storage names one.
	Bucket *s3.Bucket
	// Local is Store's files on this machine, which the executor hardlinks inputs from
	// and adopts outputs into; nil for a store without a local disk tier.
	Local cache.LocalFiles
	// SizeOf finds a stored blob's size from its SHA-256 alone, for the Remote Asset
	// API (checksum qualifiers carry no size); nil when the store cannot tell.
	SizeOf     func(hash string) (int64, bool)
	CAS        cache.BlobStore // the store as clients see it: with the empty blob, metered
	AC         cache.ActionCache
	Toolchains *toolchains.Store
	Executor   *executor.Executor
	Scheduler  execution.Scheduler // nil without execution
	Metrics    *cache.Metrics
	Signer     *attest.Signer
	Quarantine *quarantine.List
	// Revocations are the revoked identities and executor keys (package engine/revoke).
	Revocations *revoke.List
	runner      *sandbox.Runner
	log         *slog.Logger
}

// Open opens the data dir: store, toolchains, sandbox runner, executor and scheduler.
func Open(ctx context.Context, opts Options) (*Engine, error) {
	opts = opts.Resolved()
	ex := opts.Execution
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	reg := opts.Registerer
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	e := &Engine{Data: opts.Data, Options: opts, log: log}
	ok := false
	defer func() {
		if !ok {
			e.Close()
		}
	}()
	if opts.Storage.S3 != nil {
		// The bucket first: a misconfiguration is then the one line a user sees.
		var err error
		if e.Bucket, err = s3.Open(ctx, *opts.Storage.S3, s3.Options{Logger: log}); err != nil {
			return nil, err
		}
	}
	// The data dir's parts (store, log, sandbox, history) each in block groups of their
	// own, away from what else churns beside the data dir (package dirplace).
	if err := os.MkdirAll(string(opts.Data), 0o755); err != nil {
		return nil, status.Errorf(codes.Internal, "create data dir: %v", err)
	}
	if err := dirplace.Spread(string(opts.Data)); err != nil {
		log.Debug("no placement hint for the data dir", "dir", opts.Data, "err", err)
	}
	ds, err := disk.Open(ctx, opts.Data.Store(), disk.Options{Primary: opts.Primary, MaxSize: int64(opts.MaxSize), Fsync: opts.Fsync, Logger: log, Registerer: reg})
	if err != nil {
		return nil, err
	}
	// SizeOf reads local files: a hint for the Remote Asset API, verified on read.
	e.Store, e.Local, e.SizeOf = ds, ds, asset.SizeFromBlobFiles(ds)
	if e.Bucket != nil {
		t := tiered.New(ds, e.Bucket.CAS(), tiered.Options{ActionCache: e.Bucket.ActionCache(), Logger: log})
		e.Store, e.Local = t, t
	}
	e.Metrics = cache.NewMetrics(reg)
	e.CAS = e.Metrics.BlobStore("cas", cache.WithEmptyBlob(e.Store))
	if e.Quarantine, err = quarantine.Open(string(opts.Data)); err != nil {
		return nil, err
	}
	e.Revocations = revoke.Open(string(opts.Data))
	e.AC = e.Metrics.ActionCache(e.Quarantine.WrapActionCache(cache.WithCompletenessCheck(e.Store.ActionCache(), e.CAS), e.CAS))
	e.Toolchains, err = toolchains.Open(ctx, string(opts.Data), toolchains.Options{Default: ex.DefaultToolchain, Pinner: opts.Pinner, Logger: log})
	if err != nil {
		return nil, err
	}
	e.Signer, err = attest.Open(ctx, attest.Options{DataDir: string(opts.Data), CAS: e.attestCAS(), ExecutorKeyFile: opts.ExecutorKeyFile, Logger: log, Sink: opts.LinkSink})
	if err != nil {
		return nil, err
	}
	if ex.Disabled {
		ok = true
		return e, nil
	}
	var sb executor.Sandbox = noSandbox{}
	if opts.Scheduler == nil { // a cluster frontend runs nothing itself
		if e.runner, err = openRunner(ctx, opts.Data.Sandbox(), ex.Prestart, log); err != nil {
			return nil, err
		}
		sb = executor.SandboxRunner{R: e.runner}
	}
	e.Executor, err = executor.NewExecutor(executor.ExecutorConfig{
		CAS: e.CAS, Local: e.Local, AC: e.AC, Sandbox: sb, Toolchains: e.toolchainResolver(),
		RequireCacheWrite: opts.LinkSink != nil,
		Attester:          executor.LinkAttester{Signer: e.Signer, Version: opts.Version, CheckKey: e.Revocations.CheckKey},
		Quarantined:       e.Quarantine.Quarantined,
		WorkDir:           filepath.Join(opts.Data.Sandbox(), "exec"), UID: sandbox.DefaultUID, GID: sandbox.DefaultGID,
		DefaultTimeout: ex.DefaultTimeout, MaxTimeout: ex.MaxTimeout, Logger: log, ActionURL: opts.ActionURL,
		IgnoreUnknownPlatformProperties: ex.IgnoreUnknownPlatformProperties,
	})
	if err != nil {
		return nil, err
	}
	if opts.Scheduler != nil {
		if e.Scheduler, err = opts.Scheduler.NewScheduler(e); err != nil {
			return nil, err
		}
		ok = true
		return e, nil
	}
	e.Scheduler = scheduler.NewScheduler(e.Executor, scheduler.SchedulerConfig{Concurrency: ex.Concurrency, MaxQueue: ex.MaxQueue, Logger: log, Registerer: reg,
		VerifyRate: ex.VerifyRate, Observe: opts.Observe, ActionURL: opts.ActionURL,
		Memory: opts.Memory, ClientQueued: opts.ClientQueued, Work: opts.Work})
	ok = true
	return e, nil
}

// attestCAS is where signed envelopes go (AttestationsCAS).
func (e *Engine) attestCAS() cache.BlobStore { return AttestationsCAS(e.CAS, e.Bucket) }

// AttestationsCAS is the store for signed envelopes: the CAS (clients read links from
// it) and, with shared storage, also the bucket's attestations prefix, which has no
// lifecycle and answers for an envelope the CAS has lost. Only envelopes go through
// it: other blobs (inputs, dependencies) stay under the CAS's lifecycle.
func AttestationsCAS(cas cache.BlobStore, bucket *s3.Bucket) cache.BlobStore {
	if bucket == nil {
		return cas
	}
	return cache.WithDurableCopy(cas, bucket.Attestations())
}

// OpenCAS opens the store of a data dir for commands that only read and write blobs:
// the disk store, or with storage set, the disk store as the local tier of the bucket
// (envelopes: AttestationsCAS). local is the disk store either way; bucket is the
// shared storage (nil without); close releases both.
func OpenCAS(ctx context.Context, data DataDir, storage StorageConfig, log *slog.Logger) (cas cache.BlobStore, local *disk.Store, bucket *s3.Bucket, close func(), err error) {
	if storage.S3 != nil {
		if bucket, err = s3.Open(ctx, *storage.S3, s3.Options{Logger: log}); err != nil {
			return nil, nil, nil, nil, err
		}
	}
	d, err := disk.Open(ctx, data.Store(), disk.Options{Logger: log})
	if err != nil {
		return nil, nil, nil, nil, err
	}
	if bucket == nil {
		return d, d, nil, func() { d.Close() }, nil
	}
	cas = tiered.New(d, bucket.CAS(), tiered.Options{ActionCache: bucket.ActionCache(), Logger: log})
	return cache.WithEmptyBlob(cas), d, bucket, func() { d.Close() }, nil
}

// openRunner opens a sandbox runner in the first free slot under dir. Each process
// holds its slot's lock; a slot whose owner died is swept and reused by the next.
func openRunner(ctx context.Context, dir string, prestart int, log *slog.Logger) (*sandbox.Runner, error) {
	const slots = 64
	var last error
	for i := 0; i < slots; i++ {
		r, err := sandbox.New(ctx, sandbox.Config{StateDir: filepath.Join(dir, "runners", strconv.Itoa(i)), Logger: log, Prestart: prestart})
		if err == nil {
			return r, nil
		}
		if status.Code(err) != codes.FailedPrecondition {
			return nil, err
		}
		last = err
	}
	return nil, fmt.Errorf("all %d sandbox slots under %s are in use: %w", slots, dir, last)
}

// Close releases the engine's resources.
func (e *Engine) Close() error {
	var errs []error
	if e.runner != nil {
		errs = append(errs, e.runner.Close())
	}
	if e.Signer != nil {
		// Waits for pending log appends, so every link of this process is logged.
		errs = append(errs, e.Signer.Close(context.Background()))
	}
	if e.Store != nil {
		errs = append(errs, e.Store.Close())
	}
	return errors.Join(errs...)
}

// noSandbox is the executor's sandbox on a cluster frontend, which only validates
// actions: they run on the workers.
type noSandbox struct{}

func (noSandbox) Run(context.Context, executor.Job) (executor.JobResult, error) {
	return executor.JobResult{}, status.Error(codes.FailedPrecondition, "this kiln process is a cluster frontend: actions run on the cluster's workers")
}
