package test

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnbuild/kiln/test/harness"
)

// TestMissingBlobsReachTheCLI: an input blob lost from the store after a build reaches
// the user of kiln verify and of kiln rebuild as that blob's digest, through every
// layer that adds context to the error on the way (issue 12, defect 2).
func TestMissingBlobsReachTheCLI(t *testing.T) {
	c := newChain(t, "tr a-z A-Z < gen.txt > final.txt")
	prov := filepath.Join(t.TempDir(), "prov.json")
	if res := harness.Run(t, "attest", "provenance", "--data", c.data, "--subject", c.subject, "--out", prov); res.Code != 0 {
		t.Fatalf("provenance: %s", res.Stderr)
	}
	lose := func(content string) string {
		t.Helper()
		sum := sha256.Sum256([]byte(content))
		h := hex.EncodeToString(sum[:])
		if err := os.Remove(filepath.Join(c.data, "store", "cas", h[:2], h)); err != nil {
			t.Fatalf("remove the blob of %q: %v", content, err)
		}
		return "sha256:" + h
	}

	// kiln verify of step 2, whose input gen.txt is gone: the baseline run cannot start.
	gen := lose("apple\nfig\npear\n")
	res := harness.Run(t, "verify", "--data", c.data, "--action", c.action2)
	if res.Code != 2 || !strings.Contains(res.Stderr, "verify run 1") || !strings.Contains(res.Stderr, "missing: "+gen) {
		t.Fatalf("kiln verify without its input: exit %d, stderr %q; want exit 2 naming %s", res.Code, res.Stderr, gen)
	}

	// kiln rebuild, whose first action's input (words) is gone.
	words := lose("pear\napple\nfig\n")
	res = harness.Run(t, "rebuild", prov, "--key", c.keys, "--data", c.data, "--out", filepath.Join(t.TempDir(), "vsa.json"))
	if res.Code == 0 || !strings.Contains(res.Stderr, "re-executing action") || !strings.Contains(res.Stderr, "missing: "+words) {
		t.Fatalf("kiln rebuild without an input: exit %d, stderr %q; want it to fail naming %s", res.Code, res.Stderr, words)
	}
}
