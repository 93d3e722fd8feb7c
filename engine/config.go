package engine

import (
	"log/slog"
	"runtime"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/s3"
	"github.com/kilnbuild/kiln/engine/attest"
	"github.com/kilnbuild/kiln/engine/execution"
	"github.com/kilnbuild/kiln/engine/limits"
	"github.com/kilnbuild/kiln/engine/scheduler"
	"github.com/kilnbuild/kiln/internal/bytesize"
	"github.com/kilnbuild/kiln/toolchains"
	"github.com/prometheus/client_golang/prometheus"
)

// Options configures an Engine: what `kiln serve` and the CLI commands share. The
// settings an operator writes have yaml keys, the names of kiln serve's flags, so
// kiln serve's configuration file (package server's Config) holds them as they are;
// a section added later (a storage tree) is one more field with its own key.
type Options struct {
	Data DataDir `yaml:"data"`
	// Primary makes this process the store's indexer (kiln serve; one per data dir).
	Primary bool          `yaml:"-"`
	MaxSize bytesize.Size `yaml:"max-size"` // store bound; 0 = unbounded; needs Primary
	Fsync   bool          `yaml:"fsync"`
	// Storage puts the CAS and action cache in shared storage, the data dir's store
	// becoming their local tier (bounded by MaxSize); empty keeps them on disk only.
	Storage StorageConfig `yaml:"storage,omitempty"`
	// Execution says how actions run, if they run at all.
	Execution ExecutionConfig `yaml:",inline"`
	// ExecutorKeyFile is the operator's ed25519 signing key (PKCS #8 PEM); empty uses
	// (or creates) the data dir's own key.
	ExecutorKeyFile string `yaml:"key-file"`

	Logger     *slog.Logger          `yaml:"-"`
	Registerer prometheus.Registerer `yaml:"-"` // nil: metrics are not exported
	// Pinner pins toolchain tags (the lockfile); nil pins none.
	Pinner toolchains.TagPinner `yaml:"-"`
	// Version is kiln's version, recorded in every link.
	Version string `yaml:"-"`
	// Scheduler, if set, makes the engine's scheduler instead of the local one: a
	// cluster frontend's, whose actions run on workers, so no sandbox is opened here.
	Scheduler SchedulerFactory `yaml:"-"`
	// LinkSink, if set, takes every signed link instead of the data dir's transparency
	// log (a cluster worker: its links wait in shared storage for the sequencer), and a
	// failed action-cache write fails the execution instead of being logged, so that a
	// worker never reports done what it has not stored.
	LinkSink attest.LinkSink `yaml:"-"`
	// Observe, if set, is told of every finished execution and action-cache hit
	// (kiln serve's history, for the web UI); it must not block.
	Observe func(scheduler.Finished) `yaml:"-"`
	// ActionURL, if set, is the web page of an action: failed actions' reports and
	// errors name it, so a client can follow it.
	ActionURL func(cache.Digest) string `yaml:"-"`
	// Memory, ClientQueued and Work bound what one client's queued executions hold
	// (scheduler.SchedulerConfig); kiln serve sets them from its limits.
	Memory       *limits.Budget `yaml:"-"`
	ClientQueued int            `yaml:"-"`
	Work         *limits.Work   `yaml:"-"`
}

// SchedulerFactory makes an engine's scheduler (see Options.Scheduler).
type SchedulerFactory interface {
	NewScheduler(e *Engine) (execution.Scheduler, error)
}

// StorageConfig is shared storage (docs/storage.md): the --storage flag, a URL, or the
// storage: section of kiln serve's configuration file. The zero value is none.
type StorageConfig struct {
	// S3 is an S3-compatible bucket; credentials come from the AWS SDK's chain, never
	// from here.
	S3 *s3.Config `yaml:"s3,omitempty"`
}

// Set parses a storage URL (s3://BUCKET[/PREFIX]?endpoint=...); "" means none. It makes
// StorageConfig a flag value.
func (c *StorageConfig) Set(url string) error {
	if url == "" {
		c.S3 = nil
		return nil
	}
	cfg, err := s3.ParseURL(url)
	if err != nil {
		return err
	}
	c.S3 = &cfg
	return nil
}

// String is the storage URL ("" for none).
func (c *StorageConfig) String() string {
	if c == nil || c.S3 == nil {
		return ""
	}
	return c.S3.String()
}

// Type names the flag's value for help output.
func (c *StorageConfig) Type() string { return "url" }

// ExecutionConfig says how this process runs actions: kiln serve's execution flags,
// and what kiln exec, verify and rebuild run with (the zero value, resolved).
type ExecutionConfig struct {
	// Disabled opens the store, toolchains and keys only: no sandbox, no executor, no
	// scheduler (kiln serve --no-execution, commands that run nothing).
	Disabled bool `yaml:"no-execution"`
	// DefaultToolchain is the container-image of actions that name none.
	DefaultToolchain string `yaml:"default-toolchain"`
	// Concurrency is how many actions run at once; 0 means the number of CPUs.
	Concurrency int `yaml:"concurrency"`
	// Prestart is how many sandboxes are kept prepared ahead of actions; -1 means as
	// many as Concurrency (kiln serve's default), 0 none (one-off commands).
	Prestart int `yaml:"prestart"`
	// MaxQueue bounds the actions waiting for a slot; 0 means DefaultMaxQueue.
	MaxQueue int `yaml:"max-queue"`
	// DefaultTimeout is the timeout of actions that set none; MaxTimeout the longest
	// one an action may ask for. 0 means DefaultTimeout and DefaultMaxTimeout.
	DefaultTimeout time.Duration `yaml:"default-timeout"`
	MaxTimeout     time.Duration `yaml:"max-timeout"`
	// IgnoreUnknownPlatformProperties accepts properties kiln does not understand
	// instead of refusing the action.
	IgnoreUnknownPlatformProperties bool `yaml:"ignore-unknown-platform-properties"`
	// VerifyRate is the fraction of actions checked for determinism (sampled by digest).
	VerifyRate float64 `yaml:"verify-rate"`
}

// Defaults of ExecutionConfig's zero values.
const (
	DefaultMaxQueue   = 10000
	DefaultTimeout    = 15 * time.Minute
	DefaultMaxTimeout = time.Hour
)

// Resolved returns c with every default made explicit: the number of CPUs for
// Concurrency 0, then that concurrency for Prestart -1, and the default queue bound
// and timeouts. Open runs with the resolved settings, and kiln serve --print-config
// prints them.
func (c ExecutionConfig) Resolved() ExecutionConfig {
	if c.Concurrency <= 0 {
		c.Concurrency = runtime.NumCPU()
	}
	if c.Prestart < 0 {
		c.Prestart = c.Concurrency
	}
	if c.MaxQueue <= 0 {
		c.MaxQueue = DefaultMaxQueue
	}
	if c.DefaultTimeout <= 0 {
		c.DefaultTimeout = DefaultTimeout
	}
	if c.MaxTimeout <= 0 {
		c.MaxTimeout = DefaultMaxTimeout
	}
	return c
}

// Resolved returns o with its execution and storage settings resolved.
func (o Options) Resolved() Options {
	o.Execution = o.Execution.Resolved()
	if o.Storage.S3 != nil {
		c := o.Storage.S3.Resolved()
		o.Storage.S3 = &c
	}
	return o
}
