package peer

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"net"
	"time"
)

// The block protocol: the framed binary wire the hot path (block reads,
// writes, syncs, unmaps, forwarded I/O, pings) uses instead of one HTTP/2
// stream per request. See doc.go for the layout and the reasons.

const (
	// blkPreface opens a cleartext block connection, from the client and
	// back from the server; over TLS, ALPN blkALPN says the same.
	// Version 2 added the writer's epoch to the request header and the
	// fence operation: a version 1 peer is refused at the preface/ALPN.
	blkPreface = "UKAIBLK2"
	blkALPN    = "ukai-blk/2"

	reqHdrLen  = 72
	respHdrLen = 16
	reqMagic   = 0xb1
	respMagic  = 0xb2
	// maxMsg bounds the error message of a response.
	maxMsg = 1 << 10
)

// Block protocol operations.
const (
	opPing byte = iota + 1
	opRead
	opWrite
	opSync
	opUnmap
	opFwdRead
	opFwdWrite
	opFwdFlush
	opFwdUnmap
	// opCancel: the client gave up on the request with this tag; the
	// server cancels its context. It has no answer.
	opCancel
	// opFence: from now on the copy refuses writes and unmaps of the
	// image older than (generation, epoch), and answers once those it
	// already accepted are done.
	opFence
	opLast = opFence
)

var opNames = [...]string{
	opPing: "ping", opRead: "read", opWrite: "write", opSync: "sync", opUnmap: "unmap",
	opFwdRead: "forward read", opFwdWrite: "forward write", opFwdFlush: "forward flush", opFwdUnmap: "forward unmap",
	opCancel: "cancel", opFence: "fence",
}

// Request flags.
const (
	flagFUA byte = 1 << 0
)

// Response flags.
const (
	rflagSense   byte = 1 << 0 // sense carries the failure's SCSI sense
	rflagForward byte = 1 << 1 // the answer of a server that serves forwarded I/O
)

// Response codes: the HTTP status codes the HTTP endpoints use, so both
// map to errors the same way.
const (
	codeOK = 200
)

// reqHdr is a request header:
//
//	0  magic 0xb1     1  op     2  flags     3  reserved (0)
//	4  tag (uint32)   8  generation (uint64)
//	16 offset (uint64, at most MaxInt64)
//	24 length (uint64, at most MaxInt64; of the payload for writes)
//	32 image id (32 ASCII hex digits)
//	64 epoch (uint64): the writer's epoch of the copy (writes, unmaps,
//	   fences; 0 in the other operations)
//
// A write's payload (length bytes) follows its header; no other request
// has a payload. Ping and cancel carry an all-zero id.
type reqHdr struct {
	op    byte
	flags byte
	tag   uint32
	gen   uint64
	off   int64
	n     int64
	id    string
	epoch uint64
}

func (h *reqHdr) encode(b *[reqHdrLen]byte) {
	b[0], b[1], b[2], b[3] = reqMagic, h.op, h.flags, 0
	binary.BigEndian.PutUint32(b[4:], h.tag)
	binary.BigEndian.PutUint64(b[8:], h.gen)
	binary.BigEndian.PutUint64(b[16:], uint64(h.off))
	binary.BigEndian.PutUint64(b[24:], uint64(h.n))
	copy(b[32:64], h.id)
	binary.BigEndian.PutUint64(b[64:], h.epoch)
}

// frameError is a header that breaks the framing: the connection cannot
// go on after it.
type frameError struct{ msg string }

func (e *frameError) Error() string { return e.msg }

