package meta

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
)

var (
	bucketKV   = []byte("kv")
	bucketMeta = []byte("meta")
	keyIndex   = []byte("index")
)

// BoltKV is the embedded single-node KV, one bbolt file in the node's data
// directory. Values are stored as an 8-byte ModifyIndex followed by the
// value; a store-wide counter hands out indexes.
type BoltKV struct {
	db *bolt.DB

	mu      sync.Mutex
	changed chan struct{} // closed and replaced on every change

	lmu   sync.Mutex // guards locks; taken before a bolt transaction, never inside one
	locks boltLocks
}

// OpenBolt opens (or creates) the store at path.
func OpenBolt(path string) (*BoltKV, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		if errors.Is(err, bolt.ErrTimeout) {
			return nil, fmt.Errorf("open metadata store %s: locked by another process (is another ukai using this data_dir?)", path)
		}
		return nil, fmt.Errorf("open metadata store %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketKV, bucketMeta} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("init metadata store %s: %w", path, err)
	}
	return &BoltKV{db: db, changed: make(chan struct{}), locks: boltLocks{
		sessions: map[string]*boltSession{}, holder: map[string]string{}, delayed: map[string]time.Time{},
	}}, nil
}

func decodeEntry(k, v []byte) (Entry, error) {
	if len(v) < 8 {
		return Entry{}, fmt.Errorf("metadata store: key %q: stored record is truncated", k)
	}
	return Entry{Key: string(k), ModifyIndex: binary.BigEndian.Uint64(v), Value: bytes.Clone(v[8:])}, nil
}

func storeIndex(tx *bolt.Tx) uint64 {
	v := tx.Bucket(bucketMeta).Get(keyIndex)
	if len(v) != 8 {
		return 0
	}
	return binary.BigEndian.Uint64(v)
}

// Get implements KV.
func (s *BoltKV) Get(ctx context.Context, key string) (Entry, error) {
	if err := ctx.Err(); err != nil {
		return Entry{}, err
	}
	var e Entry
	err := s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketKV).Get([]byte(key))
		if v == nil {
			return ErrNotFound
		}
		var err error
		e, err = decodeEntry([]byte(key), v)
		return err
	})
	e.Session = s.lockHolder(key)
	return e, err
}

// List implements KV.
func (s *BoltKV) List(ctx context.Context, prefix string) ([]Entry, uint64, error) {
	if err := ctx.Err(); err != nil {
		return nil, 0, err
	}
	var out []Entry
	var idx uint64
	err := s.db.View(func(tx *bolt.Tx) error {
		idx = storeIndex(tx)
		c := tx.Bucket(bucketKV).Cursor()
		p := []byte(prefix)
		for k, v := c.Seek(p); k != nil && bytes.HasPrefix(k, p); k, v = c.Next() {
			e, err := decodeEntry(k, v)
			if err != nil {
				return err
			}
			out = append(out, e)
		}
		return nil
	})
	// Not inside the transaction: Acquire holds lmu while it opens one,
	// and a write transaction may wait for readers (remap).
	for i := range out {
		out[i].Session = s.lockHolder(out[i].Key)
	}
	return out, idx, err
}

// update runs fn in a write transaction with the next index, and wakes
// watchers when fn changed something.
func (s *BoltKV) update(ctx context.Context, fn func(b *bolt.Bucket, next uint64) (bool, error)) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	var changed bool
	err := s.db.Update(func(tx *bolt.Tx) error {
		next := storeIndex(tx) + 1
		var err error
		changed, err = fn(tx.Bucket(bucketKV), next)
		if err != nil || !changed {
			return err
		}
		return tx.Bucket(bucketMeta).Put(keyIndex, binary.BigEndian.AppendUint64(nil, next))
	})
	if err == nil && changed {
		s.mu.Lock()
		close(s.changed)
		s.changed = make(chan struct{})
		s.mu.Unlock()
	}
	return err
}

func currentIndex(b *bolt.Bucket, key string) (uint64, bool) {
	v := b.Get([]byte(key))
	if v == nil {
		return 0, false
	}
	if len(v) < 8 {
		return 0, true
	}
	return binary.BigEndian.Uint64(v), true
}

// CAS implements KV.
func (s *BoltKV) CAS(ctx context.Context, key string, value []byte, index uint64) error {
	if key == "" {
		return errors.New("metadata store: empty key")
	}
	return s.update(ctx, func(b *bolt.Bucket, next uint64) (bool, error) {
		return putIfIndex(b, key, value, index, next)
	})
}

