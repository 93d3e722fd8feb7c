// Package cluster runs kiln's remote execution on many machines: stateless frontends
// (an execution.Scheduler over NATS JetStream), workers that pull actions from a
// work-queue stream and run them with the same executor as kiln serve, and one
// sequencer that appends every worker's links to the transparency log. The queue's
// acknowledgement and redelivery are the lease; operation state lives in a JetStream
// key-value bucket; blobs, action-cache entries and links live in shared storage
// (docs/cluster.md).
package cluster

import (
	"fmt"
	"net/url"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Embedded is the Config.URL that runs JetStream inside kiln serve.
const Embedded = "embedded"

// Config is how a kiln process joins a cluster: kiln serve's cluster: section and the
// --cluster flags of serve, worker, sequencer and the cluster commands. The zero value
// is no cluster.
type Config struct {
	// URL lists the NATS servers, nats://HOST:PORT[,nats://HOST:PORT...] (tls:// to
	// require TLS), or is "embedded": JetStream in this kiln serve process.
	URL string `yaml:"url,omitempty"`
	// Listen is where an embedded JetStream accepts connections (workers connect there).
	Listen string `yaml:"listen,omitempty"`
	// Creds is a NATS credentials file (user JWT and NKey seed), re-read at every
	// (re)connection, so a rotated file is used without a restart.
	Creds string `yaml:"creds,omitempty"`
	// TLSCert and TLSKey are a client certificate, TLSCA the CAs that sign the
	// servers' certificates; all are re-read at every (re)connection.
	TLSCert string `yaml:"tls-cert,omitempty"`
	TLSKey  string `yaml:"tls-key,omitempty"`
	TLSCA   string `yaml:"tls-ca,omitempty"`
	// AckWait is how long a worker may go without telling the queue it still runs an
	// action (it does every AckWait/3) before the action is given to another worker.
	AckWait time.Duration `yaml:"ack-wait,omitempty"`
	// MaxDeliver is how many times an action is handed to a worker before it fails
	// (every worker that took it died or lost its lease).
	MaxDeliver int `yaml:"max-deliver,omitempty"`
	// Retain is how long operations and executions stay in the cluster's state after
	// their last change (WaitExecution and GetOperation answer them until then).
	Retain time.Duration `yaml:"retain,omitempty"`
}

// Defaults of Config's zero values.
const (
	DefaultAckWait    = 30 * time.Second
	DefaultMaxDeliver = 3
	DefaultRetain     = 24 * time.Hour
)

// Enabled reports whether c names a cluster.
func (c Config) Enabled() bool { return c.URL != "" }

// IsEmbedded reports whether c runs JetStream in this process.
func (c Config) IsEmbedded() bool { return c.URL == Embedded }

// Resolved returns c with its defaults made explicit.
func (c Config) Resolved() Config {
	if !c.Enabled() {
		return c
	}
	if c.AckWait <= 0 {
		c.AckWait = DefaultAckWait
	}
	if c.MaxDeliver <= 0 {
		c.MaxDeliver = DefaultMaxDeliver
	}
	if c.Retain <= 0 {
		c.Retain = DefaultRetain
	}
	return c
}

// Check refuses settings that cannot work (INVALID_ARGUMENT naming the flag).
func (c Config) Check() error {
	if !c.Enabled() {
		if c.Listen != "" {
			return status.Error(codes.InvalidArgument, "--cluster-listen needs --cluster embedded")
		}
		return nil
	}
	if c.IsEmbedded() {
		if c.Listen == "" {
			return status.Error(codes.InvalidArgument, "--cluster embedded needs --cluster-listen HOST:PORT (where workers connect)")
		}
	} else {
		if c.Listen != "" {
			return status.Error(codes.InvalidArgument, "--cluster-listen is for --cluster embedded only")
		}
		for _, u := range c.Servers() {
			p, err := url.Parse(u)
			if err != nil || p.Host == "" || (p.Scheme != "nats" && p.Scheme != "tls") {
				return status.Errorf(codes.InvalidArgument, "--cluster %q: want nats://HOST:PORT[,nats://HOST:PORT...] (or tls://), or embedded", c.URL)
			}
			if p.User != nil {
				return status.Errorf(codes.InvalidArgument, "--cluster %q: no credentials in the URL; use --cluster-creds FILE", c.URL)
			}
		}
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		return status.Error(codes.InvalidArgument, "--cluster-tls-cert and --cluster-tls-key go together")
	}
	if c.AckWait < 0 || (c.AckWait > 0 && c.AckWait < 300*time.Millisecond) {
		return status.Errorf(codes.InvalidArgument, "--ack-wait %v: want at least 300ms", c.AckWait)
	}
	if c.MaxDeliver < 0 {
		return status.Errorf(codes.InvalidArgument, "--max-deliver %d: want a positive count", c.MaxDeliver)
	}
	return nil
}

// Servers lists the server URLs of c.URL (host:port alone means nats://host:port).
func (c Config) Servers() []string {
	var out []string
	for _, s := range strings.Split(c.URL, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if !strings.Contains(s, "://") {
			s = "nats://" + s
		}
		out = append(out, s)
	}
	return out
}

// String is c.URL, for logs.
func (c Config) String() string {
	if c.IsEmbedded() {
		return fmt.Sprintf("embedded (%s)", c.Listen)
	}
	return c.URL
}
