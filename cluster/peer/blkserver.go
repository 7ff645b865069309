package peer

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// The server side of the block protocol. The listener's connections are
// told apart on arrival (demux): over TLS by ALPN, in cleartext by the
// block preface; HTTP/2 ones go on to the http.Server (streamed
// checksums and block ranges).

const (
	// sniffTimeout bounds the TLS handshake or the preface of a new
	// connection.
	sniffTimeout = 10 * time.Second
	// maxInflightBytes bounds the request and answer data a server holds
	// in memory at once (on top of MaxInflight requests).
	maxInflightBytes = 256 << 20
)

// connListener hands the HTTP/2 connections the demux found to the
// http.Server.
type connListener struct {
	addr net.Addr
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
}

func newConnListener(addr net.Addr) *connListener {
	return &connListener{addr: addr, ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *connListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *connListener) Close() error   { l.once.Do(func() { close(l.done) }); return nil }
func (l *connListener) Addr() net.Addr { return l.addr }

func (l *connListener) hand(c net.Conn) {
	select {
	case l.ch <- c:
	case <-l.done:
		c.Close()
	}
}

// bufConn is a connection whose first bytes were already read into r.
type bufConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// acceptLoop accepts connections until ln closes.
func (s *Server) acceptLoop(ln net.Listener, hl *connListener) error {
	var delay time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || s.isClosed() {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			// Out of file descriptors and the like: back off, go on.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.log.Warn("accept", "err", err, "retry_in", delay)
			select {
			case <-time.After(delay):
			case <-s.base.Done():
				return nil
			}
			continue
		}
		delay = 0
		s.accepted.Add(1)
		if !s.track(nc) {
			nc.Close()
			return nil
		}
		s.handlers.Add(1)
		go func() {
			defer s.handlers.Done()
			s.demux(nc, hl)
		}()
	}
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// demux tells a new connection's protocol and serves it.
func (s *Server) demux(nc net.Conn, hl *connListener) {
	defer s.untrack(nc)
	nc.SetDeadline(time.Now().Add(sniffTimeout))
	if s.blkTLS != nil {
		tc := tls.Server(nc, s.blkTLS)
		if err := tc.HandshakeContext(s.base); err != nil {
			s.log.Debug("TLS handshake", "remote", nc.RemoteAddr().String(), "err", err)
			nc.Close()
			return
		}
		nc.SetDeadline(time.Time{})
		if tc.ConnectionState().NegotiatedProtocol == blkALPN {
			s.serveBlk(tc, bufio.NewReaderSize(tc, 256<<10), bufio.NewWriterSize(tc, 256<<10))
			return
		}
		s.untrack(nc) // the http.Server's now
		hl.hand(tc)
		return
	}
	br := bufio.NewReaderSize(nc, 256<<10)
	head, err := br.Peek(len(blkPreface))
	if err != nil {
		nc.Close()
		return
	}
	nc.SetDeadline(time.Time{})
	if string(head) != blkPreface {
		s.untrack(nc)
		hl.hand(&bufConn{Conn: nc, r: br})
		return
	}
	br.Discard(len(blkPreface))
	nc.SetWriteDeadline(time.Now().Add(sniffTimeout))
	if _, err := io.WriteString(nc, blkPreface); err != nil {
		nc.Close()
		return
	}
	nc.SetWriteDeadline(time.Time{})
	s.serveBlk(nc, br, nil)
}

// budget bounds bytes held at once; take blocks until they are free or
// ctx ends.
type budget struct {
	mu    sync.Mutex
	cond  *sync.Cond
	avail int64
}

func newBudget(n int64) *budget {
	b := &budget{avail: n}
	b.cond = sync.NewCond(&b.mu)
	return b
}

func (b *budget) take(ctx context.Context, n int64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	for b.avail < n {
		if err := ctx.Err(); err != nil {
			return err
		}
		b.cond.Wait()
	}
	b.avail -= n
	return nil
}

func (b *budget) give(n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	b.avail += n
	b.mu.Unlock()
	b.cond.Broadcast()
}

// wakeAll lets waiters see a cancelled context.
func (b *budget) wakeAll() {
	b.mu.Lock()
	b.mu.Unlock()
	b.cond.Broadcast()
}

// blkJob is one request a server connection is serving.
type blkJob struct {
	h      reqHdr
	bad    error // a malformed request: answered 400
	ctx    context.Context
	cancel context.CancelFunc
	buf    *[]byte // write payload or read data, pooled
	held   int64   // bytes taken from the budget
	resp   respHdr
	hb     [respHdrLen]byte
	data   []byte // answer payload
}

// srvConn is one block protocol connection on the server.
type srvConn struct {
	s      *Server
	nc     net.Conn
	br     *bufio.Reader
	w      io.Writer
	bw     *bufio.Writer
	ctx    context.Context
	cancel context.CancelFunc

	jobs    chan *blkJob
	workers atomic.Int32
	idle    atomic.Int32
	wg      sync.WaitGroup // workers

	out    *outbox[*blkJob]
	broken bool // a send failed; only write touches it (one batch at a time)

	caller Caller // who is on the other end, as verified

	mu      sync.Mutex
	running map[uint32]context.CancelFunc // by tag
}

func (s *Server) serveBlk(nc net.Conn, br *bufio.Reader, bw *bufio.Writer) {
	ctx, cancel := context.WithCancel(s.base)
	sc := &srvConn{s: s, nc: nc, br: br, bw: bw, w: nc, ctx: ctx, cancel: cancel,
		jobs: make(chan *blkJob, s.cfg.MaxInflight), running: map[uint32]context.CancelFunc{}}
	sc.caller.Addr = nc.RemoteAddr().String()
	if tc, ok := nc.(*tls.Conn); ok {
		cs := tc.ConnectionState()
		sc.caller.Node = certNode(&cs)
	}
	if bw != nil {
		sc.w = bw
	}
	sc.out = newOutbox(frameAnswer, sc.write, sc.sent)
	stop := context.AfterFunc(ctx, s.budget.wakeAll)
	defer stop()
	wdone := make(chan struct{})
	go func() {
		defer close(wdone)
		sc.writer()
	}()
	err := sc.read()
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
		s.log.Debug("block connection", "remote", nc.RemoteAddr().String(), "err", err)
	}
	close(sc.jobs)
	sc.wg.Wait()       // the jobs left run (their context is cancelled if the client went away)
	close(sc.out.wake) // nothing queues any more: the writer sends what is left and ends
	<-wdone
	cancel()
	nc.Close()
}

