// Package peer is the peer data transport: how the node that serves an
// image's I/O (its owner) reaches the copies of that image kept on other
// nodes.
//
// # Transport
//
// HTTP/2 over TCP from the standard library. Without a TLS configuration
// the server and the client speak cleartext HTTP/2 with prior knowledge
// (h2c; http.Server.Protocols / http.Transport.Protocols with
// SetUnencryptedHTTP2); with a *tls.Config they speak HTTP/2 over TLS
// (ALPN "h2"), which is where mutual authentication plugs in. HTTP/1 is
// never offered.
//
// A Client keeps one multiplexed connection to its peer: every request is
// an HTTP/2 stream on it, so many requests are in flight at once, there is
// no per-request connection set-up, and large transfers (ReadRange,
// Checksums) are streamed. The HTTP/2 flow-control windows are raised
// from the defaults (see window* constants) so a multi-MiB block transfer
// is not window-bound on a fast link; the numbers are measured in the
// package benchmarks.
//
// # Wire
//
// All requests live under /peer/v1/. The image reference and the
// arguments travel in small headers (Ukai-Id, Ukai-Gen, Ukai-Off,
// Ukai-Len, Ukai-Fua, Ukai-From, Ukai-To); data travels as raw binary
// bodies:
//
//	GET  /peer/v1/ping                         204
//	GET  /peer/v1/read      Id Gen Off Len     200, Len bytes
//	PUT  /peer/v1/write     Id Gen Off Len Fua body of Len bytes; 204
//	POST /peer/v1/sync      Id Gen             204
//	POST /peer/v1/unmap     Id Gen Off Len     204
//	GET  /peer/v1/checksums Id Gen From To     200, streamed: 32 bytes per block
//	GET  /peer/v1/range     Id Gen From To     200, streamed: the blocks' bytes
//	GET  /peer/v1/io/read   Id Gen Off Len     200, Len bytes       (forwarded)
//	PUT  /peer/v1/io/write  Id Gen Off Len Fua body of Len bytes; 204 (forwarded)
//	POST /peer/v1/io/flush  Id Gen             204                  (forwarded)
//	POST /peer/v1/io/unmap  Id Gen Off Len     empty body; 204      (forwarded)
//
// Streamed responses carry the image geometry in Ukai-Size and
// Ukai-Block-Size and end with the trailer Ukai-Status: "ok", or
// "<status code> <message>" when the server failed part way; a response
// without the "ok" trailer is an error on the client, never a short
// success.
//
// Errors are status codes with a text body: 404 the node holds no copy of
// the image (ErrNoCopy), 409 the request's generation is older than the
// newest the node has seen (ErrStaleGeneration), 400 a malformed or
// out-of-range request (ErrBadRequest), 500 the copy failed, 503 the
// server is overloaded or closing. On the client, transport errors,
// timeouts, truncated or lying responses and 5xx answers other than 500
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
// answers the /peer/v1/io/ endpoints 404 without the Ukai-Forward header,
// which the client reports as ErrUnavailable, not as an unknown image.
//
// Errors: 421 the node is not the image's owner (ErrNotOwner; re-resolve
// the owner and retry there), 404 unknown image (ErrUnknownImage), 409
// stale generation, 400 bad request, 500 the Backend failed: when its
// error carries a SCSI sense (SenseCarrier) the sense travels in the
// Ukai-Sense header ("KK/AA/QQ", hex) and the client returns a
// *ForwardedError with it, so the forwarding node answers the initiator
// with the owner's sense; without a sense, a plain error. An owner-side
// failure is never reported as success.
//
// Forwarded writes and unmaps are not idempotent with respect to later
// writes, so they are resent on another connection (the HTTP/2
// transport's retry after GOAWAY, a refused stream or a protocol error)
// only while it is certain the owner did not apply them: the owner acts
// only once the request stream ended, and the client refuses to hand the
// transport a fresh body once one attempt's body got to its end. A
// timed-out forwarded request is ErrUnavailable; the forwarding node
// reports a SCSI error, never an acknowledgement. The owner's Backend
// sees the request's context cancelled when the forwarding node gave up.
//
// # Validation
//
// The server validates every request before touching a copy: the image
// id (32 hex digits), offsets and lengths aligned to 512 bytes (a length
// may end unaligned exactly at the end of the image), lengths at most
// MaxIO, ranges inside the image, and a write body exactly as long as
// declared. Declared lengths are never trusted to allocate: bodies are
// read into pooled buffers sized by validated lengths only. The Store is
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
