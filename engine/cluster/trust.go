package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"github.com/kilnbuild/kiln/engine/attest/keys"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The trust set lives in the KILN_TRUST bucket: key.<keyid> holds an admitted executor
// key (keys.PublicKey: PEM and validity), log the sequencer's log verifier key. Only
// an operator may write it: give frontends, workers and the sequencer NATS credentials
// that deny publishing to $KV.KILN_TRUST.> (the sequencer needs key.* and log, see
// docs/cluster.md); a verifier reads it with --cluster.

// SourceCluster marks keys admitted to a cluster's trust set.
const SourceCluster = "cluster"

func trustKey(id string) string { return "key." + id }

const logKeyName = "log"

// TrustSet reads the cluster's trust set: every admitted key with its validity, and
// the log key once a sequencer has published it. A read that cannot complete (the
// server restarting) is an error, never a shorter set: a key missing from it would
// make its links look forged.
func (c *Conn) TrustSet(ctx context.Context) (keys.Trust, error) {
	exp := keys.Export{}
	lister, err := c.Trust.ListKeys(ctx)
	if err != nil && !errors.Is(err, jetstream.ErrNoKeysFound) {
		return keys.Trust{}, c.wrap(err, "read the trust set")
	}
	if lister != nil {
		for k := range lister.Keys() {
			e, err := c.Trust.Get(ctx, k)
			if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
				continue // deleted since it was listed
			}
			if err != nil {
				return keys.Trust{}, c.wrap(err, "read the trust set: %s", k)
			}
			switch {
			case k == logKeyName:
				if err := json.Unmarshal(e.Value(), &exp.Log); err != nil {
					return keys.Trust{}, status.Errorf(codes.DataLoss, "trust set: log key: %v", err)
				}
			case len(k) > 4 && k[:4] == "key.":
				var p keys.PublicKey
				if err := json.Unmarshal(e.Value(), &p); err != nil {
					return keys.Trust{}, status.Errorf(codes.DataLoss, "trust set: %s: %v", k, err)
				}
				exp.Keys = append(exp.Keys, p)
			}
		}
		// The lister stops early, without an error, when ctx ends.
		if err := ctx.Err(); err != nil {
			return keys.Trust{}, c.wrap(err, "read the trust set")
		}
	}
	if len(exp.Keys) == 0 {
		t := keys.Trust{}
		if exp.Log.VKey != "" {
			t.Log = &exp.Log
		}
		return t, nil
	}
	return parseExport(exp)
}

// parseExport checks every key id of exp against its public key.
func parseExport(exp keys.Export) (keys.Trust, error) {
	b, _ := json.Marshal(exp)
	t, err := keys.ParseTrust(b)
	if err != nil {
		return keys.Trust{}, status.Errorf(codes.DataLoss, "trust set: %v", status.Convert(err).Message())
	}
	return t, nil
}

// trustedKey reads one admitted key from the trust set, its id checked against its
// public key; NotFound if it is not there.
func (c *Conn) trustedKey(ctx context.Context, id string) (keys.PublicKey, error) {
	p, _, err := c.readKey(ctx, id, "read key %s")
	if err != nil {
		return keys.PublicKey{}, err
	}
	t, err := parseExport(keys.Export{Keys: []keys.PublicKey{p}})
	if err != nil {
		return keys.PublicKey{}, err
	}
	return t.Keys[0], nil
}

// readKey reads admitted key id as stored, with its revision; NotFound if it is not
// there. what names the operation in errors (a format taking the id).
func (c *Conn) readKey(ctx context.Context, id, what string) (keys.PublicKey, uint64, error) {
	e, err := c.Trust.Get(ctx, trustKey(id))
	if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
		return keys.PublicKey{}, 0, status.Errorf(codes.NotFound, "key %s is not in the cluster's trust set", id)
	}
	if err != nil {
		return keys.PublicKey{}, 0, c.wrap(err, what, id)
	}
	var p keys.PublicKey
	if err := json.Unmarshal(e.Value(), &p); err != nil {
		return keys.PublicKey{}, 0, status.Errorf(codes.DataLoss, "trust set: key %s: %v", id, err)
	}
	return p, e.Revision(), nil
}

