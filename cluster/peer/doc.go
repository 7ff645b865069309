// Package peer is the peer data transport: how the node that serves an
// image's I/O (its owner) reaches the copies of that image kept on other
// nodes.
//
// # Transport
//
// Two protocols share the peer port, told apart when a connection opens
// (over TLS by ALPN, in cleartext by the first eight bytes):
//
//   - the block protocol (ALPN "ukai-blk/2", cleartext preface
//     "UKAIBLK2" sent by both ends) carries every block request: read,
//     write, sync, unmap, fence, the forwarded I/O and ping;
//   - HTTP/2 from the standard library (ALPN "h2", or h2c with prior
//     knowledge) carries the streamed transfers of whole block ranges:
//     checksums and block data for synchronization.
//
// A Client keeps one connection of each kind to its peer, opened on first
// use and again after a failure.
//
// # Block protocol
//
// Requests and answers are frames with a fixed binary header (frame.go):
// a request is 72 bytes (magic 0xb1, operation, flags (FUA), a reserved
// byte, a 32-bit tag, the generation, offset and length as 64-bit
// big-endian numbers, the image id as its 32 hex digits, the writer's
// epoch as a 64-bit number) followed, for a write, by exactly length
// bytes of data; an answer is 16 bytes (magic
// 0xb2, flags, an HTTP-like status code, the tag, the payload length and
// a SCSI sense) followed by the read's data or an error message (at most
// 1 KiB). Tags match answers to requests, which complete in any order,
// so many requests are in flight on the one connection.
//
// Why not HTTP/2 for these (measured, 2026-11-28, BenchmarkIO 4 KiB on
// loopback): one HTTP/2 stream per request cost 100-175 us at depth 1
// (headers, data and end of stream each a separate write system call,
// per-stream goroutines, header encoding); the framed protocol does 29 us
// for a read at depth 1 and 11.7 us per read at depth 16 (105 and 43 us
// before). On the client, requests queued while one is being sent go out
// together in one writev; a caller that finds nobody sending sends its own
// request, a goroutine hop less. On the server, one goroutine reads
// frames, long-lived workers (started as needed, at most MaxInflight per
// connection) serve them, and answers go out the same way, batched.
//
// A client that gives up on a request (timeout or its context) sends a
// cancel frame for the tag: the server cancels that request's context.
// Requests are never resent: an error means the request may or may not
// have been applied (callers mark the copy out of sync; a forwarding node
// answers the initiator with a SCSI error).
//
// Server-side limits: MaxInflight requests at once over all connections
// and 256 MiB of request and answer data held at once; beyond them the
// server stops reading, so TCP pushes back on the client. A write payload
// must arrive within a minute of its header.
//
// # Wire of the HTTP/2 side
//
// Requests live under /peer/v1/. The image reference and the arguments
// travel in small headers (Ukai-Id, Ukai-Gen, Ukai-From, Ukai-To):
//
//	GET  /peer/v1/checksums Id Gen From To     200, streamed: 32 bytes per block
//	GET  /peer/v1/range     Id Gen From To     200, streamed: the blocks' bytes
//
// Streamed responses carry the image geometry in Ukai-Size and
// Ukai-Block-Size and end with the trailer Ukai-Status: "ok", or
// "<status code> <message>" when the server failed part way; a response
// without the "ok" trailer is an error on the client, never a short
// success.
//
// # Errors
//
// Both protocols answer with the same codes: 404 the node holds no copy
// of the image (ErrNoCopy), 409 the request's generation is older than
// the newest the node has seen (ErrStaleGeneration), 400 a malformed or
// out-of-range request (ErrBadRequest), 500 the copy failed, 503 the
// server is overloaded or closing. On the client, transport errors,
// timeouts, truncated or lying answers and 5xx answers other than 500
// wrap ErrUnavailable together with the peer address; callers mark the
// copy out of sync.
//
// # Forwarding
//
// Each image has one owner node that does all its I/O. A node the
// hypervisor logged in to that is not the owner (a live-migration
// destination while the source still writes through the owner) forwards
// the SCSI-level I/O to the owner with Client.ForwardRead/Write/Flush/
// Unmap; the owner's server (ServerConfig.Volumes) executes it through the
// image's Backend, its replicated volume. A server without Volumes
// answers forwarded requests 404 without the forwarding flag, which the
// client reports as ErrUnavailable, not as an unknown image.
//
// Errors: 421 the node is not the image's owner (ErrNotOwner; re-resolve
// the owner and retry there), 404 unknown image (ErrUnknownImage), 409
// stale generation, 400 bad request, 500 the Backend failed: when its
// error carries a SCSI sense (SenseCarrier) the sense travels in the
// answer and the client returns a *ForwardedError with it, so the
// forwarding node answers the initiator with the owner's sense; without a
// sense, a plain error. An owner-side failure is never reported as
// success. The owner acts on a forwarded write only once its whole
// payload arrived, and never twice: the client does not resend.
//
// # Validation
//
// The server validates every request before touching a copy: the frame
// (magic, a known operation, no reserved bits; a frame that breaks these
// or announces a payload above MaxIO ends the connection, since the
// stream cannot be followed any more; other malformed requests are
// answered 400 and the connection goes on), the image id (32 hex digits), offsets and lengths aligned to 512 bytes (a length
// may end unaligned exactly at the end of the image), lengths at most
// MaxIO, ranges inside the image. Declared lengths are never trusted to
// allocate beyond MaxIO and the byte budget: payloads are read into pooled
// buffers. The Store is
// consulted for every request, so a request for a deleted or recreated
// image (other id) or from a fenced-off writer (older generation) is never
// applied.
//
// # Timeouts
//
// Every client call runs under ClientConfig.Timeout (10s by default); for
// the streamed calls the timeout applies per block (per received sum for
// Checksums) rather than to the whole transfer. A timeout is reported as
// ErrUnavailable; a cancelled caller context is reported as the context's
// error.
package peer
