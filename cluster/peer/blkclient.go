package peer

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The client side of the block protocol: one connection per peer, a
// writer goroutine that sends every request queued meanwhile in one
// writev, and a reader goroutine that hands each response to its caller
// by tag, reading a read's data straight into the caller's buffer.

// bcall states: who may touch the request's buffers.
const (
	stQueued    int32 = iota // waiting in the queue; the caller may take it back
	stTaken                  // the writer is sending (or sent) it
	stAbandoned              // the caller took it back before the writer saw it
)

// bcall is one request in flight on a block connection.
type bcall struct {
	hdr   [reqHdrLen]byte
	data  []byte // payload (writes)
	p     []byte // destination of a read's data
	tag   uint32
	state atomic.Int32
	done  chan struct{} // closed by whoever took the call out of pending

	// Set before done is closed.
	err  error // transport failure
	resp respHdr
	msg  string
}

// blkConn is one block protocol connection.
type blkConn struct {
	c  *Client
	nc net.Conn
	br *bufio.Reader
	w  io.Writer
	bw *bufio.Writer // non-nil when w buffers (TLS): flushed after each batch

	out *outbox[*bcall]

	mu      sync.Mutex
	pending map[uint32]*bcall
	tag     uint32
	err     error // the connection failed; set once
	dead    chan struct{}
}

// frameCall adds k's header and payload to a batch unless its caller took
// it back first.
func frameCall(k *bcall, bufs net.Buffers) net.Buffers {
	if !k.state.CompareAndSwap(stQueued, stTaken) {
		return bufs
	}
	bufs = append(bufs, k.hdr[:])
	if len(k.data) > 0 {
		bufs = append(bufs, k.data)
	}
	return bufs
}

// dialing is a connection attempt the callers that need one share.
type dialing struct {
	done chan struct{}
	bc   *blkConn
	err  error
}

