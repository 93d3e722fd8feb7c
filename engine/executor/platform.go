package executor

import (
	"sort"
	"strconv"
	"strings"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Platform properties kiln understands. Anything else is refused (INVALID_ARGUMENT),
// so a property a client relies on is never silently ignored, unless the server runs
// with --ignore-unknown-platform-properties.
const (
	// PropContainerImage selects the toolchain: docker://NAME@sha256:HEX, NAME@sha256:HEX
	// or sha256:HEX. Tags without a digest are refused unless a lockfile pins them.
	PropContainerImage = "container-image"
	// PropVerify runs the action N times before its result is cached (kiln-verify=N).
	PropVerify = "kiln-verify"
	// PropOSFamily and PropArch are accepted when they describe this executor.
	PropOSFamily = "OSFamily"
	PropArch     = "Arch"
)

// Platform is the parsed platform of an action.
type Platform struct {
	ContainerImage string
	VerifyRuns     int
}

// parsePlatform validates properties (sorted by name, unique, known) and parses them.
func parsePlatform(p *repb.Platform, ignoreUnknown bool) (Platform, error) {
	var out Platform
	props := p.GetProperties()
	if !sort.SliceIsSorted(props, func(i, j int) bool { return props[i].GetName() < props[j].GetName() }) {
		return out, status.Error(codes.InvalidArgument, "platform properties are not sorted by name")
	}
	for i, pr := range props {
		if i > 0 && props[i-1].GetName() == pr.GetName() {
			return out, status.Errorf(codes.InvalidArgument, "platform property %q given twice", pr.GetName())
		}
		v := pr.GetValue()
		switch pr.GetName() {
		case PropContainerImage:
			out.ContainerImage = v
		case PropVerify:
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 10 {
				return out, status.Errorf(codes.InvalidArgument, "platform property %s=%q: want a run count from 1 to 10", PropVerify, v)
			}
			out.VerifyRuns = n
		case PropOSFamily:
			if !strings.EqualFold(v, "linux") {
				return out, status.Errorf(codes.InvalidArgument, "platform property OSFamily=%q: this executor runs Linux", v)
			}
		case PropArch:
			if l := strings.ToLower(v); l != "x86_64" && l != "amd64" && l != "x86-64" {
				return out, status.Errorf(codes.InvalidArgument, "platform property Arch=%q: this executor runs x86_64", v)
			}
		default:
			if !ignoreUnknown {
				return out, status.Errorf(codes.InvalidArgument, "unknown platform property %q (kiln understands %s, %s, %s and %s)", pr.GetName(), PropContainerImage, PropVerify, PropOSFamily, PropArch)
			}
		}
	}
	return out, nil
}
