package peer

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/ukai-storage/ukai/target/blockdev"
)

// RemoteCopy adapts a client to blockdev.Copy for image ref, so a volume treats
// local and remote copies alike. Close is a no-op: the client belongs to
// whoever created it. It is a blockdev.Fencer: writes and unmaps carry its
// epoch, which Fence raises.
func RemoteCopy(c *Client, ref Ref) blockdev.Copy {
	r := &remoteCopy{c: c, ref: ref}
	// The epoch starts at the clock so that a copy made later (a record
	// change, the owner restarted) starts above every epoch an earlier one
	// of this generation fenced at.
	r.epoch.Store(uint64(time.Now().UnixNano()))
	return r
}

type remoteCopy struct {
	c     *Client
	ref   Ref
	epoch atomic.Uint64
}

func (r *remoteCopy) now() Ref {
	ref := r.ref
	ref.Epoch = r.epoch.Load()
	return ref
}

func (r *remoteCopy) ReadAt(ctx context.Context, p []byte, off int64) error {
	return r.c.ReadAt(ctx, r.ref, p, off)
}

func (r *remoteCopy) WriteAt(ctx context.Context, p []byte, off int64, durable bool) error {
	return r.c.WriteAt(ctx, r.now(), p, off, durable)
}

func (r *remoteCopy) Sync(ctx context.Context) error { return r.c.Sync(ctx, r.ref) }

func (r *remoteCopy) Unmap(ctx context.Context, off, n int64) error {
	return r.c.Unmap(ctx, r.now(), off, n)
}

// Fence implements blockdev.Fencer: a new epoch, and the copy fenced at it.
func (r *remoteCopy) Fence(ctx context.Context) error {
	ref := r.ref
	ref.Epoch = r.epoch.Add(1)
	return r.c.Fence(ctx, ref)
}

func (r *remoteCopy) Close() error { return nil }
