package engine

import (
	"testing"

	"github.com/kilnbuild/kiln/engine/attest"
)

// TestDataDirAgreesWithAttest: package attest cannot import engine, so its paths are
// written twice; this keeps them equal.
func TestDataDirAgreesWithAttest(t *testing.T) {
	d := DataDir("/data")
	p := attest.PathsFor(string(d))
	if p.CAS != d.Store() || p.Keys != d.Keys() || p.Log != d.Log() {
		t.Fatalf("attest paths %+v disagree with engine.DataDir (store %s, keys %s, log %s)", p, d.Store(), d.Keys(), d.Log())
	}
}