// AdmitKeys adds the keys in data (PEM public keys, or `kiln attest pubkey --json`) to
// the trust set and returns them. A key admitted before stays as it is; a retired key
// cannot be admitted again (its links after retirement must keep failing).
func (c *Conn) AdmitKeys(ctx context.Context, data []byte, now time.Time) ([]keys.PublicKey, error) {
	t, err := keys.ParseTrust(data)
	if err != nil {
		return nil, err
	}
	var out []keys.PublicKey
	for _, k := range t.Keys {
		p := keys.PublicKey{KeyID: k.KeyID, PEM: k.PEM, Source: SourceCluster, NotBefore: now.UTC()}
		b, _ := json.Marshal(p)
		_, err := c.Trust.Create(ctx, trustKey(k.KeyID), b)
		if errors.Is(err, jetstream.ErrKeyExists) {
			e, gerr := c.Trust.Get(ctx, trustKey(k.KeyID))
			if gerr != nil {
				return out, c.wrap(gerr, "admit key %s", k.KeyID)
			}
			if err := json.Unmarshal(e.Value(), &p); err != nil {
				return out, status.Errorf(codes.DataLoss, "trust set: key %s: %v", k.KeyID, err)
			}
			if !p.Active() {
				return out, status.Errorf(codes.FailedPrecondition, "key %s was retired on %s; a retired key cannot be admitted again (give the worker a new key)", k.KeyID, p.NotAfter.Format(time.RFC3339))
			}
		} else if err != nil {
			return out, c.wrap(err, "admit key %s", k.KeyID)
		}
		out = append(out, p)
	}
	return out, nil
}

// RetireKey retires an admitted key: from now on the sequencer logs no link it signed
// that was not pending already, and records the log size that bounds its links
// (keys.PublicKey.NotAfterLogSize), which verifiers enforce.
func (c *Conn) RetireKey(ctx context.Context, id string, now time.Time) (keys.PublicKey, error) {
	for {
		p, rev, err := c.readKey(ctx, id, "retire key %s")
		if err != nil {
			return keys.PublicKey{}, err
		}
		if !p.Active() {
			return p, nil
		}
		t := now.UTC()
		p.NotAfter = &t
		b, _ := json.Marshal(p)
		if _, err := c.Trust.Update(ctx, trustKey(id), b, rev); err == nil {
			return p, nil
		} else if !errors.Is(err, jetstream.ErrKeyRevisionMismatch) && !errors.Is(err, jetstream.ErrKeyExists) {
			return keys.PublicKey{}, c.wrap(err, "retire key %s", id)
		}
	}
}

// sealRetired records size as the bound of every retired key that has none yet (the
// sequencer calls it with its log's size once the links pending at retirement are
// logged).
func (c *Conn) sealRetired(ctx context.Context, size uint64) error {
	t, err := c.TrustSet(ctx)
	if err != nil {
		return err
	}
	for _, k := range t.Keys {
		if k.Active() || k.NotAfterLogSize != nil {
			continue
		}
		p, rev, err := c.readKey(ctx, k.KeyID, "seal key %s")
		if err != nil {
			return err
		}
		n := size
		p.NotAfterLogSize = &n
		b, _ := json.Marshal(p)
		if _, err := c.Trust.Update(ctx, trustKey(k.KeyID), b, rev); err != nil {
			return c.wrap(err, "seal key %s", k.KeyID)
		}
	}
	return nil
}

// publishLogKey puts the sequencer's log verifier key into the trust set; a different
// one there already is refused (two sequencers, or a replaced one: an operator decides).
func (c *Conn) publishLogKey(ctx context.Context, lk keys.LogKey) error {
	b, _ := json.Marshal(lk)
	_, err := c.Trust.Create(ctx, logKeyName, b)
	if err == nil {
		return nil
	}
	if !errors.Is(err, jetstream.ErrKeyExists) {
		return c.wrap(err, "publish the log key")
	}
	e, err := c.Trust.Get(ctx, logKeyName)
	if err != nil {
		return c.wrap(err, "publish the log key")
	}
	var have keys.LogKey
	if json.Unmarshal(e.Value(), &have) == nil && have.VKey == lk.VKey {
		return nil
	}
	return status.Errorf(codes.FailedPrecondition, "the cluster's log key is %s, not this sequencer's (%s): is another sequencer running, on another data dir? (one sequencer per cluster; to move it to a new data dir, an operator first deletes the old key: nats kv del KILN_TRUST log)", have.VKey, lk.VKey)
}
