package peer

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"sync"

	"github.com/ukai-storage/ukai/target/blockdev"
)

// Ref identifies the image a request is for: a peer never applies a
// request meant for a deleted or recreated image (IDs differ) or from a
// fenced-off writer (older generation).
type Ref struct {
	ID  string // 32 hex digits
	Gen uint64
	// Epoch is the writer's epoch of the copy, carried by writes, unmaps
	// and fences: a fence at (Gen, Epoch) makes the copy refuse every
	// later write or unmap with an older (Gen, Epoch), so a write that
	// timed out on its way cannot land after the block was synced.
	Epoch uint64
}

func (r Ref) String() string { return fmt.Sprintf("%s@%d", r.ID, r.Gen) }

// Caller is who sent a request, as far as the transport verified it.
type Caller struct {
	// Node is the node name (CommonName) of the client's certificate,
	// verified against the cluster CA; "" on a cleartext connection.
	Node string
	// Addr is the remote address, for logs.
	Addr string
}

// Access is what a request does to a copy.
type Access int

const (
	// AccessRead: reads, checksums, ranges.
	AccessRead Access = iota
	// AccessWrite: writes, unmaps, syncs and fences: only the image's
	// owner may.
	AccessWrite
)

// Store is the node's side: the copies it holds.
type Store interface {
	// Open returns the node's copy of image ref.ID and the image geometry
	// for a request of caller. It returns an error wrapping ErrNoCopy if
	// the node holds no copy of that id, ErrStaleGeneration if ref.Gen is
	// older than the image's generation, ErrForbidden if the caller may
	// not do that (AccessWrite: it is not the image's current owner, or
	// ref.Gen is not the generation the image's record holds). The server
	// calls Open for every request. The Store keeps ownership of the
	// copy: the server never closes it.
	Open(ctx context.Context, ref Ref, caller Caller, a Access) (Local, error)
}

// Local is a node's copy of an image and the image geometry.
type Local struct {
	Copy      blockdev.Copy
	Size      int64 // bytes
	BlockSize int64 // bytes
}

// Sum is the SHA-256 of one block's bytes (the last block: its real
// length). A hole hashes like zeros.
type Sum [32]byte

var (
	// ErrNoCopy: the peer holds no copy of the image id (HTTP 404).
	ErrNoCopy = errors.New("peer holds no copy of the image")
	// ErrStaleGeneration: the request's generation is older than the
	// newest the peer has seen for the image (HTTP 409).
	ErrStaleGeneration = errors.New("stale image generation")
	// ErrUnavailable: the peer is unreachable, timed out, reset the
	// connection, answered 5xx (other than 500) or sent a truncated or
	// inconsistent response. Callers mark the copy out of sync.
	ErrUnavailable = errors.New("peer unavailable")
	// ErrBadRequest: the request is malformed, unaligned, out of range or
	// too large (HTTP 400).
	ErrBadRequest = errors.New("bad peer request")
	// ErrForbidden: the caller may not do that to the copy: it is not the
	// image's owner, not a cluster member, or its generation is not the
	// record's (HTTP 403).
	ErrForbidden = errors.New("peer refused the request: not the image's owner")
	// ErrStaleEpoch: a write or unmap older than the copy's last fence
	// (HTTP 412). The writer treats the copy as failed for those blocks.
	ErrStaleEpoch = errors.New("write older than the copy's last fence")
)

const (
	// Align is the alignment of offsets and lengths.
	Align = 512
	// MaxIO is the largest ReadAt/WriteAt length.
	MaxIO = 64 << 20
	// maxBlockSize bounds the block size a streamed response may declare.
	maxBlockSize = 64 << 20
)

// validID reports whether id is 32 hex digits.
func validID(id string) bool {
	if len(id) != 32 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return false
		}
	}
	return true
}

// checkExtent validates [off, off+n) against an image of size bytes.
// A zero n is refused; maxLen > 0 bounds n.
func checkExtent(off, n, size int64, maxLen int64) error {
	switch {
	case off < 0 || n <= 0:
		return fmt.Errorf("%w: offset %d length %d", ErrBadRequest, off, n)
	case off%Align != 0:
		return fmt.Errorf("%w: offset %d not aligned to %d", ErrBadRequest, off, Align)
	case maxLen > 0 && n > maxLen:
		return fmt.Errorf("%w: length %d above %d", ErrBadRequest, n, maxLen)
	case off > size || n > size-off:
		return fmt.Errorf("%w: %d bytes at %d beyond image size %d", ErrBadRequest, n, off, size)
	case n%Align != 0 && off+n != size:
		return fmt.Errorf("%w: length %d not aligned to %d", ErrBadRequest, n, Align)
	}
	return nil
}

// checkBlocks validates the block range [from, to) against the geometry
// (every block index inside the image).
func checkBlocks(from, to int64, l Local) error {
	nb := (l.Size + l.BlockSize - 1) / l.BlockSize
	if from < 0 || to <= from || to > nb {
		return fmt.Errorf("%w: blocks [%d,%d) outside [0,%d)", ErrBadRequest, from, to, nb)
	}
	return nil
}

// blockLen is the real length of block b.
func blockLen(b, size, bs int64) int64 {
	return min(bs, size-b*bs)
}

// pool hands out byte buffers in power-of-two size classes from 4 KiB to
// MaxIO so bodies are not allocated per request.
type pool struct {
	classes [minClassShift + 1]sync.Pool // index: log2(size) - 12
}

const (
	minClass      = 12 // 4 KiB
	maxClass      = 26 // 64 MiB
	minClassShift = maxClass - minClass
)

func classOf(n int) int {
	if n <= 1<<minClass {
		return 0
	}
	return bits.Len(uint(n-1)) - minClass
}

// get returns a buffer of length n (n <= MaxIO). Release it with put.
func (p *pool) get(n int) *[]byte {
	c := classOf(n)
	if v := p.classes[c].Get(); v != nil {
		b := v.(*[]byte)
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<(c+minClass))
	return &b
}

func (p *pool) put(b *[]byte) {
	c := classOf(cap(*b))
	if cap(*b) != 1<<(c+minClass) {
		return
	}
	p.classes[c].Put(b)
}