// putIfIndex writes value at key with index next if key's index is still
// index (0: only if key does not exist).
func putIfIndex(b *bolt.Bucket, key string, value []byte, index, next uint64) (bool, error) {
	cur, exists := currentIndex(b, key)
	if (index == 0 && exists) || (index != 0 && (!exists || cur != index)) {
		return false, fmt.Errorf("%s: %w", key, ErrConflict)
	}
	v := binary.BigEndian.AppendUint64(make([]byte, 0, 8+len(value)), next)
	return true, b.Put([]byte(key), append(v, value...))
}

// CASGuarded implements KV: both checks and the write in one bolt
// transaction.
func (s *BoltKV) CASGuarded(ctx context.Context, key string, value []byte, index uint64, guard string, guardIndex uint64) error {
	if key == "" || guard == "" {
		return errors.New("metadata store: empty key")
	}
	return s.update(ctx, func(b *bolt.Bucket, next uint64) (bool, error) {
		if g, exists := currentIndex(b, guard); !exists || g != guardIndex {
			return false, fmt.Errorf("%s: modify index is no longer %d: %w", guard, guardIndex, ErrConflict)
		}
		return putIfIndex(b, key, value, index, next)
	})
}

// CASTouch implements KV: one bolt transaction.
func (s *BoltKV) CASTouch(ctx context.Context, key string, value []byte, index uint64, touch []string) error {
	if key == "" {
		return errors.New("metadata store: empty key")
	}
	return s.update(ctx, func(b *bolt.Bucket, next uint64) (bool, error) {
		if value == nil {
			cur, exists := currentIndex(b, key)
			if !exists {
				return false, fmt.Errorf("%s: %w", key, ErrNotFound)
			}
			if cur != index {
				return false, fmt.Errorf("%s: %w", key, ErrConflict)
			}
			if err := b.Delete([]byte(key)); err != nil {
				return false, err
			}
		} else if _, err := putIfIndex(b, key, value, index, next); err != nil {
			return false, err
		}
		for _, t := range touch {
			if t == "" {
				return false, errors.New("metadata store: empty key")
			}
			if _, err := putIfIndex(b, t, TouchValue(), mustIndex(b, t), next); err != nil {
				return false, err
			}
		}
		return true, nil
	})
}

// DeleteCAS implements KV.
func (s *BoltKV) DeleteCAS(ctx context.Context, key string, index uint64) error {
	return s.update(ctx, func(b *bolt.Bucket, _ uint64) (bool, error) {
		cur, exists := currentIndex(b, key)
		if !exists {
			return false, fmt.Errorf("%s: %w", key, ErrNotFound)
		}
		if cur != index {
			return false, fmt.Errorf("%s: %w", key, ErrConflict)
		}
		return true, b.Delete([]byte(key))
	})
}

// DeleteTree implements KV.
func (s *BoltKV) DeleteTree(ctx context.Context, prefix string) error {
	return s.update(ctx, func(b *bolt.Bucket, _ uint64) (bool, error) {
		var keys [][]byte
		c := b.Cursor()
		p := []byte(prefix)
		for k, _ := c.Seek(p); k != nil && bytes.HasPrefix(k, p); k, _ = c.Next() {
			keys = append(keys, bytes.Clone(k))
		}
		for _, k := range keys {
			if err := b.Delete(k); err != nil {
				return false, err
			}
		}
		return len(keys) > 0, nil
	})
}

// Watch implements KV. The embedded store returns at once when anything in
// the store changed after index (deletions leave no key to compare, so any
// change counts; the caller re-reads), else it waits for the next change.
func (s *BoltKV) Watch(ctx context.Context, prefix string, index uint64) (uint64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	s.mu.Lock()
	ch := s.changed
	s.mu.Unlock()
	if idx := s.index(); idx > index {
		return idx, nil
	}
	select {
	case <-ch:
		return s.index(), nil
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

func (s *BoltKV) index() uint64 {
	var idx uint64
	_ = s.db.View(func(tx *bolt.Tx) error { idx = storeIndex(tx); return nil })
	return idx
}

// Ping implements KV: a local file is always reachable.
func (s *BoltKV) Ping(ctx context.Context) error { return ctx.Err() }

// Close implements KV.
func (s *BoltKV) Close() error { return s.db.Close() }
