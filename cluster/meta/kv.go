// Package meta is ukai's metadata store: a versioned key-value seam (KV)
// with an embedded implementation (bbolt, single node) and, in a sibling
// package, a Consul one; and the image catalog built on top of it.
package meta

import (
	"context"
	"crypto/rand"
	"errors"
	"time"
)

// Errors a KV returns; callers test them with errors.Is.
var (
	ErrNotFound = errors.New("key not found")
	// ErrConflict is a failed check-and-set: the key changed since the
	// index the caller read, or already exists on a create.
	ErrConflict = errors.New("changed meanwhile by another request: try again")
	// ErrUnavailable means the store cannot be reached now; the operation
	// may be retried later.
	ErrUnavailable = errors.New("metadata store unavailable")
	// ErrSessionGone means a session was invalidated (not renewed within
	// its TTL, or destroyed): the locks it held are released.
	ErrSessionGone = errors.New("session invalidated")
	// ErrLockLost means a write conditioned on holding a lock (PutLocked)
	// was refused: the session does not hold it.
	ErrLockLost = errors.New("lock not held by the session")
)

// Entry is one key with its value and the index of its last change.
type Entry struct {
	Key         string
	Value       []byte
	ModifyIndex uint64
	// Session is the session holding the key's lock, "" when none does.
	Session string
}

// KV is a versioned key-value store. Keys are '/'-separated paths. Every
// change of a key gives it a ModifyIndex larger than any index the store
// handed out before, so indexes order changes.
//
// Implementations must be safe for concurrent use. Every method honours ctx.
type KV interface {
	// Get returns the entry at key, or ErrNotFound.
	Get(ctx context.Context, key string) (Entry, error)
	// List returns every entry whose key starts with prefix, in key
	// order, and the store's index at the time of the read (usable with
	// Watch).
	List(ctx context.Context, prefix string) ([]Entry, uint64, error)
	// CAS writes value at key only if the key's ModifyIndex is still
	// index; index 0 means "only if the key does not exist". On a
	// mismatch it returns ErrConflict and changes nothing.
	CAS(ctx context.Context, key string, value []byte, index uint64) error
	// CASGuarded is CAS that also requires guard's ModifyIndex to be
	// still guardIndex (a key other writers change: an owner's record),
	// both checked and the write done atomically. ErrConflict if either
	// moved.
	CASGuarded(ctx context.Context, key string, value []byte, index uint64, guard string, guardIndex uint64) error
	// DeleteCAS deletes key only if its ModifyIndex is still index
	// (ErrConflict otherwise; ErrNotFound if it is gone).
	DeleteCAS(ctx context.Context, key string, index uint64) error
	// CASTouch is CAS (value nil: DeleteCAS) that also writes every key
	// of touch with a new value (TouchValue: Consul keeps the index of a
	// key set to the value it holds), all in one atomic step: a change
	// and the doorbells of whoever must hear of it. Nothing is written
	// when the check fails.
	CASTouch(ctx context.Context, key string, value []byte, index uint64, touch []string) error
	// DeleteTree deletes every key under prefix.
	DeleteTree(ctx context.Context, prefix string) error
	// Watch blocks until a key under prefix changed after index, then
	// returns the new store index. It may return earlier (spuriously)
	// with an index >= the given one; callers re-read and compare. It
	// returns ctx.Err() when ctx ends.
	Watch(ctx context.Context, prefix string, index uint64) (uint64, error)
	// Ping checks that the store can be reached now (ErrUnavailable if
	// not).
	Ping(ctx context.Context) error
	// Close releases the store.
	Close() error

	Locker
}

// Locker is the store's own lock service, on which image ownership rests
// (docs/ownership.md). A process holds one session, renews it, and holds
// locks on keys with it. The store, not the holder's clock, decides when
// a session that stopped renewing is invalidated; its locks are then
// released and nobody may take them for the session's lock delay. No
// decision compares the clocks of two nodes.
type Locker interface {
	// CreateSession starts a session named name. The store invalidates it
	// when it was not renewed for ttl (no sooner; Consul waits up to 2×ttl),
	// releases its locks and refuses to give them to anyone for lockDelay.
	CreateSession(ctx context.Context, name string, ttl, lockDelay time.Duration) (string, error)
	// RenewSession restarts the session's TTL. ErrSessionGone when it was
	// invalidated.
	RenewSession(ctx context.Context, id string) error
	// DestroySession invalidates the session now, as if its TTL ran out
	// (its locks released, the lock delay applies). A session already
	// gone is not an error.
	DestroySession(ctx context.Context, id string) error
	// Acquire sets key to value and makes session its lock holder, unless
	// another session holds it or its lock delay runs; it reports whether
	// session holds the lock now. The holder acquiring again keeps it and
	// updates the value. ErrSessionGone when session is invalid.
	Acquire(ctx context.Context, key string, value []byte, session string) (bool, error)
	// Release sets key to value and frees its lock if session holds it
	// (no lock delay: the holder let go on purpose); it reports whether
	// session held it.
	Release(ctx context.Context, key string, value []byte, session string) (bool, error)
	// PutLocked sets key to value only while session holds lock, in one
	// atomic step (Consul: a transaction with check-session); ErrLockLost
	// otherwise. What only an image's owner may write is written so: a
	// node that lost the lock cannot overwrite its successor's.
	PutLocked(ctx context.Context, key string, value []byte, lock, session string) error
}

// TouchValue is a fresh value for a touched key (CASTouch).
func TouchValue() []byte {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return b[:]
}
