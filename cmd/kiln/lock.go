package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/cache/disk"
	"github.com/kilnbuild/kiln/engine"
	"github.com/kilnbuild/kiln/lockfiles"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// lockFlags are the flags every `kiln lock` subcommand shares.
type lockFlags struct {
	data     string
	storage  engine.StorageConfig
	lockfile string
	json     bool
}

func (l *lockFlags) register(cmd *cobra.Command) {
	addDataFlag(cmd, &l.data)
	addStorageFlag(cmd, &l.storage)
	cmd.Flags().StringVar(&l.lockfile, "lockfile", lockfiles.DefaultName, "lockfile to read and write")
	cmd.Flags().BoolVar(&l.json, "json", false, "print results as JSON")
}

// lockStore is the CAS the lock commands fetch into and verify: the data dir's disk
// store (never bounded here: a server owns eviction), or with --storage the bucket
// with the disk store as its local tier.
type lockStore struct {
	cache.BlobStore
	local *disk.Store
	close func()
}

func (s lockStore) Close() { s.close() }

// Has reports whether the store holds d (in the bucket, with --storage).
func (s lockStore) Has(ctx context.Context, d cache.Digest) bool {
	m, err := s.FindMissing(ctx, []cache.Digest{d})
	return err == nil && len(m) == 0
}

func (l *lockFlags) openStore(ctx context.Context) (lockStore, error) {
	cas, local, _, done, err := engine.OpenCAS(ctx, engine.DataDir(l.data), l.storage, quietLogger())
	if err != nil {
		return lockStore{}, err
	}
	return lockStore{cas, local, done}, nil
}

// withAllowHint adds how to follow a refused redirect to a fetch error.
func withAllowHint(err error) error {
	if s, ok := status.FromError(err); ok && s.Code() == codes.PermissionDenied && strings.Contains(s.Message(), "redirect to") {
		return status.Error(codes.PermissionDenied, s.Message()+" (if that host is trusted, pass --allow HOST)")
	}
	return err
}

// plain turns a gRPC status error into its message, for one-line CLI errors.
func plain(err error) error {
	if err == nil {
		return nil
	}
	var list lockfiles.ErrorList
	if errors.As(err, &list) {
		return err
	}
	if s, ok := status.FromError(err); ok {
		return errors.New(s.Message())
	}
	return err
}

func newLockCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "lock",
		Short: "Pin external dependencies and toolchains by digest in kiln.lock, and check the cache against it",
	}
	cmd.AddCommand(newLockAddCmd(), newLockVerifyCmd(), newLockFetchCmd(), newLockPinToolchainCmd())
	return cmd
}

// fetchFlags configure the fetcher of `lock add` and `lock fetch`.
type fetchFlags struct {
	allow   []string
	maxSize string
	timeout time.Duration
}

func (f *fetchFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringSliceVar(&f.allow, "allow", nil, "also allow downloads (and redirects) from this host or host:port (repeatable)")
	cmd.Flags().StringVar(&f.maxSize, "max-size", "4GiB", "refuse downloads larger than this")
	cmd.Flags().DurationVar(&f.timeout, "timeout", lockfiles.DefaultTimeout, "bound on one download attempt")
}

// fetcher builds a Fetcher allowing the hosts of urls plus --allow: the user named those
// URLs, and every download is checked by digest; a redirect elsewhere needs --allow.
func (f *fetchFlags) fetcher(urls []string) (*lockfiles.Fetcher, error) {
	max, err := parseSize(f.maxSize)
	if err != nil {
		return nil, err
	}
	allow := append([]string(nil), f.allow...)
	for _, s := range urls {
		if u, err := url.Parse(s); err == nil && u.Host != "" {
			allow = append(allow, u.Host)
		}
	}
	fe, err := lockfiles.NewFetcher(lockfiles.FetcherOptions{Allow: allow, MaxSize: max, Timeout: f.timeout, UserAgent: "kiln/" + version})
	return fe, plain(err)
}

