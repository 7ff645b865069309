package meta

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
)

// The activity log of an image (<prefix>activity/<image id>): the blocks
// its owner may be writing, recorded before the writes start and cleared
// lazily, in the spirit of DRBD's activity log. A node that takes the
// image over reconciles these blocks between the copies before serving
// I/O, so that a write in flight when an owner died cannot leave in-sync
// copies that differ.

type activityRecord struct {
	Version int     `json:"version"`
	Owner   string  `json:"owner"`
	Blocks  []int64 `json:"blocks"`
}

func (c *Catalog) activityKey(id string) string { return c.prefix + "activity/" + id }

// Activity returns the blocks in img's activity log.
func (c *Catalog) Activity(ctx context.Context, img Image) ([]int64, error) {
	e, err := c.kv.Get(ctx, c.activityKey(img.ID))
	if errors.Is(err, ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read activity log of %q: %w", img.Name, err)
	}
	var r activityRecord
	if err := json.Unmarshal(e.Value, &r); err != nil || r.Version != 1 {
		if err == nil {
			err = fmt.Errorf("unknown version %d", r.Version)
		}
		// Unreadable: the caller must treat every block as suspect.
		return nil, &MalformedError{Key: e.Key, Err: err}
	}
	return r.Blocks, nil
}

// SetActivity replaces img's activity log with blocks (owner names the
// writer, for operators reading the key), only while session holds the
// image's ownership lock (KV.PutLocked; ErrNotOwner otherwise): a node
// that lost the image, whose write waited past its session, cannot
// replace the log its successor keeps. Same cost as a plain write: one
// transaction.
func (c *Catalog) SetActivity(ctx context.Context, img Image, owner, session string, blocks []int64) error {
	key := c.activityKey(img.ID)
	blocks = slices.Clone(blocks)
	slices.Sort(blocks)
	data, err := json.Marshal(activityRecord{Version: 1, Owner: owner, Blocks: blocks})
	if err != nil {
		return err
	}
	if err := c.kv.PutLocked(ctx, key, data, c.ownerKey(img.ID), session); err != nil {
		if errors.Is(err, ErrLockLost) {
			return fmt.Errorf("activity log of %q: %w: %w", img.Name, ErrNotOwner, err)
		}
		return fmt.Errorf("activity log of %q: %w", img.Name, err)
	}
	return nil
}
