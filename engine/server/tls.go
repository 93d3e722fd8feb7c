package server

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TLSFiles names the PEM files of the gRPC listener's TLS: the server's certificate
// chain and key, and optionally the CAs whose client certificates it requires (mTLS).
type TLSFiles struct {
	Cert     string `yaml:"tls-cert"`
	Key      string `yaml:"tls-key"`
	ClientCA string `yaml:"tls-client-ca"`
}

// Enabled reports whether TLS is configured.
func (f TLSFiles) Enabled() bool { return f.Cert != "" || f.Key != "" || f.ClientCA != "" }

// Check refuses incomplete configurations.
func (f TLSFiles) Check() error {
	switch {
	case (f.Cert == "") != (f.Key == ""):
		return status.Error(codes.InvalidArgument, "--tls-cert and --tls-key go together")
	case f.ClientCA != "" && f.Cert == "":
		return status.Error(codes.InvalidArgument, "--tls-client-ca needs --tls-cert and --tls-key: client certificates are checked over TLS")
	}
	return nil
}

// tlsReloader serves the files' current contents: each handshake checks whether a file
// changed (inode, size, mtime) and reloads it, so short-lived certificates are rotated
// by replacing the files, without a restart. A file that fails to load (a rotation
// half done) keeps the last good version in use, with a warning.
type tlsReloader struct {
	files TLSFiles
	log   *slog.Logger

	mu      sync.Mutex
	stamp   [3]fileStamp // of the files current was loaded from
	failed  [3]fileStamp // of the files that last failed to load: not retried until they change
	current *tls.Config
}

// fileStamp identifies one version of a file.
type fileStamp struct {
	ino, size uint64
	mtime     time.Time
}

func stampOf(path string) (fileStamp, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{}, err
	}
	st := fileStamp{size: uint64(fi.Size()), mtime: fi.ModTime()}
	if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
		st.ino = sys.Ino
	}
	return st, nil
}

// ServerTLS returns a listener's TLS configuration (reloading rotated files), after loading every file once
// (so that a bad file stops the server at start, with the reason).
func ServerTLS(f TLSFiles, log *slog.Logger) (*tls.Config, error) {
	r := &tlsReloader{files: f, log: log}
	if err := r.reload(true); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "tls: %v", err)
	}
	return &tls.Config{
		MinVersion:         tls.VersionTLS12,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) { return r.config(), nil },
	}, nil
}

// config returns the configuration for one handshake, reloading what changed.
func (r *tlsReloader) config() *tls.Config {
	if err := r.reload(false); err != nil {
		r.log.Warn("tls: keeping the certificates already loaded", "err", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.current
}

// reload re-reads the files if any changed (or if force).
func (r *tlsReloader) reload(force bool) error {
	paths := [3]string{r.files.Cert, r.files.Key, r.files.ClientCA}
	var stamp [3]fileStamp
	for i, p := range paths {
		if p == "" {
			continue
		}
		st, err := stampOf(p)
		if err != nil {
			return err
		}
		stamp[i] = st
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if !force && (stamp == r.stamp || stamp == r.failed) {
		return nil // unchanged, or the same broken files as last time (warned once)
	}
	cfg, err := r.load()
	if err != nil {
		r.failed = stamp
		return err
	}
	r.stamp, r.current = stamp, cfg
	if leaf := cfg.Certificates[0].Leaf; leaf != nil {
		r.log.Info("tls: certificate loaded", "subject", leaf.Subject.String(), "not_after", leaf.NotAfter.UTC(),
			"client_certificates", r.files.ClientCA != "")
	}
	return nil
}

// load reads the files into a server configuration.
func (r *tlsReloader) load() (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(r.files.Cert, r.files.Key)
	if err != nil {
		return nil, fmt.Errorf("server certificate %s, key %s: %w", r.files.Cert, r.files.Key, err)
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, NextProtos: []string{"h2"}, Certificates: []tls.Certificate{cert}}
	if r.files.ClientCA != "" {
		pem, err := os.ReadFile(r.files.ClientCA)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("client CAs %s: no PEM certificate in it", r.files.ClientCA)
		}
		cfg.ClientCAs, cfg.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}
