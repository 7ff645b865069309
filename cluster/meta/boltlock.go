package meta

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
)

// The embedded store's Locker. It serves one node, so its sessions and
// locks live in this process only: a restarted process starts with none
// (its previous process, the only possible holder, is gone). TTLs and
// lock delays run on this process's monotonic clock.

type boltSession struct {
	name      string
	ttl       time.Duration
	lockDelay time.Duration
	timer     *time.Timer
}

// boltLocks is the lock state; BoltKV.lmu guards it.
type boltLocks struct {
	sessions map[string]*boltSession
	holder   map[string]string    // key -> session
	delayed  map[string]time.Time // key -> end of its lock delay
}

func newSessionID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// CreateSession implements Locker.
func (s *BoltKV) CreateSession(ctx context.Context, name string, ttl, lockDelay time.Duration) (string, error) {
	if err := ctx.Err(); err != nil {
		return "", err
	}
	if ttl <= 0 || lockDelay < 0 {
		return "", fmt.Errorf("%w: session ttl %v, lock delay %v", ErrInvalid, ttl, lockDelay)
	}
	id := newSessionID()
	s.lmu.Lock()
	defer s.lmu.Unlock()
	bs := &boltSession{name: name, ttl: ttl, lockDelay: lockDelay}
	bs.timer = time.AfterFunc(ttl, func() { s.invalidate(id) })
	s.locks.sessions[id] = bs
	return id, nil
}

// RenewSession implements Locker.
func (s *BoltKV) RenewSession(ctx context.Context, id string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.lmu.Lock()
	defer s.lmu.Unlock()
	bs, ok := s.locks.sessions[id]
	if !ok || !bs.timer.Stop() {
		return fmt.Errorf("session %s: %w", id, ErrSessionGone)
	}
	bs.timer.Reset(bs.ttl)
	return nil
}

// DestroySession implements Locker.
func (s *BoltKV) DestroySession(ctx context.Context, id string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.invalidate(id)
	return nil
}

// invalidate drops session id, releasing its locks with its lock delay.
func (s *BoltKV) invalidate(id string) {
	s.lmu.Lock()
	defer s.lmu.Unlock()
	bs, ok := s.locks.sessions[id]
	if !ok {
		return
	}
	bs.timer.Stop()
	delete(s.locks.sessions, id)
	var keys []string
	for k, h := range s.locks.holder {
		if h == id {
			keys = append(keys, k)
		}
	}
	until := time.Now().Add(bs.lockDelay)
	for _, k := range keys {
		delete(s.locks.holder, k)
		s.locks.delayed[k] = until
	}
	// A released lock is a change of the key, as in Consul: watchers wake.
	_ = s.update(context.Background(), func(b *bolt.Bucket, next uint64) (bool, error) {
		changed := false
		for _, k := range keys {
			if e, ok := currentEntry(b, k); ok {
				if _, err := putIfIndex(b, k, e, mustIndex(b, k), next); err != nil {
					return false, err
				}
				changed = true
			}
		}
		return changed, nil
	})
}

// Acquire implements Locker.
func (s *BoltKV) Acquire(ctx context.Context, key string, value []byte, session string) (bool, error) {
	if key == "" {
		return false, errors.New("metadata store: empty key")
	}
	s.lmu.Lock()
	defer s.lmu.Unlock()
	if _, ok := s.locks.sessions[session]; !ok {
		return false, fmt.Errorf("acquire %s: session %s: %w", key, session, ErrSessionGone)
	}
	if h, held := s.locks.holder[key]; held && h != session {
		return false, nil
	}
	if until, ok := s.locks.delayed[key]; ok {
		if time.Now().Before(until) {
			return false, nil
		}
		delete(s.locks.delayed, key)
	}
	err := s.update(ctx, func(b *bolt.Bucket, next uint64) (bool, error) {
		return putIfIndex(b, key, value, mustIndex(b, key), next)
	})
	if err != nil {
		return false, err
	}
	s.locks.holder[key] = session
	return true, nil
}

// Release implements Locker.
func (s *BoltKV) Release(ctx context.Context, key string, value []byte, session string) (bool, error) {
	if key == "" {
		return false, errors.New("metadata store: empty key")
	}
	s.lmu.Lock()
	defer s.lmu.Unlock()
	if s.locks.holder[key] != session {
		return false, nil
	}
	err := s.update(ctx, func(b *bolt.Bucket, next uint64) (bool, error) {
		return putIfIndex(b, key, value, mustIndex(b, key), next)
	})
	if err != nil {
		return false, err
	}
	delete(s.locks.holder, key)
	return true, nil
}

// PutLocked implements Locker.
func (s *BoltKV) PutLocked(ctx context.Context, key string, value []byte, lock, session string) error {
	if key == "" || lock == "" {
		return errors.New("metadata store: empty key")
	}
	s.lmu.Lock()
	defer s.lmu.Unlock()
	if session == "" || s.locks.holder[lock] != session {
		return fmt.Errorf("%s: %s is not held by session %q: %w", key, lock, session, ErrLockLost)
	}
	return s.update(ctx, func(b *bolt.Bucket, next uint64) (bool, error) {
		return putIfIndex(b, key, value, mustIndex(b, key), next)
	})
}

// mustIndex is key's index for putIfIndex: its ModifyIndex, 0 if absent.
func mustIndex(b *bolt.Bucket, key string) uint64 {
	idx, _ := currentIndex(b, key)
	return idx
}

// currentEntry is key's value, if it exists.
func currentEntry(b *bolt.Bucket, key string) ([]byte, bool) {
	v := b.Get([]byte(key))
	if len(v) < 8 {
		return nil, false
	}
	return append([]byte(nil), v[8:]...), true
}

// lockHolder is the session holding key's lock ("" when none).
func (s *BoltKV) lockHolder(key string) string {
	s.lmu.Lock()
	defer s.lmu.Unlock()
	return s.locks.holder[key]
}