// read reads requests until the connection ends or breaks the framing.
func (sc *srvConn) read() error {
	s := sc.s
	defer sc.cancel() // a client gone: cancel what it asked for
	var hb [reqHdrLen]byte
	for {
		if _, err := io.ReadFull(sc.br, hb[:]); err != nil {
			return err
		}
		h, err := decodeReq(hb[:])
		var fe *frameError
		if errors.As(err, &fe) {
			// Answer if the tag is known, then stop: the stream cannot be
			// trusted any more.
			sc.answerBroken(h.tag, err)
			return err
		}
		if err == nil && h.op == opCancel {
			sc.cancelJob(h.tag)
			continue
		}
		j := &blkJob{h: h, bad: err}
		if err == nil && h.op == opPing { // answered at once, whatever the load
			sc.finish(j, nil, false)
			sc.queue(j)
			continue
		}
		select {
		case s.sem <- struct{}{}:
		case <-sc.ctx.Done():
			return sc.ctx.Err()
		}
		need := int64(0)
		if hasPayload(h.op) || (err == nil && (h.op == opRead || h.op == opFwdRead) && h.n <= MaxIO) {
			need = h.n
		}
		if err := s.budget.take(sc.ctx, need); err != nil {
			<-s.sem
			return err
		}
		j.held = need
		if hasPayload(h.op) && h.n > 0 {
			j.buf = s.bufs.get(int(h.n))
			sc.nc.SetReadDeadline(time.Now().Add(bodyTimeout))
			_, err := io.ReadFull(sc.br, *j.buf)
			sc.nc.SetReadDeadline(time.Time{})
			if err != nil {
				s.release(j)
				<-s.sem
				return fmt.Errorf("%s payload: %w", opNames[h.op], err)
			}
		}
		j.ctx, j.cancel = context.WithCancel(sc.ctx)
		sc.mu.Lock()
		sc.running[h.tag] = j.cancel
		sc.mu.Unlock()
		if sc.idle.Add(-1) < 0 { // no idle worker to claim
			sc.idle.Add(1)
			if int(sc.workers.Load()) < s.cfg.MaxInflight {
				sc.workers.Add(1)
				sc.wg.Add(1)
				go sc.worker()
			}
		}
		sc.jobs <- j
	}
}

