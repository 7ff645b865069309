package peer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
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
	errNoReplay     = errors.New("forwarded request may have reached the owner; not resent")
)

// fwdReq is a validated forwarded request.
type fwdReq struct {
	ref    Ref
	off, n int64
	fua    bool
}

// fwdOp serves one validated forwarded request on b; it returns an error
// if nothing was written to w yet.
type fwdOp func(ctx context.Context, w http.ResponseWriter, r *http.Request, q fwdReq, b Backend) error

// fwdKind says which arguments a forwarded request carries.
type fwdKind int

const (
	fwdNone   fwdKind = iota // flush
	fwdExtent                // read, unmap
	fwdWrite                 // write: extent, fua, body
)

func (s *Server) routeForward(mux *http.ServeMux) {
	if s.cfg.Volumes == nil {
		off := func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, errNoForwarding.Error(), http.StatusNotFound)
		}
		for _, p := range []string{pathFwdRead, pathFwdWrite, pathFwdFlush, pathFwdUnmap} {
			mux.HandleFunc(p, off)
		}
		return
	}
	mux.HandleFunc("GET "+pathFwdRead, s.handleFwd("forward read", fwdExtent, MaxIO, s.fwdRead))
	mux.HandleFunc("PUT "+pathFwdWrite, s.handleFwd("forward write", fwdWrite, MaxIO, s.fwdWrite))
	mux.HandleFunc("POST "+pathFwdFlush, s.handleFwd("forward flush", fwdNone, 0, s.fwdFlush))
	mux.HandleFunc("POST "+pathFwdUnmap, s.handleFwd("forward unmap", fwdExtent, 0, s.fwdUnmap))
}

func (s *Server) handleFwd(name string, kind fwdKind, maxLen int64, fn fwdOp) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		s.handlers.Add(1)
		defer s.handlers.Done()
		// Marks the answer as coming from a forwarding endpoint (a 404
		// from a node without one is not "unknown image").
		w.Header().Set(hForward, "1")
		ctx := r.Context()
		err := s.serveFwd(ctx, w, r, kind, maxLen, fn)
		if err != nil {
			s.reply(ctx, w, r, name, err, true)
		}
	}
}

func (s *Server) serveFwd(ctx context.Context, w http.ResponseWriter, r *http.Request, kind fwdKind, maxLen int64, fn fwdOp) error {
	var q fwdReq
	q.ref.ID = r.Header.Get(hID)
	if !validID(q.ref.ID) {
		return fmt.Errorf("%w: image id %q is not 32 hex digits", ErrBadRequest, q.ref.ID)
	}
	var err error
	if q.ref.Gen, err = headerUint(r.Header, hGen); err != nil {
		return err
	}
	if kind != fwdNone {
		// The image size is the Backend's business: here only alignment,
		// MaxIO and overflow.
		if q.off, q.n, err = extent(r, math.MaxInt64, maxLen); err != nil {
			return err
		}
		if q.n%Align != 0 {
			return fmt.Errorf("%w: length %d not aligned to %d", ErrBadRequest, q.n, Align)
		}
	}
	if kind == fwdWrite {
		switch v := r.Header.Get(hFua); v {
		case "", "0":
		case "1":
			q.fua = true
		default:
			return fmt.Errorf("%w: header %s: %q", ErrBadRequest, hFua, v)
		}
		if r.ContentLength != q.n {
			return fmt.Errorf("%w: body length %d, declared %d", ErrBadRequest, r.ContentLength, q.n)
		}
	}
	select {
	case s.sem <- struct{}{}:
	case <-ctx.Done():
		return context.Cause(ctx)
	}
	defer func() { <-s.sem }()
	b, err := s.cfg.Volumes.Volume(ctx, q.ref)
	if err != nil {
		return fmt.Errorf("volume %s: %w", q.ref, err)
	}
	if b == nil {
		return fmt.Errorf("volume %s: no backend", q.ref)
	}
	return fn(ctx, w, r, q, b)
}

func (s *Server) fwdRead(ctx context.Context, w http.ResponseWriter, r *http.Request, q fwdReq, b Backend) error {
	buf := s.bufs.get(int(q.n))
	defer s.bufs.put(buf)
	if err := b.ReadAt(ctx, *buf, q.off); err != nil {
		return err
	}
	w.Header().Set("Content-Length", strconv.FormatInt(q.n, 10))
	w.Header().Set("Content-Type", "application/octet-stream")
	w.WriteHeader(http.StatusOK)
	w.Write(*buf) // a failure is the client gone; the HTTP/2 writer is done with buf on return
	return nil
}