// loadOrNew loads the lockfile, or starts an empty one if it does not exist.
func loadOrNew(path string) (*lockfiles.Lockfile, error) {
	l, err := lockfiles.Load(path)
	if status.Code(err) == codes.NotFound {
		return lockfiles.New(), nil
	}
	return l, plain(err)
}

// archiveSuffixes maps URL suffixes to archive types, longest first.
var archiveSuffixes = []struct{ suffix, typ string }{
	{".tar.bz2", "tar.bz2"}, {".tar.gz", "tar.gz"}, {".tar.xz", "tar.xz"}, {".tar.zst", "tar.zst"},
	{".tbz", "tbz"}, {".tgz", "tgz"}, {".txz", "txz"}, {".tzst", "tzst"},
	{".zip", "zip"}, {".jar", "jar"}, {".war", "war"}, {".aar", "aar"}, {".tar", "tar"}, {".deb", "deb"}, {".7z", "7z"},
}

func guessArchive(rawURL string) string {
	u, err := url.Parse(rawURL)
	if err != nil {
		return ""
	}
	p := strings.ToLower(path.Base(u.Path))
	for _, s := range archiveSuffixes {
		if strings.HasSuffix(p, s.suffix) {
			return s.typ
		}
	}
	return ""
}

// depJSON is how the lock commands print a dependency.
type depJSON struct {
	Name        string   `json:"name"`
	URLs        []string `json:"urls"`
	SHA256      string   `json:"sha256,omitempty"`
	Integrity   string   `json:"integrity,omitempty"`
	Size        int64    `json:"size,omitempty"`
	Archive     string   `json:"archive,omitempty"`
	StripPrefix string   `json:"strip_prefix,omitempty"`
}

func newLockAddCmd() *cobra.Command {
	var (
		lf                   lockFlags
		ff                   fetchFlags
		sha, integrity       string
		archive, stripPrefix string
		replace              bool
	)
	cmd := &cobra.Command{
		Use:   "add NAME URL...",
		Short: "Download a dependency, hash it, store it in the CAS and pin it in the lockfile",
		Long: `Download NAME from the first URL that serves it (the others are mirrors), store it in
the CAS and record its URLs, SHA-256 and size in the lockfile. With --sha256 or
--integrity the download must match; without, the content is trusted on first use:
review the recorded digest against the publisher's.`,
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			name, urls := args[0], args[1:]
			for _, u := range urls {
				if msg := lockfiles.CheckURL(u); msg != "" {
					return fmt.Errorf("URL %s: %s", lockfiles.RedactURL(u), msg)
				}
			}
			l, err := loadOrNew(lf.lockfile)
			if err != nil {
				return err
			}
			if _, exists := l.Dependencies[name]; exists && !replace {
				return fmt.Errorf("dependency %q is already in %s (use --replace to re-pin it)", name, lf.lockfile)
			}
			var want []lockfiles.Checksum
			if sha != "" {
				c, err := lockfiles.ParseSHA256Hex(sha)
				if err != nil {
					return plain(err)
				}
				want = append(want, c)
			}
			if integrity != "" {
				c, err := lockfiles.ParseSRI(integrity)
				if err != nil {
					return plain(err)
				}
				if want, err = lockfiles.MergeChecksums(want, []lockfiles.Checksum{c}); err != nil {
					return fmt.Errorf("--sha256 and --integrity disagree: %v", err)
				}
			}
			f, err := ff.fetcher(urls)
			if err != nil {
				return err
			}
			store, err := lf.openStore(ctx)
			if err != nil {
				return plain(err)
			}
			defer store.Close()
			bar := newProgress(os.Stderr, name)
			res, err := f.Fetch(ctx, store, lockfiles.Request{URLs: urls, Want: want, Progress: bar.update})
			bar.done()
			if err != nil {
				return plain(withAllowHint(err))
			}
			sha256c, _ := lockfiles.FindAlgo(res.Checksums, lockfiles.SHA256)
			dep := lockfiles.Dependency{URLs: urls, SHA256: sha256c.Hex(), Size: res.Digest.Size, Archive: archive, StripPrefix: stripPrefix}
			if integrity != "" && !strings.HasPrefix(integrity, lockfiles.SHA256+"-") {
				dep.Integrity = integrity
			}
			if dep.Archive == "" {
				dep.Archive = guessArchive(urls[0])
			}
			if err := l.SetDependency(name, dep); err != nil {
				return plain(err)
			}
			if err := l.Save(lf.lockfile); err != nil {
				return plain(err)
			}
			if lf.json {
				return printJSON(cmd.OutOrStdout(), depJSON{name, dep.URLs, dep.SHA256, dep.Integrity, dep.Size, dep.Archive, dep.StripPrefix})
			}
			fmt.Fprintf(cmd.OutOrStdout(), "pinned %s: sha256:%s (%d bytes) from %s\n", name, dep.SHA256, dep.Size, lockfiles.RedactURL(res.URL))
			return nil
		},
	}
	lf.register(cmd)
	ff.register(cmd)
	cmd.Flags().StringVar(&sha, "sha256", "", "expected SHA-256 (hex); the download must match")
	cmd.Flags().StringVar(&integrity, "integrity", "", "expected Subresource Integrity (sha256-, sha384- or sha512-BASE64)")
	cmd.Flags().StringVar(&archive, "archive", "", "archive type (default: from the URL's suffix)")
	cmd.Flags().StringVar(&stripPrefix, "strip-prefix", "", "directory prefix to strip when unpacking")
	cmd.Flags().BoolVar(&replace, "replace", false, "re-pin a dependency that is already in the lockfile")
	return cmd
}

