// Package blockdev is the interface a copy of an image implements, shared
// by the LUN backend (which writes to copies) and the data transport
// (which serves a node's copies to its peers and stands for a remote copy
// in a volume), so that neither imports the other.
package blockdev

import "context"

// Copy is one copy of an image: byte-addressed, thread-safe storage (a
// local file, or a copy on another node reached through the data
// transport). Methods honour ctx where the medium can block.
type Copy interface {
	ReadAt(ctx context.Context, p []byte, off int64) error
	// WriteAt writes p at off; with durable it is on stable storage when
	// WriteAt returns.
	WriteAt(ctx context.Context, p []byte, off int64, durable bool) error
	// Sync makes every completed write durable.
	Sync(ctx context.Context) error
	// Unmap deallocates [off, off+n): reads return zeros, space is freed.
	Unmap(ctx context.Context, off, n int64) error
	Close() error
}

// Fencer is a copy that can order the writes sent to it before against
// the ones after (cluster/peer: a remote copy). Fence returns once no
// write sent before it can be applied any more.
type Fencer interface {
	Fence(ctx context.Context) error
}
