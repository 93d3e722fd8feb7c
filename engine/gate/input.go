package gate

// Input is the document a policy sees as `input`. Every field is a fact kiln
// established itself (a signature it checked, an inclusion proof it verified, a pin it
// looked up); nothing is copied from an attestation that did not verify. docs/gate.md
// documents each field.
type Input struct {
	// Stage is the promotion stage asked for (--stage).
	Stage string `json:"stage"`
	// Now is the gate's clock (RFC 3339, UTC), against which ages are measured.
	Now        string           `json:"now"`
	Subject    SubjectFacts     `json:"subject"`
	Log        LogFacts         `json:"log"`
	Provenance ProvenanceFacts  `json:"provenance"`
	Chain      ChainFacts       `json:"chain"`
	Links      []LinkFacts      `json:"links"`
	Toolchains []ToolchainFacts `json:"toolchains"`
	// Dependencies are the external repositories the chain's sources come from.
	Dependencies []DependencyFacts `json:"dependencies"`
	Lockfile     LockfileFacts     `json:"lockfile"`
	SBOM         SBOMFacts         `json:"sbom"`
	VSAs         []VSAFacts        `json:"vsas"`
	// BuilderKeys are the key ids that signed the verified provenance and links.
	BuilderKeys []string `json:"builder_keys"`
}

// SubjectFacts is the artifact asked about.
type SubjectFacts struct {
	Name   string `json:"name"`
	SHA256 string `json:"sha256"`
	// Quarantined: the data dir's quarantine list holds the subject's digest.
	Quarantined      bool   `json:"quarantined"`
	QuarantineReason string `json:"quarantine_reason"`
}

// LogFacts is the transparency log links are proved against.
type LogFacts struct {
	// Verified: the latest checkpoint's signature verified with the trusted log key.
	Verified       bool   `json:"verified"`
	Error          string `json:"error"`
	Origin         string `json:"origin"`
	CheckpointSize int64  `json:"checkpoint_size"`
}

// KeyFacts is what the trust set says about the key of one signature.
type KeyFacts struct {
	// KeyID is the trusted key whose signature verified; "" when none did.
	KeyID string `json:"keyid"`
	// Trusted: a signature by a trusted key verified.
	Trusted bool `json:"trusted"`
	// NotBefore and NotAfter bound the key's validity (RFC 3339; NotAfter "" while
	// active, and for a PEM key given without validity).
	NotBefore string `json:"not_before"`
	NotAfter  string `json:"not_after"`
	// NotAfterLogSize is the log size at the key's retirement, -1 if none.
	NotAfterLogSize int64 `json:"not_after_log_size"`
	// ValidAtSigning: the key was valid when it signed — for a link, logged before the
	// key's retirement; for provenance and VSAs, its signed time within the key's
	// validity.
	ValidAtSigning bool `json:"valid_at_signing"`
}

// ProvenanceFacts is the SLSA provenance given with --provenance.
type ProvenanceFacts struct {
	Present bool   `json:"present"`
	Name    string `json:"name"`
	SHA256  string `json:"sha256"`
	// Verified: a DSSE signature by a trusted key over SLSA provenance v1 of kiln's
	// build type, whose subject is the subject.
	Verified bool     `json:"verified"`
	Error    string   `json:"error"`
	Key      KeyFacts `json:"key"`
	// SignedAt is runDetails.metadata.finishedOn, "" if absent; AgeSeconds is Now
	// minus it (0 when unknown).
	SignedAt   string  `json:"signed_at"`
	AgeSeconds float64 `json:"age_seconds"`
}

// ChainFacts is the chain of links from the subject back to its sources.
type ChainFacts struct {
	// From says how links were found: "provenance" (exactly the links it lists) or
	// "index" (the store's product index, when no provenance is given).
	From string `json:"from"`
	// Verified: every link verified, the subject is a product of one of them and every
	// material of every link is a source, a toolchain or another link's product.
	Verified bool     `json:"verified"`
	Failures []string `json:"failures"`
	Sources  int      `json:"sources"`
}

// LinkFacts is one link of the chain.
type LinkFacts struct {
	// Action is the action digest hash the link attests ("" if it could not be read).
	Action   string `json:"action"`
	Envelope string `json:"envelope"`
	// Verified: signature, log inclusion and key validity all checked out.
	Verified bool     `json:"verified"`
	Error    string   `json:"error"`
	Key      KeyFacts `json:"key"`
	// Logged: included in the log under its signed checkpoint, at LogIndex (-1 if not).
	Logged   bool  `json:"logged"`
	LogIndex int64 `json:"log_index"`
	// Toolchain is the SHA-256 of the toolchain image the action ran in ("" if none).
	Toolchain string `json:"toolchain"`
}

