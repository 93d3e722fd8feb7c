// Package keys is kiln's keyring: the ed25519 executor keys that sign in-toto links and
// provenance, with validity periods so a retired key still verifies what it signed, and
// the note key that signs the transparency log's checkpoints.
//
// The keyring lives in one directory (DATA/keys, mode 0700, files 0600, owned by the
// user kiln runs as; sandboxes never mount DATA). Several processes may open it at once:
// changes happen under an exclusive flock on .lock, files are written to a temporary name
// and renamed (or hard-linked, for files that must never be replaced) into place.
package keys

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/in-toto/in-toto-golang/in_toto"
	"github.com/kilnbuild/kiln/internal/grpcerr"
	"golang.org/x/mod/sumdb/note"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Key sources recorded in the keyring.
const (
	SourceGenerated = "generated" // created by kiln; the private key is in the keyring directory
	SourceOperator  = "operator"  // supplied by the operator as a PEM file; kiln never stores it
)

// File names inside the keyring directory.
const (
	ringFile    = "keyring.json"
	lockFile    = ".lock"
	logKeyFile  = "log.key"
	keyFileTmpl = "executor-%s.pem"
)

// PublicKey is one executor key as the keyring records it: its id, public half and
// validity. A key is active while NotAfter is nil.
type PublicKey struct {
	// KeyID is in-toto's key id for the key (see KeyID).
	KeyID string `json:"keyid"`
	// PEM is the public key as a PKIX "PUBLIC KEY" PEM block.
	PEM string `json:"public_key_pem"`
	// Source says where the private key lives: SourceGenerated or SourceOperator.
	Source string `json:"source"`
	// NotBefore is when the key became active.
	NotBefore time.Time `json:"not_before"`
	// NotAfter is when the key was retired; nil while it is active.
	NotAfter *time.Time `json:"not_after,omitempty"`
	// NotAfterLogSize is the transparency log's size when the key was retired: every link
	// the key signed has a log index below it (rotation waits for in-flight signing).
	NotAfterLogSize *uint64 `json:"not_after_log_size,omitempty"`

	Public ed25519.PublicKey `json:"-"`
}

// Active reports whether the key has not been retired.
func (p PublicKey) Active() bool { return p.NotAfter == nil }

// InToto returns the key in in-toto-golang's form, for layouts and its verifiers.
func (p PublicKey) InToto() in_toto.Key {
	return in_toto.Key{
		KeyID:               p.KeyID,
		KeyIDHashAlgorithms: []string{"sha256", "sha512"},
		KeyType:             "ed25519",
		KeyVal:              in_toto.KeyVal{Public: hex.EncodeToString(p.Public)},
		Scheme:              "ed25519",
	}
}

// LogKey is the transparency log's public identity: its checkpoint origin and the note
// verifier key ("<origin>+<hash>+<key>") that checks checkpoint signatures.
type LogKey struct {
	Origin string `json:"origin"`
	VKey   string `json:"vkey"`
}

// Verifier returns a note verifier for the log's checkpoints.
func (l LogKey) Verifier() (note.Verifier, error) {
	v, err := note.NewVerifier(l.VKey)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "log verifier key %q: %v", l.VKey, err)
	}
	return v, nil
}

// ring is keyring.json.
type ring struct {
	Version int         `json:"version"`
	Keys    []PublicKey `json:"keys"`
	Log     LogKey      `json:"log"`
}

// Options configures Open.
type Options struct {
	// ExecutorKeyFile, if set, is a PEM file with the operator's ed25519 private key
	// (PKCS #8). It becomes the active key; a different active key is retired.
	ExecutorKeyFile string
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// LogSize reports the transparency log's current size, recorded when a key is
	// retired; nil records no size.
	LogSize func(context.Context) (uint64, error)
}

// Keyring is an open keyring directory.
type Keyring struct {
	dir  string
	opts Options
	now  func() time.Time

	mu       sync.Mutex
	ring     ring
	stamp    fileStamp
	privs    map[string]ed25519.PrivateKey // by key id, loaded lazily
	operator *Signer                       // from Options.ExecutorKeyFile
	logSK    note.Signer
}

type fileStamp struct {
	ino, size int64
	mtime     int64
}