// lockVerifyResult is one dependency's state in the CAS.
type lockVerifyResult struct {
	Name   string `json:"name"`
	Digest string `json:"digest,omitempty"`
	Status string `json:"status"` // ok, missing, corrupt, mismatch, unverifiable
	Detail string `json:"detail,omitempty"`
}

// verifyDependency re-hashes the stored bytes of d in every algorithm it pins.
func verifyDependency(ctx context.Context, store lockStore, d *lockfiles.Dependency) lockVerifyResult {
	r := lockVerifyResult{Name: d.Name}
	want, err := d.Checksums()
	if err != nil {
		r.Status, r.Detail = "unverifiable", status.Convert(err).Message()
		return r
	}
	sha, ok := lockfiles.FindAlgo(want, lockfiles.SHA256)
	if !ok {
		r.Status, r.Detail = "unverifiable", "no sha256 pinned, so the CAS cannot be searched (re-pin with kiln lock add)"
		return r
	}
	size := d.Size
	if size <= 0 {
		info, err := os.Stat(store.local.BlobPath(cache.Digest{Hash: sha.Hex()}))
		if err != nil {
			r.Digest, r.Status, r.Detail = sha.String(), "missing", "not in the CAS"
			return r
		}
		size = info.Size()
	}
	dg := cache.Digest{Hash: sha.Hex(), Size: size}
	r.Digest = dg.String()
	rc, err := store.Get(ctx, dg, 0)
	if err != nil {
		r.Status, r.Detail = "missing", status.Convert(err).Message()
		return r
	}
	defer rc.Close()
	hs := lockfiles.NewHashes(want)
	if _, err := io.Copy(hs, rc); err != nil {
		if status.Code(err) == codes.DataLoss {
			r.Status, r.Detail = "corrupt", "stored bytes do not match the digest; the blob was removed (run kiln lock fetch)"
		} else {
			r.Status, r.Detail = "missing", status.Convert(err).Message()
		}
		return r
	}
	for _, c := range want {
		got := hs.Sum(c.Algo)
		if !got.Equal(c) {
			r.Status, r.Detail = "mismatch", fmt.Sprintf("stored bytes hash to %s, pinned %s", got, c)
			return r
		}
	}
	r.Status = "ok"
	return r
}