// decodeReq parses a request header. A *frameError means the stream
// cannot be trusted any more (bad magic, unknown op, a payload length it
// cannot skip); any other error is a malformed request whose payload, if
// any, can be skipped, answered 400.
func decodeReq(b []byte) (reqHdr, error) {
	var h reqHdr
	if len(b) != reqHdrLen {
		return h, &frameError{fmt.Sprintf("request header of %d bytes", len(b))}
	}
	if b[0] != reqMagic {
		return h, &frameError{fmt.Sprintf("bad request magic %#x", b[0])}
	}
	h.op, h.flags = b[1], b[2]
	if h.op == 0 || h.op > opLast {
		return h, &frameError{fmt.Sprintf("unknown operation %d", h.op)}
	}
	h.tag = binary.BigEndian.Uint32(b[4:])
	h.gen = binary.BigEndian.Uint64(b[8:])
	off := binary.BigEndian.Uint64(b[16:])
	n := binary.BigEndian.Uint64(b[24:])
	if hasPayload(h.op) && n > MaxIO {
		return h, &frameError{fmt.Sprintf("%s payload of %d bytes above %d", opNames[h.op], n, MaxIO)}
	}
	if off > math.MaxInt64 || n > math.MaxInt64 {
		return h, fmt.Errorf("%w: offset %d length %d", ErrBadRequest, off, n)
	}
	h.off, h.n = int64(off), int64(n)
	if b[3] != 0 || h.flags&^flagFUA != 0 {
		return h, fmt.Errorf("%w: reserved bits set (%#x %#x)", ErrBadRequest, b[2], b[3])
	}
	h.epoch = binary.BigEndian.Uint64(b[64:])
	id := b[32:64]
	h.id = string(id)
	if !validID(h.id) {
		return h, fmt.Errorf("%w: image id %q is not 32 hex digits", ErrBadRequest, id)
	}
	switch h.op {
	case opPing, opSync, opFwdFlush, opCancel, opFence:
		if h.off != 0 || h.n != 0 || h.flags != 0 {
			return h, fmt.Errorf("%w: %s with offset, length or flags", ErrBadRequest, opNames[h.op])
		}
	case opRead, opFwdRead, opUnmap, opFwdUnmap:
		if h.flags != 0 {
			return h, fmt.Errorf("%w: %s with flags", ErrBadRequest, opNames[h.op])
		}
	}
	return h, nil
}

func hasPayload(op byte) bool { return op == opWrite || op == opFwdWrite }

// isForward reports whether op is forwarded I/O (served by the image's
// owner through ServerConfig.Volumes).
func isForward(op byte) bool { return op >= opFwdRead && op <= opFwdUnmap }

// respHdr is a response header:
//
//	0  magic 0xb2     1  flags     2  code (uint16, an HTTP status)
//	4  tag (uint32)   8  length (uint32) of the payload
//	12 sense key, ASC, ASCQ (with rflagSense)   15 reserved (0)
//
// The payload of a 200 answer to a read is the data, exactly as long as
// asked; of an error, its message (at most 1 KiB); other answers have
// none.
type respHdr struct {
	flags byte
	code  uint16
	tag   uint32
	n     uint32
	sense [3]byte
}

func (h *respHdr) encode(b *[respHdrLen]byte) {
	b[0], b[1] = respMagic, h.flags
	binary.BigEndian.PutUint16(b[2:], h.code)
	binary.BigEndian.PutUint32(b[4:], h.tag)
	binary.BigEndian.PutUint32(b[8:], h.n)
	b[12], b[13], b[14], b[15] = h.sense[0], h.sense[1], h.sense[2], 0
}

// decodeResp parses a response header; any error breaks the framing.
func decodeResp(b []byte) (respHdr, error) {
	var h respHdr
	if len(b) != respHdrLen {
		return h, fmt.Errorf("response header of %d bytes", len(b))
	}
	if b[0] != respMagic || b[15] != 0 {
		return h, fmt.Errorf("bad response header % x", b)
	}
	h.flags = b[1]
	h.code = binary.BigEndian.Uint16(b[2:])
	h.tag = binary.BigEndian.Uint32(b[4:])
	h.n = binary.BigEndian.Uint32(b[8:])
	copy(h.sense[:], b[12:15])
	switch {
	case h.flags&^(rflagSense|rflagForward) != 0:
		return h, fmt.Errorf("bad response flags %#x", h.flags)
	case h.code < 200 || h.code > 599:
		return h, fmt.Errorf("bad response code %d", h.code)
	case h.code != codeOK && h.n > maxMsg:
		return h, fmt.Errorf("error message of %d bytes", h.n)
	case h.n > MaxIO:
		return h, fmt.Errorf("response payload of %d bytes", h.n)
	case h.flags&rflagSense != 0 && h.sense[0] > 0x0f:
		return h, fmt.Errorf("bad sense key %#x", h.sense[0])
	}
	return h, nil
}

// sendBatch writes bufs to w (nc, or bw over nc) within d: one writev on
// a TCP connection; over TLS, bw gathers the pieces and is flushed.
func sendBatch(nc net.Conn, w io.Writer, bw *bufio.Writer, bufs net.Buffers, d time.Duration) error {
	nc.SetWriteDeadline(time.Now().Add(d))
	if _, err := bufs.WriteTo(w); err != nil {
		return err
	}
	if bw != nil {
		return bw.Flush()
	}
	return nil
}
