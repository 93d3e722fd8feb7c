package history

import (
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/kilnbuild/kiln/cache"
	"github.com/kilnbuild/kiln/engine/attest"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Execution is what the scheduler knows of one finished execution or cache hit
// (scheduler.Finished, without importing the scheduler).
type Execution struct {
	Instance        string
	Action          cache.Digest
	Clients         []string
	Submitted, Done time.Time
	Outcome         string
	Response        *repb.ExecuteResponse
	Attest          time.Duration
}

// ServerLogName is the server_logs entry of a failed action's sandbox report.
const ServerLogName = "kiln-sandbox"

// RunFromExecution is the run the scheduler reports: outcome, clients, result
// (outputs, stdout, stderr, link), the sandbox report, the error and time by phase.
func RunFromExecution(e Execution) Run {
	r := Run{Time: e.Done.UTC(), Source: FromScheduler, Instance: e.Instance, Action: e.Action, Outcome: e.Outcome}
	for _, c := range e.Clients {
		if c == "" {
			c = "anonymous"
		}
		r.Clients = append(r.Clients, c)
	}
	resp := e.Response
	if st := resp.GetStatus(); st.GetCode() != int32(codes.OK) {
		r.Message = codes.Code(st.GetCode()).String() + ": " + st.GetMessage()
	} else if resp.GetMessage() != "" {
		r.Message = resp.GetMessage()
	}
	if l := resp.GetServerLogs()[ServerLogName]; l != nil {
		r.ServerLog, _ = cache.FromProto(l.GetDigest())
	}
	res := resp.GetResult()
	if res == nil {
		return r
	}
	r.ExitCode = int(res.GetExitCode())
	r.Stdout, _ = cache.FromProto(res.GetStdoutDigest())
	r.Stderr, _ = cache.FromProto(res.GetStderrDigest())
	if env, ok, _ := attest.LinkFromResult(res); ok {
		r.Envelope = env
	}
	for _, f := range res.GetOutputFiles() {
		r.Outputs = append(r.Outputs, Output{Path: f.GetPath(), SHA256: f.GetDigest().GetHash(), Size: f.GetDigest().GetSizeBytes()})
	}
	for _, d := range res.GetOutputDirectories() {
		r.Outputs = append(r.Outputs, Output{Path: d.GetPath()})
	}
	for _, l := range append(res.GetOutputFileSymlinks(), append(res.GetOutputDirectorySymlinks(), res.GetOutputSymlinks()...)...) {
		r.Outputs = append(r.Outputs, Output{Path: l.GetPath()})
	}
	sortOutputs(r.Outputs)
	if e.Outcome != Cached {
		r.Phases = Phases(res.GetExecutionMetadata(), e.Attest)
	}
	return r
}

// Phases is the time per phase an execution's metadata records, in the order
// kiln_execution_phase_seconds names them.
func Phases(md *repb.ExecutedActionMetadata, attestTime time.Duration) []Phase {
	var out []Phase
	add := func(name string, a, b *timestamppb.Timestamp) {
		if a != nil && b != nil {
			out = append(out, Phase{Name: name, Seconds: b.AsTime().Sub(a.AsTime()).Seconds()})
		}
	}
	add("queue", md.GetQueuedTimestamp(), md.GetWorkerStartTimestamp())
	add("input_fetch", md.GetInputFetchStartTimestamp(), md.GetInputFetchCompletedTimestamp())
	add("sandbox", md.GetExecutionStartTimestamp(), md.GetExecutionCompletedTimestamp())
	add("output_upload", md.GetOutputUploadStartTimestamp(), md.GetOutputUploadCompletedTimestamp())
	if attestTime > 0 {
		out = append(out, Phase{Name: "attest", Seconds: attestTime.Seconds()})
	}
	add("total", md.GetWorkerStartTimestamp(), md.GetWorkerCompletedTimestamp())
	return out
}