func newLockVerifyCmd() *cobra.Command {
	var lf lockFlags
	cmd := &cobra.Command{
		Use:   "verify",
		Short: "Check that every pinned dependency is in the CAS and its stored bytes match their digests",
		Long: `Re-hash the stored bytes of every dependency in the lockfile. Exit 0 if all match,
1 with the list of those missing or corrupt otherwise (a corrupt blob is removed, so
kiln lock fetch can fetch it again). Toolchain pins are checked when they are resolved.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			l, err := lockfiles.Load(lf.lockfile)
			if err != nil {
				return plain(err)
			}
			store, err := lf.openStore(ctx)
			if err != nil {
				return plain(err)
			}
			defer store.Close()
			var results []lockVerifyResult
			var bad []string
			for _, name := range l.DependencyNames() {
				r := verifyDependency(ctx, store, l.Dependencies[name])
				results = append(results, r)
				if r.Status != "ok" {
					bad = append(bad, fmt.Sprintf("%s (%s)", name, r.Status))
				}
			}
			out := cmd.OutOrStdout()
			if lf.json {
				if err := printJSON(out, struct {
					OK           bool               `json:"ok"`
					Dependencies []lockVerifyResult `json:"dependencies"`
				}{len(bad) == 0, append([]lockVerifyResult{}, results...)}); err != nil {
					return err
				}
			} else {
				for _, r := range results {
					line := fmt.Sprintf("%-8s %s %s", r.Status, r.Name, r.Digest)
					if r.Detail != "" {
						line += ": " + r.Detail
					}
					fmt.Fprintln(out, line)
				}
			}
			if len(bad) > 0 {
				return &exitError{code: 1, msg: fmt.Sprintf("%d of %d dependencies failed verification: %s", len(bad), len(results), strings.Join(bad, ", "))}
			}
			if !lf.json {
				fmt.Fprintf(out, "all %d dependencies verified\n", len(results))
			}
			return nil
		},
	}
	lf.register(cmd)
	return cmd
}

// fetchResult is one dependency's outcome in `kiln lock fetch`.
type fetchResult struct {
	Name   string `json:"name"`
	Status string `json:"status"` // present, fetched, failed
	Digest string `json:"digest,omitempty"`
	URL    string `json:"url,omitempty"`
	Error  string `json:"error,omitempty"`
}

func newLockFetchCmd() *cobra.Command {
	var (
		lf lockFlags
		ff fetchFlags
	)
	cmd := &cobra.Command{
		Use:   "fetch",
		Short: "Fill the CAS with every pinned dependency, each download verified against its pin",
		Long: `Download every dependency of the lockfile that the CAS does not hold, from the hosts of
its URLs (and --allow, for redirects), and store it only if it matches its pinned
digest. Exit 1 with the list of failures if any.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			l, err := lockfiles.Load(lf.lockfile)
			if err != nil {
				return plain(err)
			}
			var urls []string
			for _, d := range l.Dependencies {
				urls = append(urls, d.URLs...)
			}
			f, err := ff.fetcher(urls)
			if err != nil {
				return err
			}
			store, err := lf.openStore(ctx)
			if err != nil {
				return plain(err)
			}
			defer store.Close()
			var results []fetchResult
			var bad []string
			out := cmd.OutOrStdout()
			for _, name := range l.DependencyNames() {
				d := l.Dependencies[name]
				r := fetchResult{Name: name}
				if dg, ok := d.Digest(); ok && store.Has(ctx, dg) {
					r.Status, r.Digest = "present", dg.String()
				} else if want, err := d.Checksums(); err != nil {
					r.Status, r.Error = "failed", status.Convert(err).Message()
				} else {
					bar := newProgress(os.Stderr, name)
					res, err := f.Fetch(ctx, store, lockfiles.Request{URLs: d.URLs, Want: want, Size: d.Size, Progress: bar.update})
					bar.done()
					if err != nil {
						r.Status, r.Error = "failed", status.Convert(withAllowHint(err)).Message()
					} else {
						r.Status, r.Digest, r.URL = "fetched", res.Digest.String(), lockfiles.RedactURL(res.URL)
					}
				}
				if r.Status == "failed" {
					bad = append(bad, name)
				}
				results = append(results, r)
				if !lf.json {
					line := fmt.Sprintf("%-8s %s %s", r.Status, name, r.Digest)
					if r.Error != "" {
						line += ": " + r.Error
					}
					fmt.Fprintln(out, line)
				}
			}
			if lf.json {
				if err := printJSON(out, struct {
					OK           bool          `json:"ok"`
					Dependencies []fetchResult `json:"dependencies"`
				}{len(bad) == 0, append([]fetchResult{}, results...)}); err != nil {
					return err
				}
			}
			if len(bad) > 0 {
				return &exitError{code: 1, msg: fmt.Sprintf("%d of %d dependencies could not be fetched: %s", len(bad), len(results), strings.Join(bad, ", "))}
			}
			return nil
		},
	}
	lf.register(cmd)
	ff.register(cmd)
	return cmd
}

