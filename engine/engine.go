package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strconv"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/disk"
	"github.com/kilnbuild/kiln/engine/asset"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/execution"
	"github.com/kilnbuild/kiln/engine/executor"
	"github.com/kilnbuild/kiln/engine/quarantine"
	"github.com/kilnbuild/kiln/engine/scheduler"
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
	Store   cache.Store // the storage backend: the disk store under Data
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
	runner     *sandbox.Runner
	log        *slog.Logger
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
	ds, err := disk.Open(ctx, opts.Data.Store(), disk.Options{Primary: opts.Primary, MaxSize: int64(opts.MaxSize), Fsync: opts.Fsync, Logger: log, Registerer: reg})
	if err != nil {
		return nil, err
	}
	e.Store, e.Local, e.SizeOf = ds, ds, asset.SizeFromBlobFiles(ds)
	e.Metrics = cache.NewMetrics(reg)
	e.CAS = e.Metrics.BlobStore("cas", cache.WithEmptyBlob(e.Store))
	if e.Quarantine, err = quarantine.Open(string(opts.Data)); err != nil {
		return nil, err
	}
	e.AC = e.Metrics.ActionCache(e.Quarantine.WrapActionCache(cache.WithCompletenessCheck(e.Store.ActionCache(), e.CAS), e.CAS))
	e.Toolchains, err = toolchains.Open(ctx, string(opts.Data), toolchains.Options{Default: ex.DefaultToolchain, Pinner: opts.Pinner, Logger: log})
	if err != nil {
		return nil, err
	}
	e.Signer, err = attest.Open(ctx, attest.Options{DataDir: string(opts.Data), CAS: e.CAS, ExecutorKeyFile: opts.ExecutorKeyFile, Logger: log})
	if err != nil {
		return nil, err
	}
	if ex.Disabled {
		ok = true
		return e, nil
	}
	e.runner, err = openRunner(ctx, opts.Data.Sandbox(), ex.Prestart, log)
	if err != nil {
		return nil, err
	}
	e.Executor, err = executor.NewExecutor(executor.ExecutorConfig{
		CAS: e.CAS, Local: e.Local, AC: e.AC, Sandbox: executor.SandboxRunner{R: e.runner}, Toolchains: toolchainResolver{e.Toolchains},
		Attester: executor.LinkAttester{Signer: e.Signer, Version: opts.Version}, Quarantined: e.Quarantine.Quarantined,
		WorkDir: filepath.Join(opts.Data.Sandbox(), "exec"), UID: sandbox.DefaultUID, GID: sandbox.DefaultGID,
		DefaultTimeout: ex.DefaultTimeout, MaxTimeout: ex.MaxTimeout, Logger: log, ActionURL: opts.ActionURL,
		IgnoreUnknownPlatformProperties: ex.IgnoreUnknownPlatformProperties,
	})
	if err != nil {
		return nil, err
	}
	e.Scheduler = scheduler.NewScheduler(e.Executor, scheduler.SchedulerConfig{Concurrency: ex.Concurrency, MaxQueue: ex.MaxQueue, Logger: log, Registerer: reg,
		VerifyRate: ex.VerifyRate, Observe: opts.Observe, ActionURL: opts.ActionURL})
	ok = true
	return e, nil
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

// toolchainResolver adapts the toolchain store to the executor.
type toolchainResolver struct{ s *toolchains.Store }

func (t toolchainResolver) Resolve(ctx context.Context, ref string) (string, error) {
	img, err := t.s.Resolve(ctx, ref)
	if err != nil {
		return "", err
	}
	return img.Digest.String(), nil
}

func (t toolchainResolver) RootFS(ctx context.Context, digest string) (string, error) {
	img, err := t.s.Resolve(ctx, digest)
	if err != nil {
		return "", err
	}
	return t.s.RootFS(ctx, img)
}