// blk returns the live block connection, dialling one if there is none.
// Callers arriving while a dial runs wait for it (or for their ctx); the
// dial itself runs under the client's timeout, not a caller's context.
func (c *Client) blk(ctx context.Context) (*blkConn, error) {
	if bc := c.cur.Load(); bc != nil {
		return bc, nil
	}
	c.dialMu.Lock()
	if bc := c.cur.Load(); bc != nil {
		c.dialMu.Unlock()
		return bc, nil
	}
	if c.closed.Load() {
		c.dialMu.Unlock()
		return nil, errClosed
	}
	d := c.dial
	if d == nil {
		d = &dialing{done: make(chan struct{})}
		c.dial = d
		go c.dialShared(d)
	}
	c.dialMu.Unlock()
	select {
	case <-d.done:
		return d.bc, d.err
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
}

func (c *Client) dialShared(d *dialing) {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	bc, err := c.dialBlk(ctx)
	if err != nil && ctx.Err() != nil {
		err = fmt.Errorf("connect: %w", errTimeout)
	}
	c.dialMu.Lock()
	c.dial = nil
	if err == nil {
		if c.closed.Load() {
			err = errClosed
		} else {
			c.cur.Store(bc)
		}
	}
	c.dialMu.Unlock()
	if err != nil && bc != nil {
		bc.fail(err)
		bc = nil
	}
	d.bc, d.err = bc, err
	close(d.done)
}

func (c *Client) dialBlk(ctx context.Context) (*blkConn, error) {
	d := net.Dialer{KeepAlive: 30 * time.Second}
	nc, err := d.DialContext(ctx, "tcp", c.addr)
	if err != nil {
		return nil, err
	}
	bc := &blkConn{c: c, nc: nc, pending: map[uint32]*bcall{}, dead: make(chan struct{})}
	bc.out = newOutbox(frameCall, func(bufs net.Buffers) error { return sendBatch(bc.nc, bc.w, bc.bw, bufs, c.timeout) }, nil)
	if c.tls != nil {
		tc := tls.Client(nc, c.tls)
		if err := tc.HandshakeContext(ctx); err != nil {
			nc.Close()
			return nil, fmt.Errorf("TLS handshake: %w", err)
		}
		if p := tc.ConnectionState().NegotiatedProtocol; p != blkALPN {
			tc.Close()
			return nil, fmt.Errorf("peer does not speak %s (ALPN %q)", blkALPN, p)
		}
		bc.nc = tc
		bc.bw = bufio.NewWriterSize(tc, 256<<10)
		bc.w = bc.bw
		bc.br = bufio.NewReaderSize(tc, 256<<10)
	} else {
		if dl, ok := ctx.Deadline(); ok {
			nc.SetDeadline(dl)
		}
		if _, err := io.WriteString(nc, blkPreface); err != nil {
			nc.Close()
			return nil, err
		}
		bc.br = bufio.NewReaderSize(nc, 256<<10)
		var got [len(blkPreface)]byte
		if _, err := io.ReadFull(bc.br, got[:]); err != nil || string(got[:]) != blkPreface {
			nc.Close()
			if err == nil {
				err = fmt.Errorf("peer does not speak the block protocol (answered %q)", got[:])
			}
			return nil, err
		}
		nc.SetDeadline(time.Time{})
		bc.w = nc
	}
	go bc.writer()
	go bc.reader()
	return bc, nil
}

// fail ends the connection: every request still pending gets err.
func (bc *blkConn) fail(err error) {
	bc.mu.Lock()
	if bc.err != nil {
		bc.mu.Unlock()
		return
	}
	bc.err = err
	calls := bc.pending
	bc.pending = nil
	close(bc.dead)
	bc.mu.Unlock()
	bc.c.cur.CompareAndSwap(bc, nil)
	bc.nc.Close()
	bc.c.log.Debug("block connection ended", "err", err)
	for _, k := range calls {
		k.err = err
		close(k.done)
	}
}

// send queues k; an error when the connection already failed.
func (bc *blkConn) send(k *bcall) error {
	bc.mu.Lock()
	if bc.err != nil {
		err := bc.err
		bc.mu.Unlock()
		return err
	}
	bc.tag++
	k.tag = bc.tag
	putTag(&k.hdr, k.tag)
	bc.pending[k.tag] = k
	bc.mu.Unlock()
	// Sent from here when nobody is sending, a goroutine hop less; a
	// failure reaches k through pending.
	if err := bc.out.push(k); err != nil {
		bc.fail(fmt.Errorf("send: %w", err))
	}
	return nil
}

func putTag(b *[reqHdrLen]byte, tag uint32) {
	b[4], b[5], b[6], b[7] = byte(tag>>24), byte(tag>>16), byte(tag>>8), byte(tag)
}

// abandon takes k back from the connection after its caller gave up.
// It reports whether k is the caller's again; if not, whoever took it out
// of pending closes k.done soon.
func (bc *blkConn) abandon(k *bcall) bool {
	bc.mu.Lock()
	mine := bc.pending != nil && bc.pending[k.tag] == k
	if mine {
		delete(bc.pending, k.tag)
	}
	bc.mu.Unlock()
	if !mine {
		return false
	}
	if !k.state.CompareAndSwap(stQueued, stAbandoned) {
		// A batch took it: wait until it is out, and tell the server to
		// stop working on it.
		bc.out.idle()
		bc.cancel(k.tag)
	}
	return true
}

// cancel sends a cancel for tag (no answer comes back).
func (bc *blkConn) cancel(tag uint32) {
	k := &bcall{}
	h := reqHdr{op: opCancel, tag: tag, id: pingID}
	h.encode(&k.hdr)
	bc.mu.Lock()
	failed := bc.err != nil
	bc.mu.Unlock()
	if failed {
		return
	}
	if err := bc.out.push(k); err != nil {
		bc.fail(fmt.Errorf("send: %w", err))
	}
}

func (bc *blkConn) writer() {
	for {
		select {
		case <-bc.out.wake:
		case <-bc.dead:
			return
		}
		if err := bc.out.flush(); err != nil {
			bc.fail(fmt.Errorf("send: %w", err))
			return
		}
	}
}

func (bc *blkConn) reader() {
	var hb [respHdrLen]byte
	for {
		if _, err := io.ReadFull(bc.br, hb[:]); err != nil {
			bc.fail(fmt.Errorf("receive: %w", err))
			return
		}
		h, err := decodeResp(hb[:])
		if err != nil {
			bc.fail(fmt.Errorf("%w", err))
			return
		}
		bc.mu.Lock()
		k := bc.pending[h.tag]
		if k != nil {
			delete(bc.pending, h.tag)
		}
		bc.mu.Unlock()
		if k == nil { // abandoned by its caller: skip the payload
			if _, err := bc.br.Discard(int(h.n)); err != nil {
				bc.fail(fmt.Errorf("receive: %w", err))
				return
			}
			continue
		}
		k.resp = h
		var rerr error
		switch {
		case h.code == codeOK && int(h.n) == len(k.p):
			_, rerr = io.ReadFull(bc.br, k.p)
		case h.code == codeOK:
			k.err = fmt.Errorf("response of %d bytes, want %d", h.n, len(k.p))
			close(k.done)
			bc.fail(k.err)
			return
		default:
			msg := make([]byte, h.n)
			_, rerr = io.ReadFull(bc.br, msg)
			k.msg = strings.TrimSpace(string(msg))
		}
		if rerr != nil {
			k.err = fmt.Errorf("truncated response: %w", rerr)
			close(k.done)
			bc.fail(k.err)
			return
		}
		close(k.done)
	}
}

// roundTrip sends one request and waits for its answer: data read into p
// (reads), or an error mapped like the HTTP endpoints' statuses.
func (c *Client) roundTrip(ctx context.Context, h reqHdr, data, p []byte) (err error) {
	c.stats.requests.Add(1)
	defer func() {
		if err != nil {
			c.stats.errors.Add(1)
			return
		}
		c.stats.sent.Add(int64(len(data)))
		c.stats.recv.Add(int64(len(p)))
	}()
	name := opNames[h.op]
	fwd := isForward(h.op)
	if c.closed.Load() {
		return fmt.Errorf("peer %s: %s: %w: %v", c.addr, name, ErrUnavailable, errClosed)
	}
	if !validID(h.id) {
		return fmt.Errorf("peer %s: %s: %w: image id %q is not 32 hex digits", c.addr, name, ErrBadRequest, h.id)
	}
	start := time.Now()
	bc, err := c.blk(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("peer %s: %s: %w", c.addr, name, context.Cause(ctx))
		}
		return fmt.Errorf("peer %s: %s: %w: %v", c.addr, name, ErrUnavailable, err)
	}
	k := &bcall{data: data, p: p, done: make(chan struct{})}
	h.encode(&k.hdr)
	if err := bc.send(k); err != nil {
		return fmt.Errorf("peer %s: %s: %w: %v", c.addr, name, ErrUnavailable, err)
	}
	// One deadline per request: the caller's, when it comes no later than
	// the client's timeout (a volume gives every copy request its copy
	// timeout), else a timer of our own. A second timer per request cost
	// a timer start and stop on every 4 KiB write (BenchmarkRemoteWrite4KCPU).
	var timeout <-chan time.Time
	if dl, ok := ctx.Deadline(); !ok || time.Until(dl) > c.timeout {
		t := time.NewTimer(c.timeout)
		defer t.Stop()
		timeout = t.C
	}
	select {
	case <-k.done:
	case <-ctx.Done():
		if bc.abandon(k) {
			return fmt.Errorf("peer %s: %s: %w", c.addr, name, context.Cause(ctx))
		}
		c.awaitAnswer(bc, k)
	case <-timeout:
		if bc.abandon(k) {
			return fmt.Errorf("peer %s: %s: %w: timed out after %v", c.addr, name, ErrUnavailable, c.timeout)
		}
		// The answer is being read: a peer that stalls in the middle of
		// one is broken.
		bc.fail(fmt.Errorf("response: %w", errTimeout))
		<-k.done
	}
	if k.err != nil {
		if k.state.Load() == stTaken { // a batch may still hold data
			bc.out.idle()
		}
		return fmt.Errorf("peer %s: %s: %w: %v", c.addr, name, ErrUnavailable, k.err)
	}
	if k.resp.code != codeOK {
		return respErr(c.addr, name, fwd, k.resp, k.msg)
	}
	if len(p)+len(data) <= rttMaxBytes && h.flags&flagFUA == 0 {
		c.sample(time.Since(start))
	}
	return nil
}