func (sc *srvConn) answerBroken(tag uint32, err error) {
	j := &blkJob{h: reqHdr{tag: tag}}
	sc.finish(j, fmt.Errorf("%w: %v", ErrBadRequest, err), false)
	sc.queue(j)
}

func (sc *srvConn) worker() {
	defer sc.wg.Done()
	for j := range sc.jobs {
		sc.exec(j)
		<-sc.s.sem
		sc.mu.Lock()
		delete(sc.running, j.h.tag)
		sc.mu.Unlock()
		j.cancel()
		sc.queue(j)
		sc.idle.Add(1)
	}
}

// cancelJob cancels the context of the request with tag, if it runs.
func (sc *srvConn) cancelJob(tag uint32) {
	sc.mu.Lock()
	cancel := sc.running[tag]
	sc.mu.Unlock()
	if cancel != nil {
		cancel()
	}
}

// queue sends j's answer, from here if nobody is sending.
func (sc *srvConn) queue(j *blkJob) { sc.out.push(j) }

// writer sends the answers the workers did not send themselves.
func (sc *srvConn) writer() {
	for range sc.out.wake {
		sc.out.flush()
	}
	sc.out.flush()
}

// frameAnswer adds j's answer header and payload to a batch.
func frameAnswer(j *blkJob, bufs net.Buffers) net.Buffers {
	j.resp.encode(&j.hb)
	bufs = append(bufs, j.hb[:])
	if len(j.data) > 0 {
		bufs = append(bufs, j.data)
	}
	return bufs
}

// write sends a batch of answers; after a failure it drops them (the
// connection is closed, which ends read) so the jobs are still released.
func (sc *srvConn) write(bufs net.Buffers) error {
	if sc.broken {
		return nil
	}
	if err := sendBatch(sc.nc, sc.w, sc.bw, bufs, bodyTimeout); err != nil {
		sc.broken = true
		sc.nc.Close()
	}
	return nil
}

// sent releases what a batch's jobs held.
func (sc *srvConn) sent(batch []*blkJob) {
	for _, j := range batch {
		if j.h.op == opRead && j.resp.code == codeOK {
			sc.s.bytesOut.Add(int64(len(j.data)))
		}
		sc.s.release(j)
	}
}

// release gives back what a finished job held.
func (s *Server) release(j *blkJob) {
	if j.buf != nil {
		s.bufs.put(j.buf)
		j.buf = nil
	}
	s.budget.give(j.held)
	j.held = 0
}

// exec serves one request and fills in its answer.
func (sc *srvConn) exec(j *blkJob) {
	s, ctx := sc.s, j.ctx
	fwd := isForward(j.h.op)
	err := j.bad
	switch {
	case err != nil, j.h.op == opPing:
	case fwd:
		err = s.execFwd(ctx, j, sc.caller)
	default:
		err = s.execCopy(ctx, j, sc.caller)
	}
	sc.finish(j, err, fwd && s.cfg.Volumes != nil)
}

func (s *Server) execCopy(ctx context.Context, j *blkJob, caller Caller) error {
	h := j.h
	a := AccessWrite
	if h.op == opRead {
		a = AccessRead
	}
	ref := Ref{ID: h.id, Gen: h.gen, Epoch: h.epoch}
	l, err := s.open(ctx, ref, caller, a)
	if err != nil {
		return err
	}
	switch h.op {
	case opWrite, opUnmap:
		// Checked against the fence and counted in flight until applied,
		// so that a fence waits for it.
		leave, err := s.gates.get(h.id).enter(ctx, h.gen, h.epoch)
		if err != nil {
			return fmt.Errorf("%s %s: %w", opNames[h.op], ref, err)
		}
		defer leave()
	case opFence:
		return s.gates.get(h.id).fence(ctx, h.gen, h.epoch)
	}
	switch h.op {
	case opRead:
		if err := checkExtent(h.off, h.n, l.Size, MaxIO); err != nil {
			return err
		}
		j.buf = s.bufs.get(int(h.n))
		if err := l.Copy.ReadAt(ctx, *j.buf, h.off); err != nil {
			return err
		}
		j.data = *j.buf
	case opWrite:
		if err := checkExtent(h.off, h.n, l.Size, MaxIO); err != nil {
			return err
		}
		if err := l.Copy.WriteAt(ctx, *j.buf, h.off, h.flags&flagFUA != 0); err != nil {
			return err
		}
		s.bytesIn.Add(h.n)
	case opSync:
		return l.Copy.Sync(ctx)
	case opUnmap:
		if err := checkExtent(h.off, h.n, l.Size, 0); err != nil {
			return err
		}
		return l.Copy.Unmap(ctx, h.off, h.n)
	}
	return nil
}

