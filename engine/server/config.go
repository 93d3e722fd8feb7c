package server

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"regexp"
	"strconv"
	"strings"

	"github.com/kilnbuild/kiln/engine"
	"github.com/kilnbuild/kiln/engine/cluster"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"gopkg.in/yaml.v3"
)

// Config configures `kiln serve`: the engine's options (store, execution, key) and the
// server's own (listeners, TLS, authorization, Remote Asset API, logs). It is also the
// configuration file (kiln serve --config): each setting's key is its flag's name, and
// a setting that is more than a flag gets its own section (a storage tree, a cluster)
// as one more field with its own key, without moving the others.
type Config struct {
	Listen     string `yaml:"listen"`      // gRPC address
	HTTPListen string `yaml:"http-listen"` // the web UI, /metrics and /healthz; empty disables
	// PublicURL is the web UI's base URL as clients reach it (a proxy's, a DNS name),
	// for the page links in failed actions' reports and errors; empty: the HTTP
	// listener's own address.
	PublicURL string `yaml:"public-url"`

	engine.Options `yaml:",inline"`

	// AllowClientACWrites lets clients write the action cache (cache-only servers).
	AllowClientACWrites bool `yaml:"allow-client-ac-writes"`
	// Lockfile and FetchAllow configure the Remote Asset API (package engine/asset):
	// serve only downloads pinned in the lockfile, from these hosts.
	Lockfile   string   `yaml:"lockfile"`
	FetchAllow []string `yaml:"fetch-allow"`
	// TLS, if enabled, makes the gRPC listener TLS (and mTLS with a client CA).
	TLS TLSFiles `yaml:",inline"`
	// HTTPTLS serves /metrics and /healthz over TLS too, with TLS's certificate (and
	// client certificates when TLS.ClientCA is set).
	HTTPTLS bool `yaml:"http-tls"`
	// AuthzFile, if set, is the authorization policy (package engine/auth, JSON): what
	// each client certificate, SPIFFE ID or token may do. Rules on certificates need
	// TLS.ClientCA, rules on tokens an OIDC issuer.
	AuthzFile string `yaml:"authz"`
	// OIDC configures bearer tokens.
	OIDC OIDCConfig `yaml:",inline"`
	// Cluster makes this server a stateless frontend of a cluster (docs/cluster.md):
	// actions run on the cluster's workers; the cluster: section of the file.
	Cluster cluster.Config `yaml:"cluster,omitempty"`
	// LogLevel and LogFormat are how kiln serve builds Options.Logger.
	LogLevel  string `yaml:"log-level"`
	LogFormat string `yaml:"log-format"`
	// Limits bound what clients can make the server hold (docs/serve.md, "Limits").
	Limits Limits `yaml:",inline"`
	// Ready, if set, is called with the bound addresses once the server accepts calls.
	Ready func(grpcAddr, httpAddr string) `yaml:"-"`
}

// Resolved returns c with every default made explicit, as Serve runs it.
func (c Config) Resolved() Config {
	c.Options = c.Options.Resolved()
	c.Limits = c.Limits.Resolved()
	c.Cluster = c.Cluster.Resolved()
	return c
}

// Check refuses settings that cannot work, or not together (INVALID_ARGUMENT, naming
// the flags).
func (c Config) Check() error {
	if r := c.Execution.VerifyRate; r < 0 || r > 1 || r != r {
		return status.Errorf(codes.InvalidArgument, "--verify-rate %v: want a fraction from 0 to 1", r)
	}
	if err := c.TLS.Check(); err != nil {
		return err
	}
	if err := c.Limits.Check(); err != nil {
		return err
	}
	if s := c.Storage.S3; s != nil {
		if err := s.Check(); err != nil {
			return err
		}
	}
	if err := c.checkCluster(); err != nil {
		return err
	}
	if err := c.OIDC.check(c); err != nil {
		return err
	}
	if c.AuthzFile != "" && c.TLS.ClientCA == "" && len(c.OIDC.Issuers) == 0 {
		return status.Error(codes.InvalidArgument, "--authz needs --tls-client-ca or --oidc-issuer: the policy names clients by their verified certificates or tokens")
	}
	if c.PublicURL != "" {
		u, err := url.Parse(c.PublicURL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
			return status.Errorf(codes.InvalidArgument, "--public-url %q: want an http:// or https:// URL without query, like https://kiln.example.com/", c.PublicURL)
		}
		if c.HTTPListen == "" {
			return status.Error(codes.InvalidArgument, "--public-url needs --http-listen (the web UI it points at)")
		}
	}
	if c.HTTPTLS && !c.TLS.Enabled() {
		return status.Error(codes.InvalidArgument, "--http-tls needs --tls-cert and --tls-key")
	}
	if c.AllowClientACWrites && !c.Execution.Disabled {
		// A client that may write results could plant one for any action this server
		// executes; the two roles do not mix.
		return status.Error(codes.InvalidArgument, "--allow-client-ac-writes is for cache-only deployments: add --no-execution (an executor must be the only writer of its action cache)")
	}
	return nil
}