// awaitAnswer waits for an answer already being read when the caller's
// context ended: up to the client's timeout, then the connection is
// failed (a peer that stalls in the middle of an answer is broken).
func (c *Client) awaitAnswer(bc *blkConn, k *bcall) {
	t := time.NewTimer(c.timeout)
	defer t.Stop()
	select {
	case <-k.done:
	case <-t.C:
		bc.fail(fmt.Errorf("response: %w", errTimeout))
		<-k.done
	}
}

// respErr maps an error answer to the package's errors.
func respErr(addr, name string, fwd bool, h respHdr, msg string) error {
	switch code := int(h.code); {
	case code == 421 && fwd:
		return fmt.Errorf("peer %s: %s: %w: %s", addr, name, ErrNotOwner, msg)
	case code == 404 && fwd && h.flags&rflagForward == 0:
		return fmt.Errorf("peer %s: %s: %w: %v: %s", addr, name, ErrUnavailable, errNoForwarding, msg)
	case code == 404 && fwd:
		return fmt.Errorf("peer %s: %s: %w: %s", addr, name, ErrUnknownImage, msg)
	case code == 500 && fwd && h.flags&rflagSense != 0:
		return &ForwardedError{Key: h.sense[0], ASC: h.sense[1], ASCQ: h.sense[2],
			Msg: fmt.Sprintf("peer %s: %s: remote error: %s", addr, name, msg)}
	}
	return codeErr(addr, name, int(h.code), msg)
}

// codeErr maps a status code of either protocol and its message.
func codeErr(addr, name string, code int, msg string) error {
	var sentinel error
	switch {
	case code == 404:
		sentinel = ErrNoCopy
	case code == 409:
		sentinel = ErrStaleGeneration
	case code == 403:
		sentinel = ErrForbidden
	case code == 412:
		sentinel = ErrStaleEpoch
	case code == 400:
		sentinel = ErrBadRequest
	case code == 500:
		return fmt.Errorf("peer %s: %s: remote error: %s", addr, name, msg)
	case code >= 500:
		sentinel = ErrUnavailable
	default:
		return fmt.Errorf("peer %s: %s: %w: unexpected status %d: %s", addr, name, ErrUnavailable, code, msg)
	}
	return fmt.Errorf("peer %s: %s: %w: %s", addr, name, sentinel, msg)
}
