package reapi

import (
	"context"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	smpb "github.com/bazelbuild/remote-apis/build/bazel/semver"
)

// LowAPIVersion and HighAPIVersion bound the REAPI versions kiln serves: 2.0 clients
// such as Bazel 4.2.3 (output_files/output_directories) up to 2.3 (digest_function in
// requests and resource names, output_paths, compressed blobs).
var (
	LowAPIVersion  = &smpb.SemVer{Major: 2, Minor: 0}
	HighAPIVersion = &smpb.SemVer{Major: 2, Minor: 3}
)

type capabilities struct{ s *Server }

func (c capabilities) GetCapabilities(_ context.Context, req *repb.GetCapabilitiesRequest) (*repb.ServerCapabilities, error) {
	if err := CheckInstance(req.GetInstanceName()); err != nil {
		return nil, err
	}
	return &repb.ServerCapabilities{
		CacheCapabilities: &repb.CacheCapabilities{
			DigestFunctions: []repb.DigestFunction_Value{repb.DigestFunction_SHA256},
			ActionCacheUpdateCapabilities: &repb.ActionCacheUpdateCapabilities{
				UpdateEnabled: c.s.opts.AllowClientACWrites,
			},
			MaxBatchTotalSizeBytes:          MaxBatchSize,
			SymlinkAbsolutePathStrategy:     repb.SymlinkAbsolutePathStrategy_DISALLOWED,
			SupportedCompressors:            []repb.Compressor_Value{repb.Compressor_ZSTD},
			SupportedBatchUpdateCompressors: []repb.Compressor_Value{repb.Compressor_ZSTD},
		},
		ExecutionCapabilities: c.s.opts.ExecutionCapabilities,
		LowApiVersion:         LowAPIVersion,
		HighApiVersion:        HighAPIVersion,
	}, nil
}
