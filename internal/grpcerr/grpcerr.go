// Package grpcerr wraps errors with context as gRPC statuses that keep the code and
// the details of the error they wrap, so a MISSING PreconditionFailure reaches the
// client with every violation however many layers added context to it.
package grpcerr

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Wrap prefixes err's message with the formatted context ("context: message") and
// keeps its code and details. An error that carries no status stays UNKNOWN (a
// context error becomes CANCELLED or DEADLINE_EXCEEDED). Wrap(nil, ...) is nil.
func Wrap(err error, format string, args ...any) error {
	return WrapCode(err, codes.Unknown, format, args...)
}

// WrapCode is Wrap, with code for an error that carries no status (or UNKNOWN).
func WrapCode(err error, code codes.Code, format string, args ...any) error {
	if err == nil {
		return nil
	}
	p := status.Convert(err).Proto() // a copy: code, message, details
	if codes.Code(p.GetCode()) == codes.Unknown {
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			code = status.FromContextError(err).Code()
		}
		p.Code = int32(code)
	}
	p.Message = fmt.Sprintf(format, args...) + ": " + p.GetMessage()
	return status.FromProto(p).Err()
}
