package meta

import (
	"context"
	"errors"
	"fmt"
)

// Ownership locks. <prefix>owners/<image id> is the lock whose holder
// does the image's I/O (package ownership has the rule); its value names
// the node that took it. The image record's Owner and Generation say who
// took it last and are written only when the owner changes (a takeover,
// a release), never to keep ownership alive: nothing periodic touches a
// key other nodes watch.

func (c *Catalog) ownerKey(id string) string { return c.prefix + "owners/" + id }

// OwnershipLock returns the session holding image id's ownership lock
// ("" when free) and the node named in it ("" when never taken).
func (c *Catalog) OwnershipLock(ctx context.Context, id string) (session, node string, err error) {
	e, err := c.kv.Get(ctx, c.ownerKey(id))
	if errors.Is(err, ErrNotFound) {
		return "", "", nil
	}
	if err != nil {
		return "", "", fmt.Errorf("read the ownership lock of image id %s: %w", id, err)
	}
	if e.Session != "" && !NodeNameRE.Match(e.Value) {
		// A holder that names no node is reported as held by nobody we
		// could forward to; its session still keeps everyone out.
		c.reportMalformed(e.Key, fmt.Errorf("ownership lock value %q is not a node name", e.Value))
		return e.Session, "", nil
	}
	return e.Session, string(e.Value), nil
}

// AcquireOwnership takes image id's ownership lock for node with session;
// false when another session holds it or its lock delay runs.
func (c *Catalog) AcquireOwnership(ctx context.Context, id, node, session string) (bool, error) {
	ok, err := c.kv.Acquire(ctx, c.ownerKey(id), []byte(node), session)
	if err != nil {
		return false, fmt.Errorf("acquire the ownership lock of image id %s: %w", id, err)
	}
	return ok, nil
}

// ReleaseOwnership frees image id's ownership lock if session holds it.
func (c *Catalog) ReleaseOwnership(ctx context.Context, id, node, session string) error {
	if _, err := c.kv.Release(ctx, c.ownerKey(id), []byte(node), session); err != nil {
		return fmt.Errorf("release the ownership lock of image id %s: %w", id, err)
	}
	return nil
}
