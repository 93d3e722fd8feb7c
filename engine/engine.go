package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/disk"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/quarantine"
	"github.com/kilnbuild/kiln/engine/revoke"
	"github.com/kilnbuild/kiln/sandbox"
	"github.com/kilnbuild/kiln/toolchains"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Options configures an Engine: what `kiln serve` and the CLI commands share.
type Options struct {
	Data DataDir
	// Primary makes this process the store's indexer (kiln serve; one per data dir).
	Primary bool
	MaxSize int64 // store bound; 0 = unbounded; needs Primary
	Fsync   bool
	// DefaultToolchain is the container-image used by actions without one.
	DefaultToolchain string
	Concurrency      int // actions at once; 0 = number of CPUs
	MaxQueue         int
	DefaultTimeout   time.Duration
	MaxTimeout       time.Duration
	// IgnoreUnknownPlatformProperties accepts properties kiln does not understand.
	IgnoreUnknownPlatformProperties bool
	// Prestart keeps this many sandboxes prepared ahead of actions.
	Prestart   int
	Logger     *slog.Logger
	Registerer prometheus.Registerer // nil: metrics are not exported
	// Pinner pins toolchain tags (the lockfile); nil pins none.
	Pinner toolchains.TagPinner
	// NoSandbox opens the store and toolchains only (commands that run nothing).
	NoSandbox bool
	// ExecutorKeyFile is the operator's ed25519 signing key (PKCS #8 PEM); empty uses
	// (or creates) the data dir's own key.
	ExecutorKeyFile string
	// Version is kiln's version, recorded in every link.
	Version string
	// VerifyRate is the fraction of actions checked for determinism (SchedulerConfig).
	VerifyRate float64
}

// Engine is an open data dir with everything needed to execute actions.
type Engine struct {
	Data       DataDir
	Store      *disk.Store
	CAS        cache.BlobStore // the store as clients see it: with the empty blob, metered
	AC         cache.ActionCache
	Toolchains *toolchains.Store
	Executor   *Executor
	Scheduler  *Scheduler
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
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	reg := opts.Registerer
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	e := &Engine{Data: opts.Data, log: log}
	ok := false
	defer func() {
		if !ok {
			e.Close()
		}
	}()
	var err error
	e.Store, err = disk.Open(ctx, opts.Data.Store(), disk.Options{Primary: opts.Primary, MaxSize: opts.MaxSize, Fsync: opts.Fsync, Logger: log, Registerer: reg})
	if err != nil {
		return nil, err
	}
	e.Metrics = cache.NewMetrics(reg)
	e.CAS = localStore{e.Metrics.BlobStore("cas", cache.WithEmptyBlob(e.Store)), e.Store}
	if e.Quarantine, err = quarantine.Open(string(opts.Data)); err != nil {
		return nil, err
	}
	e.Revocations = revoke.Open(string(opts.Data))
	e.AC = e.Metrics.ActionCache(e.Quarantine.WrapActionCache(cache.WithCompletenessCheck(e.Store.ActionCache(), e.CAS), e.CAS))
	e.Toolchains, err = toolchains.Open(ctx, string(opts.Data), toolchains.Options{Default: opts.DefaultToolchain, Pinner: opts.Pinner, Logger: log})
	if err != nil {
		return nil, err
	}
	e.Signer, err = attest.Open(ctx, attest.Options{DataDir: string(opts.Data), CAS: e.CAS, ExecutorKeyFile: opts.ExecutorKeyFile, Logger: log})
	if err != nil {
		return nil, err
	}
	if opts.NoSandbox {
		ok = true
		return e, nil
	}
	e.runner, err = openRunner(ctx, opts.Data.Sandbox(), opts.Prestart, log)
	if err != nil {
		return nil, err
	}
	conc := opts.Concurrency
	if conc <= 0 {
		conc = runtime.NumCPU()
	}
	e.Executor, err = NewExecutor(ExecutorConfig{
		CAS: e.CAS, AC: e.AC, Sandbox: sandboxRunner{e.runner}, Toolchains: toolchainResolver{e.Toolchains},
		Attester:    linkAttester{s: e.Signer, version: opts.Version, checkKey: e.Revocations.CheckKey},
		Quarantined: e.Quarantine.Quarantined,
		WorkDir:     filepath.Join(opts.Data.Sandbox(), "exec"), UID: sandbox.DefaultUID, GID: sandbox.DefaultGID,
		DefaultTimeout: opts.DefaultTimeout, MaxTimeout: opts.MaxTimeout, Logger: log,
		IgnoreUnknownPlatformProperties: opts.IgnoreUnknownPlatformProperties,
	})
	if err != nil {
		return nil, err
	}
	e.Scheduler = NewScheduler(e.Executor, SchedulerConfig{Concurrency: conc, MaxQueue: opts.MaxQueue, Logger: log, Registerer: reg,
		VerifyRate: opts.VerifyRate})
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

// localStore is the metered CAS that still offers the disk store's hardlink and
// adopt abilities to the executor.
type localStore struct {
	cache.BlobStore
	d *disk.Store
}

func (l localStore) BlobPath(d cache.Digest) string { return l.d.BlobPath(d) }

func (l localStore) Verify(d cache.Digest) error { return l.d.Verify(d) }

func (l localStore) AdoptFile(ctx context.Context, d cache.Digest, f *os.File) error {
	return l.d.AdoptFile(ctx, d, f)
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