// Open opens the keyring in dir, creating the directory, a first executor key and the
// log key if they do not exist yet. It refuses a directory or key file that other users
// can read.
func Open(ctx context.Context, dir string, opts Options) (*Keyring, error) {
	k := &Keyring{dir: dir, opts: opts, now: opts.Now, privs: map[string]ed25519.PrivateKey{}}
	if k.now == nil {
		k.now = time.Now
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, status.Errorf(codes.Internal, "create keyring %s: %v", dir, err)
	}
	if err := checkPrivate(dir, true); err != nil {
		return nil, err
	}
	if opts.ExecutorKeyFile != "" {
		s, err := LoadPrivateKeyFile(opts.ExecutorKeyFile)
		if err != nil {
			return nil, err
		}
		k.operator = s
	}
	err := k.withLock(syscall.LOCK_EX, func() error {
		if err := k.load(); err != nil {
			return err
		}
		changed := false
		if k.ring.Log.VKey == "" {
			if err := k.createLogKey(); err != nil {
				return err
			}
			changed = true
		}
		if k.operator != nil {
			c, err := k.adoptOperatorKey(ctx)
			if err != nil {
				return err
			}
			changed = changed || c
		} else if _, ok := k.activeLocked(); !ok {
			if _, err := k.addGenerated(ctx); err != nil {
				return err
			}
			changed = true
		}
		if changed {
			return k.save()
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return k, nil
}

// Dir returns the keyring directory.
func (k *Keyring) Dir() string { return k.dir }

// Now reads the keyring's clock (Options.Now), which dates key validity and what the
// keys sign.
func (k *Keyring) Now() time.Time { return k.now() }

// checkPrivate refuses path unless it belongs to this user and others cannot read it.
func checkPrivate(path string, isDir bool) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return status.Errorf(codes.Internal, "keyring: %v", err)
	}
	if isDir != fi.IsDir() || fi.Mode()&fs.ModeSymlink != 0 {
		return status.Errorf(codes.FailedPrecondition, "keyring: %s is not a plain %s", path, map[bool]string{true: "directory", false: "file"}[isDir])
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if ok && int(st.Uid) != os.Geteuid() {
		return status.Errorf(codes.PermissionDenied, "keyring: %s belongs to uid %d, not to this user (uid %d)", path, st.Uid, os.Geteuid())
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return status.Errorf(codes.PermissionDenied, "keyring: %s has mode %04o; it must not be accessible to group or others (chmod go-rwx)", path, fi.Mode().Perm())
	}
	return nil
}

// withLock runs fn holding a flock of the given kind on the keyring's lock file. A new
// open file description each time, so goroutines of one process exclude each other too.
func (k *Keyring) withLock(how int, fn func() error) error {
	f, err := os.OpenFile(filepath.Join(k.dir, lockFile), os.O_CREATE|os.O_RDWR|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return status.Errorf(codes.Internal, "keyring lock: %v", err)
	}
	defer f.Close()
	for {
		err = syscall.Flock(int(f.Fd()), how)
		if err != syscall.EINTR {
			break
		}
	}
	if err != nil {
		return status.Errorf(codes.Internal, "keyring lock: %v", err)
	}
	return fn()
}

// SignLock holds a shared lock on the keyring while fn signs and logs with the active key,
// so that Rotate (which takes it exclusively) records a retirement log size that no link
// by the old key can exceed.
func (k *Keyring) SignLock(fn func() error) error {
	return k.withLock(syscall.LOCK_SH, fn)
}

func (k *Keyring) ringPath() string { return filepath.Join(k.dir, ringFile) }

// load reads keyring.json (absent: an empty ring). Caller holds k.mu or is in Open.
func (k *Keyring) load() error {
	p := k.ringPath()
	f, err := os.Open(p)
	if errors.Is(err, fs.ErrNotExist) {
		k.ring = ring{Version: 1}
		k.stamp = fileStamp{}
		return nil
	}
	if err != nil {
		return status.Errorf(codes.Internal, "keyring: %v", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return status.Errorf(codes.Internal, "keyring: %v", err)
	}
	if err := checkPrivate(p, false); err != nil {
		return err
	}
	var buf bytes.Buffer
	if _, err := buf.ReadFrom(f); err != nil {
		return status.Errorf(codes.Internal, "keyring: %v", err)
	}
	var r ring
	if err := json.Unmarshal(buf.Bytes(), &r); err != nil {
		return status.Errorf(codes.DataLoss, "keyring %s is damaged: %v", p, err)
	}
	if r.Version != 1 {
		return status.Errorf(codes.FailedPrecondition, "keyring %s has version %d; this kiln reads version 1", p, r.Version)
	}
	for i := range r.Keys {
		pub, err := parsePublicPEM([]byte(r.Keys[i].PEM))
		if err != nil {
			return status.Errorf(codes.DataLoss, "keyring %s: key %s: %v", p, r.Keys[i].KeyID, err)
		}
		if id := KeyID(pub); id != r.Keys[i].KeyID {
			return status.Errorf(codes.DataLoss, "keyring %s: key id %s does not match its public key (%s)", p, r.Keys[i].KeyID, id)
		}
		r.Keys[i].Public = pub
	}
	k.ring = r
	k.stamp = stampOf(fi)
	return nil
}

func stampOf(fi fs.FileInfo) fileStamp {
	s := fileStamp{size: fi.Size(), mtime: fi.ModTime().UnixNano()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		s.ino = int64(st.Ino)
	}
	return s
}

// refresh reloads keyring.json if another process changed it. Caller holds k.mu.
func (k *Keyring) refresh() error {
	fi, err := os.Stat(k.ringPath())
	if err != nil {
		return status.Errorf(codes.Internal, "keyring: %v", err)
	}
	if stampOf(fi) == k.stamp {
		return nil
	}
	return k.load()
}

// save writes keyring.json atomically. Caller holds the exclusive flock.
func (k *Keyring) save() error {
	b, err := json.MarshalIndent(k.ring, "", "  ")
	if err != nil {
		return status.Errorf(codes.Internal, "keyring: %v", err)
	}
	if err := writeFileAtomic(k.ringPath(), append(b, '\n'), false); err != nil {
		return err
	}
	fi, err := os.Stat(k.ringPath())
	if err == nil {
		k.stamp = stampOf(fi)
	}
	return nil
}

// writeFileAtomic writes data to a temporary file in the same directory (mode 0600,
// fsynced) and renames it to path, or, with exclusive, hard-links it so that an existing
// file is never replaced (fs.ErrExist then).
func writeFileAtomic(path string, data []byte, exclusive bool) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return status.Errorf(codes.Internal, "keyring: %v", err)
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if _, err := f.Write(data); err != nil {
		f.Close()
		return status.Errorf(codes.Internal, "keyring: write %s: %v", path, err)
	}
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return status.Errorf(codes.Internal, "keyring: %v", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return status.Errorf(codes.Internal, "keyring: sync %s: %v", path, err)
	}
	if err := f.Close(); err != nil {
		return status.Errorf(codes.Internal, "keyring: %v", err)
	}
	if exclusive {
		if err := os.Link(tmp, path); err != nil {
			if errors.Is(err, fs.ErrExist) {
				return err
			}
			return status.Errorf(codes.Internal, "keyring: %v", err)
		}
	} else if err := os.Rename(tmp, path); err != nil {
		return status.Errorf(codes.Internal, "keyring: %v", err)
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

func (k *Keyring) activeLocked() (PublicKey, bool) {
	for _, p := range k.ring.Keys {
		if p.Active() {
			return p, true
		}
	}
	return PublicKey{}, false
}

func (k *Keyring) keyFile(id string) string {
	return filepath.Join(k.dir, fmt.Sprintf(keyFileTmpl, id))
}

// addGenerated creates a new key, stores its private half, retires the active key and
// makes the new one active. Caller holds the exclusive flock.
func (k *Keyring) addGenerated(ctx context.Context) (PublicKey, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return PublicKey{}, status.Errorf(codes.Internal, "generate key: %v", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return PublicKey{}, status.Errorf(codes.Internal, "encode key: %v", err)
	}
	id := KeyID(pub)
	pemBytes := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	if err := writeFileAtomic(k.keyFile(id), pemBytes, true); err != nil {
		return PublicKey{}, status.Errorf(codes.Internal, "store key %s: %v", id, err)
	}
	k.privs[id] = priv
	return k.activate(ctx, pub, SourceGenerated)
}

// activate retires the active key (if any) and appends pub as the active key.
func (k *Keyring) activate(ctx context.Context, pub ed25519.PublicKey, source string) (PublicKey, error) {
	now := k.now().UTC().Truncate(time.Second)
	if err := k.retireActive(ctx, now); err != nil {
		return PublicKey{}, err
	}
	p := PublicKey{KeyID: KeyID(pub), PEM: string(PublicPEM(pub)), Source: source, NotBefore: now, Public: pub}
	k.ring.Keys = append(k.ring.Keys, p)
	return p, nil
}

func (k *Keyring) retireActive(ctx context.Context, now time.Time) error {
	for i := range k.ring.Keys {
		if !k.ring.Keys[i].Active() {
			continue
		}
		t := now
		k.ring.Keys[i].NotAfter = &t
		if k.opts.LogSize != nil {
			n, err := k.opts.LogSize(ctx)
			if err != nil {
				return grpcerr.Wrap(err, "retire key %s: read log size", k.ring.Keys[i].KeyID)
			}
			k.ring.Keys[i].NotAfterLogSize = &n
		}
	}
	return nil
}

// adoptOperatorKey makes the operator's key the active one, reporting whether the ring
// changed. A retired operator key is refused: retirement is final.
func (k *Keyring) adoptOperatorKey(ctx context.Context) (bool, error) {
	id := k.operator.id
	for _, p := range k.ring.Keys {
		if p.KeyID != id {
			continue
		}
		if !p.Active() {
			return false, status.Errorf(codes.FailedPrecondition, "executor key %s (from %s) was retired on %s; supply a new key", id, k.opts.ExecutorKeyFile, p.NotAfter.Format(time.RFC3339))
		}
		return false, nil
	}
	_, err := k.activate(ctx, k.operator.pub, SourceOperator)
	return err == nil, err
}

func (k *Keyring) createLogKey() error {
	var rnd [8]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return status.Errorf(codes.Internal, "log key: %v", err)
	}
	origin := "kiln-log/" + hex.EncodeToString(rnd[:])
	skey, vkey, err := note.GenerateKey(rand.Reader, origin)
	if err != nil {
		return status.Errorf(codes.Internal, "log key: %v", err)
	}
	if err := writeFileAtomic(filepath.Join(k.dir, logKeyFile), []byte(skey+"\n"), true); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return status.Errorf(codes.DataLoss, "keyring %s has %s but keyring.json does not name the log key; restore keyring.json or move the file away", k.dir, logKeyFile)
		}
		return err
	}
	k.ring.Log = LogKey{Origin: origin, VKey: vkey}
	return nil
}

// Signer signs with one executor key; it implements dsse.Signer.
type Signer struct {
	id   string
	pub  ed25519.PublicKey
	priv ed25519.PrivateKey
}

// NewSigner wraps an ed25519 private key.
func NewSigner(priv ed25519.PrivateKey) *Signer {
	pub := priv.Public().(ed25519.PublicKey)
	return &Signer{id: KeyID(pub), pub: pub, priv: priv}
}

// Sign signs data (for DSSE: the PAE encoding of the payload).
func (s *Signer) Sign(_ context.Context, data []byte) ([]byte, error) {
	return ed25519.Sign(s.priv, data), nil
}

// KeyID returns the key's in-toto key id.
func (s *Signer) KeyID() (string, error) { return s.id, nil }

// ID returns the key's in-toto key id.
func (s *Signer) ID() string { return s.id }

// Public returns the public half.
func (s *Signer) Public() ed25519.PublicKey { return s.pub }

// Active returns a signer for the active executor key, first picking up any change
// another process made to the keyring (a rotation).
func (k *Keyring) Active() (*Signer, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.refresh(); err != nil {
		return nil, err
	}
	p, ok := k.activeLocked()
	if !ok {
		return nil, status.Errorf(codes.FailedPrecondition, "keyring %s has no active executor key", k.dir)
	}
	if k.operator != nil && k.operator.id == p.KeyID {
		return k.operator, nil
	}
	if p.Source == SourceOperator {
		return nil, status.Errorf(codes.FailedPrecondition, "the active executor key %s is operator-supplied; pass its PEM file (--key-file) or run `kiln attest key rotate`", p.KeyID)
	}
	priv, ok := k.privs[p.KeyID]
	if !ok {
		s, err := LoadPrivateKeyFile(k.keyFile(p.KeyID))
		if err != nil {
			return nil, err
		}
		if s.id != p.KeyID {
			return nil, status.Errorf(codes.DataLoss, "key file %s holds key %s, not %s", k.keyFile(p.KeyID), s.id, p.KeyID)
		}
		priv = s.priv
		k.privs[p.KeyID] = priv
	}
	return &Signer{id: p.KeyID, pub: p.Public, priv: priv}, nil
}

// Keys returns every executor key the keyring has known, oldest first, with validity.
func (k *Keyring) Keys() ([]PublicKey, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.refresh(); err != nil {
		return nil, err
	}
	return append([]PublicKey(nil), k.ring.Keys...), nil
}

// Log returns the transparency log's public identity.
func (k *Keyring) Log() LogKey {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.ring.Log
}

// LogSigner returns the note signer for the log's checkpoints.
func (k *Keyring) LogSigner() (note.Signer, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.logSK != nil {
		return k.logSK, nil
	}
	s, err := LoadLogSigner(k.dir)
	if err != nil {
		return nil, err
	}
	if s.Name() != k.ring.Log.Origin {
		return nil, status.Errorf(codes.DataLoss, "log key in %s is for %q, keyring says %q", k.dir, s.Name(), k.ring.Log.Origin)
	}
	k.logSK = s
	return s, nil
}

// LoadLogSigner reads the log's note signer key from the keyring directory dir.
func LoadLogSigner(dir string) (note.Signer, error) {
	p := filepath.Join(dir, logKeyFile)
	if err := checkPrivate(p, false); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "log key: %v", err)
	}
	s, err := note.NewSigner(string(bytes.TrimSpace(b)))
	if err != nil {
		return nil, status.Errorf(codes.DataLoss, "log key %s: %v", p, err)
	}
	return s, nil
}