// fwdWrite applies the write only once its whole body arrived, ended by
// the end of the stream: the client relies on that to know when a write
// can safely be resent (fwdBody).
func (s *Server) fwdWrite(ctx context.Context, w http.ResponseWriter, r *http.Request, q fwdReq, b Backend) error {
	http.NewResponseController(w).SetReadDeadline(time.Now().Add(bodyTimeout))
	buf := s.bufs.get(int(q.n))
	defer s.bufs.put(buf)
	if _, err := io.ReadFull(r.Body, *buf); err != nil {
		return fmt.Errorf("%w: body shorter than %d bytes: %v", ErrBadRequest, q.n, err)
	}
	if err := endOfBody(r); err != nil {
		return err
	}
	if err := b.WriteAt(ctx, *buf, q.off, q.fua); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) fwdFlush(ctx context.Context, w http.ResponseWriter, r *http.Request, q fwdReq, b Backend) error {
	if err := b.Flush(ctx); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// fwdUnmap, like fwdWrite, acts only after the request's (empty) body
// ended.
func (s *Server) fwdUnmap(ctx context.Context, w http.ResponseWriter, r *http.Request, q fwdReq, b Backend) error {
	http.NewResponseController(w).SetReadDeadline(time.Now().Add(bodyTimeout))
	if err := endOfBody(r); err != nil {
		return err
	}
	if err := b.Unmap(ctx, q.off, q.n); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// endOfBody waits for the end of the request body and refuses any byte
// left in it.
func endOfBody(r *http.Request) error {
	var probe [1]byte
	k, err := io.ReadFull(r.Body, probe[:])
	switch {
	case k != 0:
		return fmt.Errorf("%w: body longer than declared", ErrBadRequest)
	case errors.Is(err, io.EOF):
		return nil
	}
	return fmt.Errorf("request body: %w", err)
}

// senseHeader formats a sense for hSense: "KK/AA/QQ" in hex.
func senseHeader(key, asc, ascq byte) string {
	return fmt.Sprintf("%02x/%02x/%02x", key, asc, ascq)
}

func parseSense(v string) (key, asc, ascq byte, ok bool) {
	parts := strings.Split(v, "/")
	if len(parts) != 3 {
		return 0, 0, 0, false
	}
	var b [3]byte
	for i, p := range parts {
		if len(p) != 2 {
			return 0, 0, 0, false
		}
		n, err := strconv.ParseUint(p, 16, 8)
		if err != nil {
			return 0, 0, 0, false
		}
		b[i] = byte(n)
	}
	if b[0] > 0x0f { // the sense key is 4 bits
		return 0, 0, 0, false
	}
	return b[0], b[1], b[2], true
}

// fwdErr maps a forwarding endpoint's error status and message.
func (k *call) fwdErr(resp *http.Response, msg string) error {
	msg = strings.TrimSpace(msg)
	var sentinel error
	switch code := resp.StatusCode; {
	case code == http.StatusMisdirectedRequest:
		sentinel = ErrNotOwner
	case code == http.StatusNotFound && resp.Header.Get(hForward) == "":
		return fmt.Errorf("peer %s: %s: %w: %v: %s", k.c.addr, k.op, ErrUnavailable, errNoForwarding, msg)
	case code == http.StatusNotFound:
		sentinel = ErrUnknownImage
	case code == http.StatusConflict:
		sentinel = ErrStaleGeneration
	case code == http.StatusBadRequest:
		sentinel = ErrBadRequest
	case code == http.StatusInternalServerError:
		if v := resp.Header.Get(hSense); v != "" {
			if key, asc, ascq, ok := parseSense(v); ok {
				return &ForwardedError{Key: key, ASC: asc, ASCQ: ascq,
					Msg: fmt.Sprintf("peer %s: %s: remote error: %s", k.c.addr, k.op, msg)}
			}
			return fmt.Errorf("peer %s: %s: remote error (malformed sense %q): %s", k.c.addr, k.op, v, msg)
		}
		return fmt.Errorf("peer %s: %s: remote error: %s", k.c.addr, k.op, msg)
	case code >= 500:
		sentinel = ErrUnavailable
	default:
		return fmt.Errorf("peer %s: %s: %w: unexpected status %d: %s", k.c.addr, k.op, ErrUnavailable, code, msg)
	}
	return fmt.Errorf("peer %s: %s: %w: %s", k.c.addr, k.op, sentinel, msg)
}

func (c *Client) beginFwd(ctx context.Context, op string) *call {
	k := c.begin(ctx, op)
	k.fwd = true
	return k
}

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
	k := c.beginFwd(ctx, "forward read")
	defer k.finish()
	return c.readExact(k, "forward read", pathFwdRead, ref, p, off)
}

// ForwardWrite writes p at off of image ref through its owner (the peer);
// with fua the data is on stable storage (of every copy that counts)
// when it returns nil. A nil return is the owner's acknowledgement; any
// error means the write may or may not have been applied (SCSI: the
// command failed). The request is resent on another connection only
// while its body had certainly not reached the owner; a timeout is
// ErrUnavailable.
func (c *Client) ForwardWrite(ctx context.Context, ref Ref, p []byte, off int64, fua bool) error {
	if len(p) == 0 {
		return nil
	}
	if err := c.checkIO("forward write", len(p)); err != nil {
		return err
	}
	k := c.beginFwd(ctx, "forward write")
	defer k.finish()
	body := &fwdBody{p: p}
	defer body.kill()
	return k.doNoContent(http.MethodPut, pathFwdWrite, ref, writeHdr(off, len(p), fua), body.reader(), body.again, int64(len(p)))
}

// ForwardFlush makes every forwarded write to image ref that completed
// before the call durable, through its owner (the peer).
func (c *Client) ForwardFlush(ctx context.Context, ref Ref) error {
	k := c.beginFwd(ctx, "forward flush")
	defer k.finish()
	return k.doNoContent(http.MethodPost, pathFwdFlush, ref, nil, nil, nil, 0)
}

// ForwardUnmap deallocates [off, off+n) of image ref through its owner
// (the peer). Like a write, it is resent only while it had certainly not
// reached the owner.
func (c *Client) ForwardUnmap(ctx context.Context, ref Ref, off, n int64) error {
	k := c.beginFwd(ctx, "forward unmap")
	defer k.finish()
	body := &fwdBody{}
	defer body.kill()
	return k.doNoContent(http.MethodPost, pathFwdUnmap, ref, extentHdr(off, n), body.reader(), body.again, 0)
}

// fwdBody is the request body of a forwarded write (or, empty, unmap)
// over the caller's buffer. The HTTP/2 transport asks for the body again
// (GetBody) when it resends a request on another connection after a
// GOAWAY, a refused stream or a protocol error, some of which leave it
// unknown whether the owner received the request. The owner applies a
// write or unmap only after the request body ended (fwdWrite, fwdUnmap),
// and the transport ends the stream only after the body returned EOF, so
// the request is certainly unapplied while no attempt's reader got to the
// end of p: only then does again hand out a fresh reader. It also stops
// every reader once the call returned (the transport may still hold one).
type fwdBody struct {
	mu      sync.Mutex
	p       []byte
	attempt int
	ended   bool // a reader handed out the end of p (the last byte or EOF)
	dead    bool
}

type fwdReader struct {
	b       *fwdBody
	attempt int
	off     int
}

func (b *fwdBody) reader() io.ReadCloser { return &fwdReader{b: b} }

func (b *fwdBody) again() (io.ReadCloser, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.dead || b.ended {
		return nil, errNoReplay
	}
	b.attempt++
	return &fwdReader{b: b, attempt: b.attempt}, nil
}

func (b *fwdBody) kill() {
	b.mu.Lock()
	b.dead = true
	b.p = nil
	b.mu.Unlock()
}

func (r *fwdReader) Read(q []byte) (int, error) {
	b := r.b
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.dead || r.attempt != b.attempt {
		return 0, errClosed
	}
	if r.off >= len(b.p) {
		b.ended = true
		return 0, io.EOF
	}
	n := copy(q, b.p[r.off:])
	r.off += n
	if r.off == len(b.p) {
		b.ended = true
	}
	return n, nil
}

func (r *fwdReader) Close() error { return nil }
