package consulkv

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/ukai-storage/ukai/cluster/meta"
)

// Consul sessions and KV locks (meta.Locker). A session renewal is not a
// Raft write (the leader resets an in-memory timer), so a node's one
// session costs Consul one cheap request per TTL/3, whatever the number
// of locks it holds. Consul invalidates a session between TTL and 2×TTL
// after its last renewal (agent/structs SessionTTLMultiplier); its TTL
// must lie within the server's session_ttl_min (10 s by default) and
// 24 h.

// sessionCreate is the body of /v1/session/create. Checks is empty on
// purpose: Consul then ties the session to no health check (not even its
// agent's serfHealth), so only the TTL decides; an agent restart or a
// flapping agent does not drop every lock of the nodes using it.
type sessionCreate struct {
	Name      string
	TTL       string
	LockDelay string
	Behavior  string
	Checks    []string
}

// CreateSession implements meta.Locker.
func (k *KV) CreateSession(ctx context.Context, name string, ttl, lockDelay time.Duration) (string, error) {
	rctx, cancel := context.WithTimeout(ctx, k.timeout)
	defer cancel()
	var out struct{ ID string }
	body := sessionCreate{Name: name, TTL: ttl.String(), LockDelay: lockDelay.String(), Behavior: api.SessionBehaviorRelease, Checks: []string{}}
	if _, err := k.client.Raw().Write("/v1/session/create", body, &out, k.write(rctx)); err != nil {
		return "", k.fail(ctx, "session create", name, err)
	}
	if out.ID == "" {
		return "", fmt.Errorf("consul session create %s at %s: no session id in the answer", name, k.addr)
	}
	return out.ID, nil
}

// RenewSession implements meta.Locker.
func (k *KV) RenewSession(ctx context.Context, id string) error {
	rctx, cancel := context.WithTimeout(ctx, k.timeout)
	defer cancel()
	se, _, err := k.client.Session().Renew(id, k.write(rctx))
	if err != nil {
		return k.fail(ctx, "session renew", id, err)
	}
	if se == nil {
		return fmt.Errorf("consul session %s: %w", id, meta.ErrSessionGone)
	}
	return nil
}

// DestroySession implements meta.Locker.
func (k *KV) DestroySession(ctx context.Context, id string) error {
	rctx, cancel := context.WithTimeout(ctx, k.timeout)
	defer cancel()
	if _, err := k.client.Session().Destroy(id, k.write(rctx)); err != nil {
		return k.fail(ctx, "session destroy", id, err)
	}
	return nil
}

// Acquire implements meta.Locker. Consul refuses an unknown session with
// HTTP 500 ("invalid session"); it is told apart from an unavailable
// Consul by reading the session.
func (k *KV) Acquire(ctx context.Context, key string, value []byte, session string) (bool, error) {
	if err := checkWrite(key, value); err != nil {
		return false, err
	}
	rctx, cancel := context.WithTimeout(ctx, k.timeout)
	defer cancel()
	ok, _, err := k.kv.Acquire(&api.KVPair{Key: key, Value: value, Session: session}, k.write(rctx))
	if err != nil {
		if gone, gerr := k.sessionGone(ctx, session); gerr == nil && gone {
			return false, fmt.Errorf("acquire %s: consul session %s: %w", key, session, meta.ErrSessionGone)
		}
		return false, k.fail(ctx, "acquire", key, err)
	}
	return ok, nil
}

// Release implements meta.Locker.
func (k *KV) Release(ctx context.Context, key string, value []byte, session string) (bool, error) {
	if err := checkWrite(key, value); err != nil {
		return false, err
	}
	rctx, cancel := context.WithTimeout(ctx, k.timeout)
	defer cancel()
	ok, _, err := k.kv.Release(&api.KVPair{Key: key, Value: value, Session: session}, k.write(rctx))
	if err != nil {
		return false, k.fail(ctx, "release", key, err)
	}
	return ok, nil
}

// sessionGone reports whether Consul no longer knows session id.
func (k *KV) sessionGone(ctx context.Context, id string) (bool, error) {
	rctx, cancel := context.WithTimeout(ctx, k.timeout)
	defer cancel()
	se, _, err := k.client.Session().Info(id, k.query(rctx))
	if err != nil {
		return false, err
	}
	return se == nil, nil
}

// PutLocked implements meta.Locker: one transaction that checks lock's
// holder and sets key.
func (k *KV) PutLocked(ctx context.Context, key string, value []byte, lock, session string) error {
	if err := checkWrite(key, value); err != nil {
		return err
	}
	if err := checkKey(lock); err != nil {
		return err
	}
	if session == "" {
		return fmt.Errorf("%s: no session: %w", key, meta.ErrLockLost)
	}
	rolledBack, err := k.txn(ctx, "put", key, api.TxnOps{
		{KV: &api.KVTxnOp{Verb: api.KVCheckSession, Key: lock, Session: session}},
		{KV: &api.KVTxnOp{Verb: api.KVSet, Key: key, Value: value}},
	})
	if rolledBack {
		return fmt.Errorf("%s: %s is not held by session %s: %w", key, lock, session, meta.ErrLockLost)
	}
	return err
}