// Rotate retires the active key and makes a new one active: generated, or the operator's
// key from keyFile if it is not empty. It waits until no process is signing (SignLock),
// so the retirement log size it records bounds every link the old key signed. It
// returns the retired key (zero if there was none) and the new one.
func (k *Keyring) Rotate(ctx context.Context, keyFile string) (old, cur PublicKey, err error) {
	var op *Signer
	if keyFile != "" {
		if op, err = LoadPrivateKeyFile(keyFile); err != nil {
			return PublicKey{}, PublicKey{}, err
		}
	}
	// The flock first, then k.mu: a signer of this process holds the shared flock while
	// it takes k.mu (Active), so the other order could deadlock.
	err = k.withLock(syscall.LOCK_EX, func() error {
		k.mu.Lock()
		defer k.mu.Unlock()
		if err := k.load(); err != nil {
			return err
		}
		prev, hadPrev := k.activeLocked()
		if op != nil {
			for _, p := range k.ring.Keys {
				if p.KeyID == op.id {
					return status.Errorf(codes.AlreadyExists, "key %s is already in the keyring", op.id)
				}
			}
			k.operator = op
			if cur, err = k.activate(ctx, op.pub, SourceOperator); err != nil {
				return err
			}
		} else if cur, err = k.addGenerated(ctx); err != nil {
			return err
		}
		if hadPrev {
			for _, p := range k.ring.Keys {
				if p.KeyID == prev.KeyID {
					old = p
				}
			}
		}
		return k.save()
	})
	return old, cur, err
}