// ToolchainFacts is one toolchain image the chain's verified links ran in.
type ToolchainFacts struct {
	SHA256 string `json:"sha256"`
	// LockfileNames are the kiln.lock toolchain names pinned to this digest.
	LockfileNames []string `json:"lockfile_names"`
}

// DependencyFacts is one external repository the chain's sources come from (source
// paths external/NAME/...).
type DependencyFacts struct {
	Name  string `json:"name"`
	Files int    `json:"files"`
	// Pinned: kiln.lock has a dependency of this name; PinSHA256 is its pinned hash.
	Pinned    bool   `json:"pinned"`
	PinSHA256 string `json:"pin_sha256"`
}

// LockfileFacts is the kiln.lock given with --lockfile.
type LockfileFacts struct {
	Present bool   `json:"present"`
	Name    string `json:"name"`
	SHA256  string `json:"sha256"`
}

// SBOMFacts is the CycloneDX SBOM given with --sbom.
type SBOMFacts struct {
	Present bool   `json:"present"`
	Name    string `json:"name"`
	SHA256  string `json:"sha256"`
	// Matches: it describes the subject and lists exactly the verified chain's sources
	// and toolchains with their hashes.
	Matches bool     `json:"matches"`
	Errors  []string `json:"errors"`
}

// VSAFacts is one verification summary given with --vsa.
type VSAFacts struct {
	Name   string `json:"name"`
	SHA256 string `json:"sha256"`
	// Verified: a DSSE signature by a trusted key over a SLSA VSA v1 statement.
	Verified bool     `json:"verified"`
	Error    string   `json:"error"`
	Key      KeyFacts `json:"key"`
	// Result is verificationResult (PASSED or FAILED); the rest are its fields.
	Result       string  `json:"result"`
	Verifier     string  `json:"verifier"`
	Policy       string  `json:"policy"`
	TimeVerified string  `json:"time_verified"`
	AgeSeconds   float64 `json:"age_seconds"`
	// SubjectMatches: its subject is the subject. ProvenanceMatches: it names the given
	// provenance (by SHA-256) among its input attestations.
	SubjectMatches    bool `json:"subject_matches"`
	ProvenanceMatches bool `json:"provenance_matches"`
	// ByBuilder: signed by a key in BuilderKeys (not an independent rebuild).
	ByBuilder bool `json:"by_builder"`
}

// SampleInput is an input with every list holding one element, every field set: a
// policy is checked against it when loaded.
func SampleInput() *Input {
	k := KeyFacts{KeyID: "k", Trusted: true, NotBefore: "2000-01-01T00:00:00Z", NotAfterLogSize: -1, ValidAtSigning: true}
	return &Input{
		Stage: "sample", Now: "2000-01-01T00:00:00Z",
		Subject:      SubjectFacts{Name: "s", SHA256: "s"},
		Log:          LogFacts{Verified: true, Origin: "o", CheckpointSize: 1},
		Provenance:   ProvenanceFacts{Present: true, Name: "p", SHA256: "p", Verified: true, Key: k, SignedAt: "2000-01-01T00:00:00Z"},
		Chain:        ChainFacts{From: "provenance", Verified: true, Failures: []string{"f"}, Sources: 1},
		Links:        []LinkFacts{{Action: "a", Envelope: "e", Verified: true, Key: k, Logged: true, Toolchain: "t"}},
		Toolchains:   []ToolchainFacts{{SHA256: "t", LockfileNames: []string{"n"}}},
		Dependencies: []DependencyFacts{{Name: "d", Files: 1, Pinned: true, PinSHA256: "d"}},
		Lockfile:     LockfileFacts{Present: true, Name: "l", SHA256: "l"},
		SBOM:         SBOMFacts{Present: true, Name: "b", SHA256: "b", Matches: true, Errors: []string{"e"}},
		VSAs: []VSAFacts{{Name: "v", SHA256: "v", Verified: true, Key: k, Result: "PASSED", Verifier: "v", Policy: "p",
			TimeVerified: "2000-01-01T00:00:00Z", SubjectMatches: true, ProvenanceMatches: true}},
		BuilderKeys: []string{"k"},
	}
}
