package peer

import (
	"context"
	"errors"
	"fmt"
)

// Forwarding: a node that is not an image's owner (a live-migration
// destination the hypervisor logged in to early) forwards the SCSI-level
// I/O to the owner, which executes it through its replicated volume.

// Volumes is the owner side of forwarding: the node's view of the images
// it serves.
type Volumes interface {
	// Volume returns the backend through which this node would serve
	// image ref.ID's I/O. It returns an error wrapping ErrNotOwner when
	// this node is not (and cannot become) the image's owner (the caller
	// re-resolves the owner and retries), ErrUnknownImage for an unknown
	// id, ErrStaleGeneration when ref.Gen is older than the owner's
	// current generation. The server calls it for every request and never
	// closes the backend.
	Volume(ctx context.Context, ref Ref) (Backend, error)
}

// Backend is the SCSI-facing I/O of an image: the method set of
// scsi.Backend (target/scsi), declared here so the same value satisfies
// both. The server checks alignment and MaxIO; the Backend checks the
// range against the image. An error that carries a SCSI sense (see
// SenseCarrier) reaches the forwarding node with that sense. A Backend
// should return an error wrapping ErrNotOwner only if it did not apply
// the request: the forwarding node retries it on the new owner.
type Backend interface {
	ReadAt(ctx context.Context, p []byte, off int64) error
	WriteAt(ctx context.Context, p []byte, off int64, fua bool) error
	Flush(ctx context.Context) error
	Unmap(ctx context.Context, off, length int64) error
}

// SenseCarrier is an error that carries the SCSI sense a failed command
// reports (scsi.SenseError implements it). On the owner, a Backend error
// that is or wraps a SenseCarrier sends its sense across the hop; on the
// forwarding node it comes back as a *ForwardedError.
type SenseCarrier interface {
	SCSISense() (key, asc, ascq byte)
}

// ForwardedError is an owner-side Backend failure that carried a SCSI
// sense, as the forwarding node sees it; the forwarding node answers the
// initiator with the same sense. Msg is the owner's error message,
// prefixed with the owner's address and the operation.
type ForwardedError struct {
	Key, ASC, ASCQ byte
	Msg            string
}

func (e *ForwardedError) Error() string {
	return fmt.Sprintf("%s (owner sense %x/%02x/%02x)", e.Msg, e.Key, e.ASC, e.ASCQ)
}

// SCSISense returns the owner's sense.
func (e *ForwardedError) SCSISense() (key, asc, ascq byte) { return e.Key, e.ASC, e.ASCQ }

var (
	// ErrNotOwner: the node is not the image's owner (HTTP 421); the
	// request was not applied. The caller re-resolves the owner and
	// retries there.
	ErrNotOwner = errors.New("peer is not the image's owner")
	// ErrUnknownImage: the owner does not know the image id (HTTP 404 on
	// a forwarding endpoint).
	ErrUnknownImage = errors.New("unknown image")

	errNoForwarding = errors.New("peer does not serve forwarded I/O")
)

// ForwardRead reads len(p) bytes at off of image ref into p through its
// owner (the peer). off and len(p) must be multiples of 512, len(p) at
// most MaxIO.
func (c *Client) ForwardRead(ctx context.Context, ref Ref, p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	if err := c.checkIO("forward read", len(p)); err != nil {
		return err
	}
	return c.roundTrip(ctx, reqHdr{op: opFwdRead, id: ref.ID, gen: ref.Gen, off: off, n: int64(len(p))}, nil, p)
}

// ForwardWrite writes p at off of image ref through its owner (the peer);
// with fua the data is on stable storage (of every copy that counts)
// when it returns nil. A nil return is the owner's acknowledgement; any
// error means the write may or may not have been applied (SCSI: the
// command failed). It is never resent; a timeout is ErrUnavailable.
func (c *Client) ForwardWrite(ctx context.Context, ref Ref, p []byte, off int64, fua bool) error {
	if len(p) == 0 {
		return nil
	}
	if err := c.checkIO("forward write", len(p)); err != nil {
		return err
	}
	h := reqHdr{op: opFwdWrite, id: ref.ID, gen: ref.Gen, off: off, n: int64(len(p))}
	if fua {
		h.flags = flagFUA
	}
	return c.roundTrip(ctx, h, p, nil)
}

// ForwardFlush makes every forwarded write to image ref that completed
// before the call durable, through its owner (the peer).
func (c *Client) ForwardFlush(ctx context.Context, ref Ref) error {
	return c.roundTrip(ctx, reqHdr{op: opFwdFlush, id: ref.ID, gen: ref.Gen}, nil, nil)
}

// ForwardUnmap deallocates [off, off+n) of image ref through its owner
// (the peer). Like a write, it is never resent.
func (c *Client) ForwardUnmap(ctx context.Context, ref Ref, off, n int64) error {
	return c.roundTrip(ctx, reqHdr{op: opFwdUnmap, id: ref.ID, gen: ref.Gen, off: off, n: n}, nil, nil)
}
