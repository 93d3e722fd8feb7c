package cache

import (
	"strings"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// MissingBlobsError is the FAILED_PRECONDITION with one PreconditionFailure MISSING
// violation per absent blob ("blobs/HASH/SIZE") that REAPI prescribes, so clients know
// exactly what to upload.
func MissingBlobsError(msg string, missing []Digest) error {
	st := status.New(codes.FailedPrecondition, msg)
	pf := &errdetails.PreconditionFailure{}
	for _, d := range missing {
		pf.Violations = append(pf.Violations, &errdetails.PreconditionFailure_Violation{
			Type: "MISSING", Subject: "blobs/" + d.String(),
		})
	}
	if withDetails, err := st.WithDetails(pf); err == nil {
		st = withDetails
	}
	return st.Err()
}

// MissingFromError returns the blobs a MissingBlobsError names.
func MissingFromError(err error) []Digest {
	var out []Digest
	for _, det := range status.Convert(err).Details() {
		pf, ok := det.(*errdetails.PreconditionFailure)
		if !ok {
			continue
		}
		for _, v := range pf.GetViolations() {
			if v.GetType() != "MISSING" {
				continue
			}
			if d, err := ParseDigest(strings.TrimPrefix(v.GetSubject(), "blobs/")); err == nil {
				out = append(out, d)
			}
		}
	}
	return out
}