// imageDigestRe finds a sha256 image digest in a reference.
var imageDigestRe = regexp.MustCompile(`(?:^|@)(sha256:[0-9a-f]{64})$`)

func newLockPinToolchainCmd() *cobra.Command {
	var lf lockFlags
	cmd := &cobra.Command{
		Use:   "pin-toolchain NAME REF",
		Short: "Pin a toolchain name or image tag to the manifest digest in REF",
		Long: `Record that the toolchain NAME (a name or an image tag such as debian:12, as written in
a container-image platform property) means the image whose manifest digest REF holds.
REF must contain the digest: IMAGE@sha256:HEX or sha256:HEX.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			name, ref := args[0], strings.TrimPrefix(args[1], "docker://")
			m := imageDigestRe.FindStringSubmatch(ref)
			if m == nil {
				return fmt.Errorf("reference %q has no digest: want IMAGE@sha256:<64 hex> or sha256:<64 hex> (a tag alone could change under you)", args[1])
			}
			l, err := loadOrNew(lf.lockfile)
			if err != nil {
				return err
			}
			t := lockfiles.Toolchain{Digest: m[1], Source: args[1]}
			if err := l.SetToolchain(name, t); err != nil {
				return plain(err)
			}
			if err := l.Save(lf.lockfile); err != nil {
				return plain(err)
			}
			if lf.json {
				return printJSON(cmd.OutOrStdout(), struct {
					Name   string `json:"name"`
					Digest string `json:"digest"`
					Source string `json:"source"`
				}{name, t.Digest, t.Source})
			}
			fmt.Fprintf(cmd.OutOrStdout(), "pinned toolchain %s to %s\n", name, t.Digest)
			return nil
		},
	}
	lf.register(cmd)
	return cmd
}

// progress draws a one-line progress bar on a terminal; elsewhere it does nothing.
type progress struct {
	w     io.Writer
	name  string
	on    bool
	mu    sync.Mutex
	last  time.Time
	drawn bool
}

func newProgress(f *os.File, name string) *progress {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return &progress{w: f, name: name, on: err == nil}
}

func (p *progress) update(done, total int64) {
	if !p.on {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	if now.Sub(p.last) < 100*time.Millisecond && done != total {
		return
	}
	p.last = now
	const width = 30
	if total > 0 {
		n := int(done * width / total)
		fmt.Fprintf(p.w, "\r%-24.24s [%s%s] %3d%% %s / %s", p.name, strings.Repeat("=", n), strings.Repeat(" ", width-n), done*100/total, human(done), human(total))
	} else {
		fmt.Fprintf(p.w, "\r%-24.24s %s", p.name, human(done))
	}
	p.drawn = true
}

func (p *progress) done() {
	if p.on && p.drawn {
		fmt.Fprint(p.w, "\r\033[K")
	}
}

func human(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
