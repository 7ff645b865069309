package peer

import (
	"context"

	"github.com/ukai-storage/ukai/target/lun"
)

// RemoteCopy adapts a client to lun.Copy for image ref, so a volume treats
// local and remote copies alike. Close is a no-op: the client belongs to
// whoever created it.
func RemoteCopy(c *Client, ref Ref) lun.Copy { return &remoteCopy{c: c, ref: ref} }

type remoteCopy struct {
	c   *Client
	ref Ref
}

func (r *remoteCopy) ReadAt(ctx context.Context, p []byte, off int64) error {
	return r.c.ReadAt(ctx, r.ref, p, off)
}

func (r *remoteCopy) WriteAt(ctx context.Context, p []byte, off int64, durable bool) error {
	return r.c.WriteAt(ctx, r.ref, p, off, durable)
}

func (r *remoteCopy) Sync(ctx context.Context) error { return r.c.Sync(ctx, r.ref) }

func (r *remoteCopy) Unmap(ctx context.Context, off, n int64) error {
	return r.c.Unmap(ctx, r.ref, off, n)
}

func (r *remoteCopy) Close() error { return nil }