var unknownField = regexp.MustCompile(`^line (\d+): field (\S+) not found in type \S+$`)

// Load reads a configuration file (YAML, or JSON, which YAML reads too) onto c: the
// keys it has replace c's values, the others stay. An unknown key is an error that
// names it and its line, as is a duplicate key or a value of the wrong type.
func (c *Config) Load(r io.Reader, name string) error {
	dec := yaml.NewDecoder(r)
	dec.KnownFields(true)
	err := dec.Decode(c)
	if errors.Is(err, io.EOF) {
		return nil // an empty file changes nothing
	}
	var te *yaml.TypeError
	if errors.As(err, &te) {
		msgs := make([]string, len(te.Errors))
		for i, e := range te.Errors {
			if m := unknownField.FindStringSubmatch(e); m != nil {
				e = fmt.Sprintf("line %s: unknown key %q", m[1], m[2])
			}
			msgs[i] = e
		}
		return status.Errorf(codes.InvalidArgument, "config %s: %s", name, strings.Join(msgs, "; "))
	}
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "config %s: %v", name, strings.TrimPrefix(err.Error(), "yaml: "))
	}
	return nil
}

// Marshal prints c as a configuration file Load reads back: YAML, or JSON with asJSON.
func (c Config) Marshal(asJSON bool) ([]byte, error) {
	y, err := yaml.Marshal(c)
	if err != nil || !asJSON {
		return y, err
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(y, &doc); err != nil {
		return nil, err
	}
	var b bytes.Buffer
	if err := writeJSON(&b, doc.Content[0], ""); err != nil {
		return nil, err
	}
	b.WriteByte('\n')
	return b.Bytes(), nil
}

// writeJSON writes a YAML node as JSON, keys in the YAML's order.
func writeJSON(b *bytes.Buffer, n *yaml.Node, indent string) error {
	switch n.Kind {
	case yaml.MappingNode:
		if len(n.Content) == 0 {
			b.WriteString("{}")
			return nil
		}
		b.WriteString("{\n")
		for i := 0; i < len(n.Content); i += 2 {
			k, _ := json.Marshal(n.Content[i].Value)
			b.WriteString(indent + "  " + string(k) + ": ")
			if err := writeJSON(b, n.Content[i+1], indent+"  "); err != nil {
				return err
			}
			if i+2 < len(n.Content) {
				b.WriteByte(',')
			}
			b.WriteByte('\n')
		}
		b.WriteString(indent + "}")
	case yaml.SequenceNode:
		b.WriteByte('[')
		for i, c := range n.Content {
			if i > 0 {
				b.WriteString(", ")
			}
			if err := writeJSON(b, c, indent); err != nil {
				return err
			}
		}
		b.WriteByte(']')
	case yaml.ScalarNode:
		switch n.ShortTag() {
		case "!!int", "!!float":
			if _, err := strconv.ParseFloat(n.Value, 64); err != nil {
				return fmt.Errorf("config: %q is not a JSON number", n.Value)
			}
			b.WriteString(n.Value)
		case "!!bool":
			b.WriteString(n.Value)
		case "!!null":
			b.WriteString("null")
		default:
			v, _ := json.Marshal(n.Value)
			b.Write(v)
		}
	default:
		return fmt.Errorf("config: cannot print a YAML %v node as JSON", n.Kind)
	}
	return nil
}
