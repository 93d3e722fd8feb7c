package attest

import "path/filepath"

// Paths are the places in a data directory that attestation uses. They all come from
// PathsFor, so the data-dir layout can change in one place.
type Paths struct {
	// CAS is the content-addressed store (cache/disk) where envelopes are stored for
	// REAPI clients.
	CAS string
	// Keys is the keyring (mode 0700): executor keys and the log key.
	Keys string
	// Log is the transparency log (tessera POSIX layout, C2SP tlog-tiles).
	Log string
	// Attest holds the attestation indexes and a durable copy of every envelope:
	//   index/<alg>/<aa>/<hex>      product digest -> envelope digests (one line each)
	//   actions/<aa>/<hex>          action digest -> envelope digests
	//   logidx/<aa>/<hex>           envelope digest -> log index (a hint; proofs decide)
	//   envelopes/<aa>/<hex>        the envelope bytes (the CAS may evict its copy)
	//   summaries/<aa>/<hex>        artifact sha256 -> its verification summaries (VSAs)
	Attest string
}

// PathsFor returns the attestation paths inside dataDir.
func PathsFor(dataDir string) Paths {
	return Paths{
		CAS:    filepath.Join(dataDir, "store"), // engine.DataDir.Store: a test keeps them equal
		Keys:   filepath.Join(dataDir, "keys"),
		Log:    filepath.Join(dataDir, "log"),
		Attest: filepath.Join(dataDir, "attest"),
	}
}