// KeyID returns in-toto's key id for an ed25519 public key: the SHA-256 (hex) of the
// canonical JSON {"keyid_hash_algorithms":["sha256","sha512"],"keytype":"ed25519",
// "keyval":{"public":"<hex of the 32-byte key>"},"scheme":"ed25519"} — the id
// in-toto-golang (and securesystemslib) compute for the key, so DSSE signatures carry a
// key id that in-toto's verifiers match against layouts.
func KeyID(pub ed25519.PublicKey) string {
	var k in_toto.Key
	if err := k.LoadKeyReaderDefaults(bytes.NewReader(PublicPEM(pub))); err != nil {
		// Cannot happen for a 32-byte key; fail loudly rather than sign with a wrong id.
		panic(fmt.Sprintf("in-toto key id: %v", err))
	}
	return k.KeyID
}

// PublicPEM encodes an ed25519 public key as a PKIX "PUBLIC KEY" PEM block.
func PublicPEM(pub ed25519.PublicKey) []byte {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		panic(fmt.Sprintf("marshal ed25519 public key: %v", err))
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
}

func parsePublicPEM(b []byte) (ed25519.PublicKey, error) {
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PUBLIC KEY" {
		return nil, errors.New("not a PUBLIC KEY PEM block")
	}
	k, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		return nil, err
	}
	pub, ok := k.(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("public key is %T, not ed25519", k)
	}
	return pub, nil
}

// LoadPrivateKeyFile reads an ed25519 private key from a PKCS #8 "PRIVATE KEY" PEM file.
func LoadPrivateKeyFile(path string) (*Signer, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "executor key: %v", err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PRIVATE KEY" {
		return nil, status.Errorf(codes.InvalidArgument, "executor key %s: want a PKCS #8 \"PRIVATE KEY\" PEM block (openssl genpkey -algorithm ed25519)", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "executor key %s: %v", path, err)
	}
	priv, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, status.Errorf(codes.InvalidArgument, "executor key %s is %T; kiln signs with ed25519", path, k)
	}
	return NewSigner(priv), nil
}
