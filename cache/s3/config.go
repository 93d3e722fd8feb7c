package s3

import (
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Config names a bucket (and a key prefix in it) and how kiln uses it. Credentials are
// deliberately absent: they come from the AWS SDK's standard chain (environment,
// shared config files, instance or container roles), never from flags or URLs.
type Config struct {
	Bucket    string `yaml:"bucket"`
	Prefix    string `yaml:"prefix,omitempty"`     // key prefix, "" or ending in "/"
	Endpoint  string `yaml:"endpoint,omitempty"`   // e.g. https://s3.eu-west-1.amazonaws.com or http://127.0.0.1:7070; "" = AWS
	Region    string `yaml:"region,omitempty"`     // "" = the SDK's (AWS_REGION, shared config), else us-east-1
	PathStyle bool   `yaml:"path-style,omitempty"` // bucket in the path, not the host name (most S3-compatible servers)

	// ExistsTTL is how long a bucket lookup (a write, a read or a HEAD) answers
	// FindMissing without asking the bucket again; it bounds how late kiln notices a
	// blob deleted behind its back. 0 means DefaultExistsTTL.
	ExistsTTL time.Duration `yaml:"exists-ttl,omitempty"`
	// RefreshAfter is the object age after which a use (FindMissing, an action-cache
	// hit) rewrites the object's timestamp, so a lifecycle rule that expires objects
	// older than RefreshAfter plus the longest build never deletes a blob in use. 0
	// means DefaultRefreshAfter.
	RefreshAfter time.Duration `yaml:"refresh-after,omitempty"`
	// PartSize is the multipart part size; blobs larger than it are uploaded in parts.
	// 0 means DefaultPartSize; S3 needs at least 5 MiB.
	PartSize int64 `yaml:"-"`
	// Concurrency bounds parallel requests of one call (HEADs of a FindMissing, parts
	// of an upload). 0 means DefaultConcurrency.
	Concurrency int `yaml:"-"`
}

// Defaults for Config's zero values.
const (
	DefaultExistsTTL    = time.Hour
	DefaultRefreshAfter = 24 * time.Hour
	DefaultPartSize     = 16 << 20
	DefaultConcurrency  = 64
	minPartSize         = 5 << 20
)

// ParseURL parses s3://BUCKET[/PREFIX]?endpoint=URL&region=R[&path-style=true]
// [&exists-ttl=DURATION][&refresh-after=DURATION] (INVALID_ARGUMENT if malformed).
func ParseURL(s string) (Config, error) {
	bad := func(format string, args ...any) (Config, error) {
		return Config{}, status.Errorf(codes.InvalidArgument, "storage URL %q: %s", s, fmt.Sprintf(format, args...))
	}
	u, err := url.Parse(s)
	if err != nil {
		return bad("%v", err)
	}
	if u.Scheme != "s3" {
		return bad("want s3://BUCKET[/PREFIX]?endpoint=URL&region=R")
	}
	if u.User != nil {
		return bad("credentials do not belong in the URL; use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a shared config file or an instance role")
	}
	c := Config{Bucket: u.Host, Prefix: strings.Trim(u.Path, "/")}
	if c.Bucket == "" {
		return bad("no bucket")
	}
	if c.Prefix != "" {
		c.Prefix += "/"
	}
	for k, vs := range u.Query() {
		v := vs[len(vs)-1]
		switch k {
		case "endpoint":
			e, err := url.Parse(v)
			if err != nil || (e.Scheme != "http" && e.Scheme != "https") || e.Host == "" {
				return bad("endpoint %q: want http(s)://HOST[:PORT]", v)
			}
			c.Endpoint = strings.TrimSuffix(v, "/")
		case "region":
			c.Region = v
		case "path-style":
			if c.PathStyle, err = strconv.ParseBool(v); err != nil {
				return bad("path-style=%q: want true or false", v)
			}
		case "exists-ttl", "refresh-after":
			d, err := time.ParseDuration(v)
			if err != nil || d <= 0 {
				return bad("%s=%q: want a positive duration such as 1h", k, v)
			}
			if k == "exists-ttl" {
				c.ExistsTTL = d
			} else {
				c.RefreshAfter = d
			}
		default:
			return bad("unknown parameter %q (known: endpoint, region, path-style, exists-ttl, refresh-after)", k)
		}
	}
	return c, nil
}

// Check refuses a configuration that cannot name a bucket (INVALID_ARGUMENT), for
// one written in a configuration file rather than parsed from a URL.
func (c Config) Check() error {
	if c.Bucket == "" {
		return status.Error(codes.InvalidArgument, "storage: no bucket")
	}
	if c.Endpoint != "" {
		e, err := url.Parse(c.Endpoint)
		if err != nil || (e.Scheme != "http" && e.Scheme != "https") || e.Host == "" || e.User != nil {
			return status.Errorf(codes.InvalidArgument, "storage endpoint %q: want http(s)://HOST[:PORT]", c.Endpoint)
		}
	}
	if c.ExistsTTL < 0 || c.RefreshAfter < 0 {
		return status.Error(codes.InvalidArgument, "storage: exists-ttl and refresh-after must be positive")
	}
	return nil
}

// String is the storage URL (it never holds a secret).
func (c Config) String() string {
	q := url.Values{}
	if c.Endpoint != "" {
		q.Set("endpoint", c.Endpoint)
	}
	if c.Region != "" {
		q.Set("region", c.Region)
	}
	if c.PathStyle {
		q.Set("path-style", "true")
	}
	if c.ExistsTTL > 0 {
		q.Set("exists-ttl", c.ExistsTTL.String())
	}
	if c.RefreshAfter > 0 {
		q.Set("refresh-after", c.RefreshAfter.String())
	}
	s := "s3://" + c.Bucket + "/" + c.Prefix
	if len(q) > 0 {
		s += "?" + q.Encode()
	}
	return s
}

// Resolved returns c with every default made explicit (and the prefix ending in "/").
func (c Config) Resolved() Config {
	if c.Prefix = strings.Trim(c.Prefix, "/"); c.Prefix != "" {
		c.Prefix += "/"
	}
	if c.ExistsTTL <= 0 {
		c.ExistsTTL = DefaultExistsTTL
	}
	if c.RefreshAfter <= 0 {
		c.RefreshAfter = DefaultRefreshAfter
	}
	if c.PartSize <= 0 {
		c.PartSize = DefaultPartSize
	}
	if c.Concurrency <= 0 {
		c.Concurrency = DefaultConcurrency
	}
	return c
}
