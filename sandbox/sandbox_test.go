package sandbox_test

import (
	"testing"
)

func TestRunEcho(t *testing.T) {
	r := newRunner(t)
	o := run(t, r, nil, "/bin/sh", "-c", "echo hello; exit 3")
	if o.res.ExitCode != 3 || o.stdout != "hello\n" {
		t.Fatalf("%+v %q", o.res, o.stdout)
	}
}