func (s *Server) execFwd(ctx context.Context, j *blkJob, caller Caller) error {
	h := j.h
	if s.cfg.Volumes == nil {
		return errNoForwarding
	}
	if s.blkTLS != nil && (caller.Node == "" || s.cfg.Member != nil && !s.cfg.Member(caller.Node)) {
		return fmt.Errorf("%w: forwarded I/O from %q, not a cluster member", ErrForbidden, caller.Node)
	}
	if h.op != opFwdFlush {
		// The image size is the Backend's business: here alignment, MaxIO
		// and overflow.
		maxLen := int64(0)
		if h.op != opFwdUnmap {
			maxLen = MaxIO
		}
		if err := checkExtent(h.off, h.n, math.MaxInt64, maxLen); err != nil {
			return err
		}
		if h.n%Align != 0 {
			return fmt.Errorf("%w: length %d not aligned to %d", ErrBadRequest, h.n, Align)
		}
	}
	ref := Ref{ID: h.id, Gen: h.gen}
	b, err := s.cfg.Volumes.Volume(ctx, ref)
	if err != nil {
		return fmt.Errorf("volume %s: %w", ref, err)
	}
	if b == nil {
		return fmt.Errorf("volume %s: no backend", ref)
	}
	switch h.op {
	case opFwdRead:
		j.buf = s.bufs.get(int(h.n))
		if err := b.ReadAt(ctx, *j.buf, h.off); err != nil {
			return err
		}
		j.data = *j.buf
	case opFwdWrite:
		return b.WriteAt(ctx, *j.buf, h.off, h.flags&flagFUA != 0)
	case opFwdFlush:
		return b.Flush(ctx)
	case opFwdUnmap:
		return b.Unmap(ctx, h.off, h.n)
	}
	return nil
}

// finish fills in j's answer for err. fwd marks the answer of a server
// that serves forwarded I/O.
func (sc *srvConn) finish(j *blkJob, err error, fwd bool) {
	j.resp = respHdr{tag: j.h.tag, code: codeOK}
	if fwd {
		j.resp.flags |= rflagForward
	}
	if err == nil {
		j.resp.n = uint32(len(j.data))
		return
	}
	j.data = nil
	code := sc.s.status(sc.ctx, err)
	if errors.Is(err, errNoForwarding) {
		code = 404
	}
	name := "?"
	if int(j.h.op) < len(opNames) {
		name = opNames[j.h.op]
	}
	sc.s.logRefused(name, sc.nc.RemoteAddr().String(), j.h.id, code, err)
	var carrier SenseCarrier
	if fwd && code == 500 && errors.As(err, &carrier) {
		j.resp.flags |= rflagSense
		j.resp.sense[0], j.resp.sense[1], j.resp.sense[2] = carrier.SCSISense()
		j.resp.sense[0] &= 0x0f
	}
	msg := err.Error()
	if len(msg) > maxMsg {
		msg = msg[:maxMsg]
	}
	j.resp.code = uint16(code)
	j.data = []byte(msg)
	j.resp.n = uint32(len(j.data))
}

// track records a connection so Close can end it (until it goes to the
// http.Server); false when the server is closing.
func (s *Server) track(nc net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[nc] = struct{}{}
	return true
}

func (s *Server) untrack(nc net.Conn) {
	s.mu.Lock()
	delete(s.conns, nc)
	s.mu.Unlock()
}
