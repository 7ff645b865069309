package iscsi

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"math/bits"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ukai-storage/ukai/target/scsi"
)

// outPDU is one PDU queued for the writer. The writer fills the sequence
// numbers (per snMode) and digests just before it goes on the wire.
type outPDU struct {
	hdr  [bhsLen + 4]byte // BHS + room for the header digest
	data []byte
	tail [8]byte // pad + data digest
	sn   snMode
	// after runs once the PDU is written or dropped.
	after func()
}

func (o *outPDU) h() *bhs { return (*bhs)(o.hdr[:bhsLen]) }

type snMode uint8

const (
	snNone    snMode = iota // fields set by the caller
	snPeek                  // StatSN = next StatSN (not consumed), ExpCmdSN, MaxCmdSN
	snAdvance               // StatSN assigned and advanced, ExpCmdSN, MaxCmdSN
)

// bufPool recycles write buffers in power-of-two size classes.
type bufPool struct {
	pools [31]sync.Pool
}

func sizeClass(n int) int {
	if n <= 4096 {
		return 12
	}
	return bits.Len(uint(n - 1))
}

func (bp *bufPool) get(n int) []byte {
	c := sizeClass(n)
	if c >= len(bp.pools) {
		return make([]byte, n)
	}
	if v := bp.pools[c].Get(); v != nil {
		return (*v.(*[]byte))[:n]
	}
	return make([]byte, n, 1<<c)
}

func (bp *bufPool) put(b []byte) {
	c := cap(b)
	if c == 0 || c&(c-1) != 0 {
		return
	}
	k := bits.Len(uint(c)) - 1
	if k < 12 || k >= len(bp.pools) {
		return
	}
	b = b[:0]
	bp.pools[k].Put(&b)
}

// task is one SCSI command of a connection.
type task struct {
	itt       uint32
	cmdSN     uint32
	lunRaw    [8]byte
	lun       uint64
	cdb       []byte
	cdbBuf    [16]byte
	edtl      uint32
	read      bool
	write     bool
	immediate bool

	ctx    context.Context
	cancel context.CancelFunc

	// Data-out state, owned by the reader goroutine.
	buf         []byte
	held        int64        // write buffer budget taken for buf
	dataSince   atomic.Int64 // unix nanos of the last Data-Out progress while waiting for data; 0 once launched
	received    uint32
	inUnsol     bool   // unsolicited Data-Out still expected
	unsolLeft   uint32 // bytes of unsolicited data still allowed
	unsolDataSN uint32
	nextOff     uint32 // next offset to solicit
	r2tSN       uint32
	r2ts        []*r2tState

	started bool // handed to the LU (reader-owned)
	aborted bool // guarded by conn.mu
	done    chan struct{}
}

type r2tState struct {
	ttt, off, length, got, dataSN uint32
}

// conn is one iSCSI connection; with MaxConnections=1 it carries one
// session.
type conn struct {
	srv *Server
	nc  net.Conn
	log *slog.Logger
	pr  *pduReader

	sess *session
	p    params
	cid  uint16

	ctx    context.Context // cancelled when the connection ends
	cancel context.CancelFunc
	ended  chan struct{}

	closing     atomic.Bool
	closeReason atomic.Pointer[string]

	// writer state
	sending    sync.Mutex // held while a batch is written (drain): by the writer or a command's goroutine (kick)
	wbatch     []*outPDU  // under sending
	wvec       net.Buffers
	wmu        sync.Mutex
	wcond      *sync.Cond
	wq         []*outPDU
	wqBytes    atomic.Int64 // queued (or being written) response bytes; changed under wmu
	wspace     *sync.Cond   // on wmu: wqBytes went down, or the writer stopped
	wqWaiters  int          // readers waiting on wspace (under wmu)
	wstop      bool
	wdone      chan struct{}
	werr       error
	statSN     uint32 // under sending once the writer runs
	hdrDigest  bool
	dataDigest bool

	mu      sync.Mutex
	tasks   map[uint32]*task
	r2ts    map[uint32]*task // by TTT; reader-owned
	nextTTT uint32
	cmdWG   sync.WaitGroup // commands in flight and TMF goroutines
	bgWG    sync.WaitGroup // keepalive

	// Executors: long-lived goroutines that run the commands (launch).
	execq    chan *task
	execIdle atomic.Int32 // executors waiting for a command, minus claims

	immActive atomic.Int32 // immediate SCSI commands accepted and not yet answered

	text textState

	lastRecv    atomic.Int64
	pingPending atomic.Int64 // unix nanos of the outstanding NOP-In ping, 0 if none

	bytesIn  atomic.Uint64
	bytesOut atomic.Uint64
}

type textState struct {
	buf     []byte // accumulated request (C bit)
	pending []byte // response still to send
	ttt     uint32
}

func newConn(s *Server, nc net.Conn) *conn {
	ctx, cancel := context.WithCancel(s.baseCtx)
	c := &conn{
		srv:    s,
		nc:     nc,
		log:    s.log.With("remote", nc.RemoteAddr().String()),
		pr:     newPDUReader(nc, loginMaxData),
		ctx:    ctx,
		cancel: cancel,
		ended:  make(chan struct{}),
		wdone:  make(chan struct{}),
		tasks:  map[uint32]*task{},
		r2ts:   map[uint32]*task{},
		execq:  make(chan *task, 64),
	}
	c.wcond = sync.NewCond(&c.wmu)
	c.wspace = sync.NewCond(&c.wmu)
	return c
}

var (
	errLogout   = errors.New("logged out")
	errShutdown = errors.New("shut down")
)

// protoErr is a protocol violation that ends the connection (ERL 0).
type protoErr struct{ msg string }

func (e *protoErr) Error() string { return "protocol error: " + e.msg }

func protoErrf(format string, args ...any) error {
	return &protoErr{fmt.Sprintf(format, args...)}
}

func (c *conn) run() {
	defer close(c.ended)
	defer c.cancel()
	defer c.nc.Close()
	if err := c.login(); err != nil {
		if c.closing.Load() {
			return
		}
		lvl := slog.LevelWarn
		if errors.Is(err, io.EOF) {
			lvl = slog.LevelDebug
		}
		var le *loginError
		var ne net.Error
		switch {
		case errors.As(err, &le):
			lvl = slog.LevelInfo
		case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed), errors.Is(err, syscall.ECONNRESET):
			lvl = slog.LevelDebug
		case errors.As(err, &ne) && ne.Timeout():
			lvl = slog.LevelInfo
		}
		c.log.Log(context.Background(), lvl, "iscsi login failed", "err", err)
		return
	}
	go c.writer()
	if c.srv.cfg.NopInterval > 0 {
		c.bgWG.Add(1)
		go c.keepalive(c.srv.cfg.NopInterval)
	}
	err := c.serve()
	c.teardown(err)
}

// shutdown ends the connection gracefully: no new PDUs are read and the
// commands in flight may complete (see Server.Close).
func (c *conn) shutdown(reason string) {
	c.closeReason.CompareAndSwap(nil, &reason)
	c.closing.Store(true)
	c.nc.SetReadDeadline(time.Now())
}

// abort ends the connection now, cancelling every command.
func (c *conn) abort(reason string) {
	c.closeReason.CompareAndSwap(nil, &reason)
	c.closing.Store(true)
	c.cancel()
	c.nc.Close()
}

func (c *conn) teardown(err error) {
	s := c.sess
	reason := ""
	if r := c.closeReason.Load(); r != nil {
		reason = *r
	}
	switch {
	case errors.Is(err, errLogout):
		c.log.Info("iscsi logout", "initiator", s.initiatorName, "target", s.targetName, "tsih", s.tsih)
	case c.closing.Load():
		c.log.Info("iscsi session closed", "initiator", s.initiatorName, "target", s.targetName, "tsih", s.tsih, "reason", reason)
	case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed), errors.Is(err, io.ErrUnexpectedEOF):
		c.log.Info("iscsi connection closed by initiator", "initiator", s.initiatorName, "target", s.targetName, "tsih", s.tsih)
	default:
		c.log.Warn("iscsi connection dropped", "initiator", s.initiatorName, "target", s.targetName, "tsih", s.tsih, "err", err)
	}
	// Commands still waiting for data will never get it.
	c.mu.Lock()
	for _, t := range c.tasks {
		if !t.started {
			c.abortLocked(t)
		}
	}
	c.mu.Unlock()
	if dctx := c.srv.drainCtx(); dctx != nil && c.closing.Load() && !errors.Is(err, errLogout) {
		// Graceful server shutdown: let commands in flight finish.
		waitGroupCtx(dctx, &c.cmdWG)
	}
	c.cancel()
	if !errors.Is(err, errLogout) && !c.closing.Load() {
		// The initiator is gone: nothing more can be written.
		c.nc.Close()
	}
	c.cmdWG.Wait()
	close(c.execq) // the reader is done: no more launches
	c.bgWG.Wait()
	c.stopWriter()
	c.nc.Close()
	c.srv.unregisterSession(s)
	if s.lu != nil {
		s.lu.RemoveNexus(s.nexus)
	}
	s.conn.Store(nil)
}

func waitGroupCtx(ctx context.Context, wg *sync.WaitGroup) {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
	}
}

// serve is the full-feature phase reader loop.
func (c *conn) serve() error {
	var p pdu
	for {
		if c.wqBytes.Load() > c.srv.cfg.ResponseQueue {
			if err := c.waitQueue(); err != nil {
				return err
			}
		}
		if err := c.pr.readHeader(&p); err != nil {
			if c.closing.Load() {
				return errShutdown
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return errShutdown
			}
			return fmt.Errorf("read PDU: %w", err)
		}
		c.lastRecv.Store(time.Now().UnixNano())
		err := c.dispatch(&p)
		c.bytesIn.Store(c.pr.n)
		if err != nil {
			if c.closing.Load() {
				return errShutdown
			}
			return err
		}
	}
}

func (c *conn) dispatch(p *pdu) error {
	switch op := p.h.opcode(); op {
	case opSCSICmd:
		return c.handleSCSICmd(p)
	case opDataOut:
		return c.handleDataOut(p)
	case opNopOut:
		return c.handleNop(p)
	case opTMFReq:
		return c.handleTMF(p)
	case opTextReq:
		return c.handleText(p)
	case opLogoutReq:
		return c.handleLogout(p)
	case opSNACK:
		if err := c.pr.discardData(&p.h); err != nil {
			return err
		}
		c.reject(&p.h, rejectProtocolError) // ERL 0: no SNACK
		return nil
	case opLoginReq:
		if err := c.pr.discardData(&p.h); err != nil {
			return err
		}
		c.reject(&p.h, rejectProtocolError)
		return nil
	default:
		if err := c.pr.discardData(&p.h); err != nil {
			return err
		}
		c.log.Debug("iscsi unsupported opcode", "opcode", op)
		c.reject(&p.h, rejectNotSupported)
		return nil
	}
}

// admit applies the CmdSN rules to a non-data PDU. ok=false: drop it (its
// data already discarded).
func (c *conn) admit(h *bhs, isCmd bool) (bool, error) {
	cmdSN := h.u32(offCmdSN)
	switch c.sess.checkCmdSN(cmdSN, h.immediate(), isCmd) {
	case cmdSNDrop:
		exp, max := c.sess.window()
		c.log.Debug("iscsi PDU outside CmdSN window dropped", "opcode", h.opcode(), "cmdsn", cmdSN, "exp", exp, "max", max)
		return false, nil
	case cmdSNGap:
		exp, _ := c.sess.window()
		return false, protoErrf("CmdSN %d while expecting %d (lost command)", cmdSN, exp)
	}
	return true, nil
}

func (c *conn) handleSCSICmd(p *pdu) error {
	h := &p.h
	if c.sess.discovery {
		if err := c.pr.discardData(h); err != nil {
			return err
		}
		c.reject(h, rejectProtocolError)
		return nil
	}
	ok, err := c.admit(h, true)
	if err != nil {
		return err
	}
	if !ok {
		return c.pr.discardData(h)
	}
	if h.immediate() {
		// Immediate commands take no CmdSN window slot: count them
		// here (release gives them back).
		c.immActive.Add(1)
	}
	fl := h.flags()
	t := &task{
		itt:       h.itt(),
		cmdSN:     h.u32(offCmdSN),
		lunRaw:    h.lunRaw(),
		edtl:      h.u32(offEDTL),
		read:      fl&flagRead != 0,
		write:     fl&flagWrite != 0,
		immediate: h.immediate(),
		done:      make(chan struct{}),
	}
	t.lun = decodeLUN(t.lunRaw)
	cdb, err := p.cdb()
	if err != nil {
		c.release(t.immediate)
		if err := c.pr.discardData(h); err != nil {
			return err
		}
		c.reject(h, rejectInvalidPDUField)
		return nil
	}
	if len(cdb) <= len(t.cdbBuf) {
		t.cdb = append(t.cdbBuf[:0], cdb...)
	} else {
		t.cdb = cdb
	}
	dataLen := uint32(h.dataLen())
	c.mu.Lock()
	_, dup := c.tasks[t.itt]
	c.mu.Unlock()
	if dup || t.itt == reservedTag {
		c.release(t.immediate)
		if err := c.pr.discardData(h); err != nil {
			return err
		}
		c.reject(h, rejectTaskInProgress)
		return nil
	}
	if t.immediate && c.immActive.Load() > int32(c.srv.cfg.QueueDepth) {
		return c.refuse(t, h, scsi.Result{Status: scsi.StatusTaskSetFull})
	}

	if !t.write || t.edtl == 0 {
		if dataLen > 0 || fl&flagFinal == 0 {
			// Data or unsolicited Data-Out on a command without write data.
			c.release(t.immediate)
			if err := c.pr.discardData(h); err != nil {
				return err
			}
			c.reject(h, rejectProtocolError)
			return nil
		}
		c.startTask(t)
		c.launch(t)
		return nil
	}

	// Write command.
	if t.edtl > c.srv.cfg.MaxTransferLength {
		return c.refuse(t, h, scsi.Result{Status: scsi.StatusCheckCondition, Sense: fixedSense(scsi.SenseIllegalRequest, 0x24, 0x00)})
	}
	firstBurst := min(c.p.FirstBurstLength, t.edtl)
	if dataLen > 0 && (!c.p.ImmediateData || dataLen > firstBurst) {
		c.release(t.immediate)
		if err := c.pr.discardData(h); err != nil {
			return err
		}
		c.reject(h, rejectProtocolError)
		return nil
	}
	// The buffer exists only once the budget allows it.
	if status, ok := c.reserveWrite(t); !ok {
		return c.refuse(t, h, scsi.Result{Status: status})
	}
	t.buf = c.srv.bufs.get(int(t.edtl))
	if err := c.pr.readData(h, t.buf[:dataLen]); err != nil {
		c.freeBuf(t)
		return err
	}
	t.received = dataLen
	if fl&flagFinal == 0 {
		if c.p.InitialR2T {
			c.freeBuf(t)
			return protoErrf("ITT %#x: unsolicited data announced with InitialR2T=Yes", t.itt)
		}
		t.inUnsol = true
		t.unsolLeft = firstBurst - dataLen
	}
	if t.received < t.edtl {
		t.dataSince.Store(time.Now().UnixNano())
	}
	c.startTask(t)
	if t.inUnsol {
		return nil
	}
	t.nextOff = t.received
	c.continueWrite(t)
	return nil
}

// release frees the CmdSN window slot of a SCSI command, or its count
// among the immediate commands.
func (c *conn) release(immediate bool) {
	if immediate {
		c.immActive.Add(-1)
		return
	}
	c.sess.done()
}

// refuse ends t at once with res, its data discarded. Unsolicited
// Data-Out the initiator still sends for it is dropped as unknown.
func (c *conn) refuse(t *task, h *bhs, res scsi.Result) error {
	if err := c.pr.discardData(h); err != nil {
		return err
	}
	c.startTask(t)
	c.finish(t, res)
	close(t.done)
	t.cancel()
	return nil
}

// reserveWrite takes t's Expected Data Transfer Length from the write
// buffer budgets of the session and of the server, before the buffer is
// allocated. Refused, it returns the status to answer: TASK SET FULL
// when the session holds its share (it has commands in the task set),
// BUSY when the server is out. Only the reader reserves, so the
// session's check and add cannot race.
func (c *conn) reserveWrite(t *task) (byte, bool) {
	n := int64(t.edtl)
	ss := c.sess
	if ss.writeHeld.Load()+n > c.srv.cfg.SessionWriteBuffer {
		c.log.Debug("iscsi write refused: session write buffers full", "itt", t.itt, "held", ss.writeHeld.Load(), "edtl", n)
		return scsi.StatusTaskSetFull, false
	}
	if c.srv.writeHeld.Add(n) > c.srv.cfg.WriteBuffer {
		c.srv.writeHeld.Add(-n)
		c.log.Debug("iscsi write refused: server write buffers full", "itt", t.itt, "edtl", n)
		return scsi.StatusBusy, false
	}
	ss.writeHeld.Add(n)
	t.held = n
	return 0, true
}

// freeBuf returns t's write buffer to the pool and its bytes to the
// budgets.
func (c *conn) freeBuf(t *task) {
	if t.buf != nil {
		c.srv.bufs.put(t.buf)
		t.buf = nil
	}
	if t.held != 0 {
		c.sess.writeHeld.Add(-t.held)
		c.srv.writeHeld.Add(-t.held)
		t.held = 0
	}
}

// startTask registers t.
func (c *conn) startTask(t *task) {
	t.ctx, t.cancel = context.WithCancel(c.ctx)
	c.mu.Lock()
	c.tasks[t.itt] = t
	c.mu.Unlock()
}

// continueWrite solicits more data for t or, once everything arrived,
// runs it.
func (c *conn) continueWrite(t *task) {
	if t.received >= t.edtl || (t.nextOff >= t.edtl && len(t.r2ts) == 0) {
		c.launch(t)
		return
	}
	for uint32(len(t.r2ts)) < c.p.MaxOutstandingR2T && t.nextOff < t.edtl {
		l := min(c.p.MaxBurstLength, t.edtl-t.nextOff)
		ttt := c.newTTT()
		r := &r2tState{ttt: ttt, off: t.nextOff, length: l}
		t.r2ts = append(t.r2ts, r)
		c.r2ts[ttt] = t
		o := c.srv.newOut()
		h := o.h()
		h[0] = opR2T
		h[1] = flagFinal
		copy(h[8:16], t.lunRaw[:])
		h.setU32(offITT, t.itt)
		h.setU32(offTTT, ttt)
		h.setU32(offDataSN, t.r2tSN)
		h.setU32(offBufOff, r.off)
		h.setU32(offResidual, l) // Desired Data Transfer Length
		o.sn = snPeek
		t.r2tSN++
		t.nextOff += l
		c.enqueue(o)
	}
}

func (c *conn) newTTT() uint32 {
	for {
		c.nextTTT++
		if c.nextTTT == reservedTag {
			continue
		}
		if _, used := c.r2ts[c.nextTTT]; !used {
			return c.nextTTT
		}
	}
}

func (c *conn) handleDataOut(p *pdu) error {
	h := &p.h
	ttt := h.u32(offTTT)
	itt := h.itt()
	dataSN := h.u32(offDataSN)
	off := h.u32(offBufOff)
	n := uint32(h.dataLen())
	if ttt == reservedTag {
		c.mu.Lock()
		t := c.tasks[itt]
		c.mu.Unlock()
		if t == nil || !t.inUnsol {
			c.log.Debug("iscsi unsolicited Data-Out for unknown task dropped", "itt", itt)
			return c.pr.discardData(h)
		}
		if dataSN != t.unsolDataSN {
			return c.dataSeqError(t, h, "unsolicited DataSN %d, want %d", dataSN, t.unsolDataSN)
		}
		if off != t.received || n > t.unsolLeft {
			return c.dataSeqError(t, h, "unsolicited Data-Out offset %d len %d (have %d, %d allowed)", off, n, t.received, t.unsolLeft)
		}
		if err := c.pr.readData(h, t.buf[off:off+n]); err != nil {
			return err
		}
		t.dataSince.Store(time.Now().UnixNano())
		t.received += n
		t.unsolLeft -= n
		t.unsolDataSN++
		if h.final() {
			t.inUnsol = false
			t.nextOff = t.received
			c.continueWrite(t)
		}
		return nil
	}
	t := c.r2ts[ttt]
	if t == nil || t.itt != itt {
		c.log.Debug("iscsi Data-Out for unknown transfer dropped", "itt", itt, "ttt", ttt)
		return c.pr.discardData(h)
	}
	var r *r2tState
	ri := -1
	for i, x := range t.r2ts {
		if x.ttt == ttt {
			r, ri = x, i
			break
		}
	}
	if r == nil {
		return c.pr.discardData(h)
	}
	if dataSN != r.dataSN {
		return c.dataSeqError(t, h, "TTT %#x: DataSN %d, want %d", ttt, dataSN, r.dataSN)
	}
	if off != r.off+r.got || r.got+n > r.length {
		return c.dataSeqError(t, h, "TTT %#x: Data-Out offset %d len %d outside burst [%d+%d, %d)", ttt, off, n, r.off, r.got, r.off+r.length)
	}
	if err := c.pr.readData(h, t.buf[off:off+n]); err != nil {
		return err
	}
	t.dataSince.Store(time.Now().UnixNano())
	r.got += n
	r.dataSN++
	t.received += n
	if h.final() || r.got == r.length {
		if r.got != r.length || !h.final() {
			// A short burst, or a complete one without the F bit.
			c.log.Warn("iscsi Data-Out sequence error: task aborted", "itt", itt, "ttt", ttt, "got", r.got, "burst", r.length, "final", h.final())
			c.reject(h, rejectProtocolError)
			c.mu.Lock()
			c.abortLocked(t)
			c.mu.Unlock()
			return nil
		}
		t.r2ts = append(t.r2ts[:ri], t.r2ts[ri+1:]...)
		delete(c.r2ts, ttt)
		c.continueWrite(t)
	}
	return nil
}

// dataSeqError handles a Data-Out out of sequence (DataSN, offset or
// length): at ERL 0 the data cannot be recovered, so the PDU is rejected
// (Protocol Error) and its task aborted without status; the initiator
// fails the command on the Reject. The connection survives.
func (c *conn) dataSeqError(t *task, h *bhs, format string, args ...any) error {
	c.log.Warn("iscsi Data-Out sequence error: task aborted", "itt", t.itt, "err", fmt.Sprintf(format, args...))
	if err := c.pr.discardData(h); err != nil {
		return err
	}
	c.reject(h, rejectProtocolError)
	c.mu.Lock()
	c.abortLocked(t)
	c.mu.Unlock()
	return nil
}

// launch hands t to an idle executor, or to a new one when none is idle
// (there are as many as commands ever ran at once). Executors live as
// long as the connection: no goroutine to start, and no stack to grow,
// per command. Only the reader launches.
func (c *conn) launch(t *task) {
	t.started = true
	t.dataSince.Store(0)
	c.cmdWG.Add(1)
	if c.execIdle.Add(-1) < 0 { // none idle to claim
		c.execIdle.Add(1)
		go c.executor()
	}
	c.execq <- t
}

func (c *conn) executor() {
	for t := range c.execq {
		c.execute(t)
		c.execIdle.Add(1)
	}
}

func (c *conn) execute(t *task) {
	defer c.cmdWG.Done()
	cmd := &scsi.Command{
		Nexus:       c.sess.nexus,
		LUN:         t.lun,
		CDB:         t.cdb,
		ExpectedLen: t.edtl,
		Read:        t.read,
		Write:       t.write,
	}
	if t.buf != nil {
		cmd.DataOut = t.buf[:t.received]
	}
	res := c.sess.lu.Execute(t.ctx, cmd)
	c.freeBuf(t)
	if t.ctx.Err() != nil || resultAborted(&res) {
		res.Release()
		c.mu.Lock()
		if !t.aborted {
			// Connection ending (or the LU dropped the command): no
			// response, release the slot.
			t.aborted = true
			delete(c.tasks, t.itt)
			c.release(t.immediate)
		}
		c.mu.Unlock()
		close(t.done)
		t.cancel()
		return
	}
	c.finish(t, res)
	close(t.done)
	t.cancel()
}

// finish queues t's response unless it was aborted.
func (c *conn) finish(t *task, res scsi.Result) {
	c.mu.Lock()
	if t.aborted {
		c.mu.Unlock()
		res.Release()
		return
	}
	delete(c.tasks, t.itt)
	c.release(t.immediate)
	c.sess.commands.Add(1)
	out := c.buildResponse(t, &res)
	// The data-in buffer goes back to the LU once the last PDU that
	// carries it is written (or dropped).
	out[len(out)-1].after = res.Release
	c.push(out...)
	c.mu.Unlock()
	c.kick()
}

// buildResponse makes the Data-In PDUs and/or SCSI Response for t.
func (c *conn) buildResponse(t *task, res *scsi.Result) []*outPDU {
	var data []byte
	if t.read {
		data = res.DataIn
		if uint32(len(data)) > t.edtl {
			data = data[:t.edtl]
		}
	}
	var rflags byte
	var resid uint32
	good := res.Status == scsi.StatusGood && len(res.Sense) == 0
	switch {
	case res.TransferLen > t.edtl:
		rflags, resid = flagOverflow, res.TransferLen-t.edtl
	case t.read && good && uint32(len(data)) < t.edtl:
		rflags, resid = flagUnderflow, t.edtl-uint32(len(data))
	case res.TransferLen < t.edtl:
		rflags, resid = flagUnderflow, t.edtl-res.TransferLen
	}
	seg := int(c.p.MaxXmitDataSegmentLength)
	n := (len(data) + seg - 1) / seg
	out := make([]*outPDU, 0, n+1)
	var dataSN uint32
	for off := 0; off < len(data); off += seg {
		end := min(off+seg, len(data))
		o := c.srv.newOut()
		h := o.h()
		h[0] = opDataIn
		o.sn = snPeek
		if end == len(data) {
			h[1] = flagFinal
			if good {
				h[1] |= flagStatus | rflags
				h[3] = res.Status
				h.setU32(offResidual, resid)
				o.sn = snAdvance
			}
		}
		h.setU32(offITT, t.itt)
		h.setU32(offTTT, reservedTag)
		h.setU32(offDataSN, dataSN)
		h.setU32(offBufOff, uint32(off))
		o.data = data[off:end]
		h.setDataLen(len(o.data))
		dataSN++
		out = append(out, o)
	}
	if good && len(data) > 0 {
		return out
	}
	o := c.srv.newOut()
	h := o.h()
	h[0] = opSCSIResp
	h[1] = flagFinal | rflags
	h[2] = 0 // command completed at target
	h[3] = res.Status
	h.setU32(offITT, t.itt)
	if t.read {
		h.setU32(offDataSN, dataSN) // ExpDataSN: Data-In PDUs sent
	} else {
		h.setU32(offDataSN, t.r2tSN) // ExpDataSN: R2Ts sent
	}
	h.setU32(offResidual, resid)
	if len(res.Sense) > 0 {
		sl := min(len(res.Sense), 0xffff)
		d := make([]byte, 2+sl)
		binary.BigEndian.PutUint16(d, uint16(sl))
		copy(d[2:], res.Sense)
		o.data = d
		h.setDataLen(len(d))
	}
	o.sn = snAdvance
	return append(out, o)
}

// fixedSense builds fixed-format sense data.
func fixedSense(key, asc, ascq byte) []byte {
	s := make([]byte, 18)
	s[0] = 0x70
	s[2] = key
	s[7] = 10
	s[12] = asc
	s[13] = ascq
	return s
}

func (c *conn) handleNop(p *pdu) error {
	h := &p.h
	if !h.immediate() {
		ok, err := c.admit(h, false)
		if err != nil {
			return err
		}
		if !ok {
			return c.pr.discardData(h)
		}
	}
	if h.itt() == reservedTag {
		// An answer to our ping (or a ping wanting no answer).
		if h.u32(offTTT) != reservedTag {
			c.pingPending.Store(0)
		}
		return c.pr.discardData(h)
	}
	var data []byte
	if n := h.dataLen(); n > int(c.p.MaxXmitDataSegmentLength) {
		// Echo what the initiator accepts, holding no more than that.
		all, err := c.pr.readScratch(h)
		if err != nil {
			return err
		}
		data = bytes.Clone(all[:c.p.MaxXmitDataSegmentLength])
	} else if n > 0 {
		data = make([]byte, n)
		if err := c.pr.readData(h, data); err != nil {
			return err
		}
	}
	o := c.srv.newOut()
	oh := o.h()
	oh[0] = opNopIn
	oh[1] = flagFinal
	copy(oh[8:16], h[8:16])
	oh.setU32(offITT, h.itt())
	oh.setU32(offTTT, reservedTag)
	o.data = data
	oh.setDataLen(len(data))
	o.sn = snAdvance
	c.enqueue(o)
	return nil
}

// keepalive pings an idle initiator and drops one that stopped answering.
func (c *conn) keepalive(every time.Duration) {
	defer c.bgWG.Done()
	tk := time.NewTicker(every / 2)
	defer tk.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case now := <-tk.C:
			if pp := c.pingPending.Load(); pp != 0 {
				if now.UnixNano()-pp > int64(every) {
					c.log.Warn("iscsi initiator does not answer NOP-In, dropping", "initiator", c.sess.initiatorName)
					c.abort("nop timeout")
					return
				}
				continue
			}
			if now.UnixNano()-c.lastRecv.Load() < int64(every) {
				continue
			}
			c.pingPending.Store(now.UnixNano())
			o := c.srv.newOut()
			h := o.h()
			h[0] = opNopIn
			h[1] = flagFinal
			h.setU32(offITT, reservedTag)
			h.setU32(offTTT, 1)
			o.sn = snPeek
			c.enqueue(o)
		}
	}
}

// checkDataOut drops the connection when one of its write commands has
// waited longer than timeout for Data-Out (since its arrival or its last
// Data-Out PDU). At ERL 0 the data cannot be asked for again; the
// initiator sees the connection end, logs in again and retries, as after
// its own timeouts. The server's sweeper calls it (one goroutine and
// ticker for the whole portal, not one per connection).
func (c *conn) checkDataOut(now time.Time, timeout time.Duration) {
	if c.closing.Load() {
		return
	}
	var late *task
	c.mu.Lock()
	for _, t := range c.tasks {
		if since := t.dataSince.Load(); since != 0 && now.UnixNano()-since > int64(timeout) {
			late = t
			break
		}
	}
	c.mu.Unlock()
	if late != nil {
		// Tasks exist only after login: c.sess is set.
		c.log.Warn("iscsi Data-Out timeout, dropping connection", "initiator", c.sess.initiatorName, "target", c.sess.targetName, "itt", late.itt, "timeout", timeout)
		c.abort("Data-Out timeout")
	}
}

// errQueueFull ends a connection whose responses are not read.
var errQueueFull = errors.New("initiator does not read its responses")

// waitQueue holds the reader while more than cfg.ResponseQueue bytes of
// responses wait for the initiator, so one that sends requests without
// reading the answers cannot make them pile up. A queue still over the
// bound after WriteTimeout ends the connection.
func (c *conn) waitQueue() error {
	limit := c.srv.cfg.ResponseQueue
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.wqBytes.Load() <= limit {
		return nil
	}
	c.log.Debug("iscsi response queue full, reading paused", "queued", c.wqBytes.Load())
	expired := false
	tm := time.AfterFunc(c.srv.cfg.WriteTimeout, func() {
		c.wmu.Lock()
		expired = true
		c.wspace.Broadcast()
		c.wmu.Unlock()
	})
	c.wqWaiters++
	for c.wqBytes.Load() > limit && c.werr == nil && !c.wstop && !expired {
		c.wspace.Wait()
	}
	c.wqWaiters--
	tm.Stop()
	if q := c.wqBytes.Load(); q > limit && c.werr == nil && !c.wstop {
		return fmt.Errorf("%w: %d bytes queued for %v", errQueueFull, q, c.srv.cfg.WriteTimeout)
	}
	return nil
}

func (c *conn) handleLogout(p *pdu) error {
	h := &p.h
	if err := c.pr.discardData(h); err != nil {
		return err
	}
	if !h.immediate() {
		if ok, err := c.admit(h, false); !ok || err != nil {
			return err
		}
	}
	reason := h.flags() & 0x7f
	resp := byte(0)
	switch {
	case reason == 2:
		resp = 2 // connection recovery not supported
	case reason == 1 && h.u16(offTTT) != c.cid:
		resp = 1 // CID not found
	case reason > 2:
		c.reject(h, rejectInvalidPDUField)
		return nil
	}
	if resp == 0 {
		// Commands still waiting for data are abandoned; running ones
		// complete before the response.
		c.mu.Lock()
		for _, t := range c.tasks {
			if !t.started {
				c.abortLocked(t)
			}
		}
		c.mu.Unlock()
		ctx, cancel := context.WithTimeout(c.ctx, 30*time.Second)
		waitTasks(ctx, c)
		cancel()
	}
	o := c.srv.newOut()
	oh := o.h()
	oh[0] = opLogoutResp
	oh[1] = flagFinal
	oh[2] = resp
	oh.setU32(offITT, h.itt())
	oh.setU16(40, uint16(c.p.DefaultTime2Wait))
	oh.setU16(42, uint16(c.p.DefaultTime2Retain))
	o.sn = snAdvance
	if resp != 0 {
		c.enqueue(o)
		return nil
	}
	written := make(chan struct{})
	o.after = func() { close(written) }
	c.enqueue(o)
	select {
	case <-written:
	case <-time.After(c.srv.cfg.WriteTimeout):
	}
	return errLogout
}

// waitTasks waits until c has no running command or ctx is done.
func waitTasks(ctx context.Context, c *conn) {
	for {
		c.mu.Lock()
		var t *task
		for _, x := range c.tasks {
			t = x
			break
		}
		c.mu.Unlock()
		if t == nil {
			return
		}
		select {
		case <-t.done:
		case <-ctx.Done():
			return
		}
	}
}

// reject sends a Reject PDU carrying the offending header.
func (c *conn) reject(h *bhs, reason byte) {
	c.log.Debug("iscsi reject", "opcode", h.opcode(), "itt", h.itt(), "reason", reason)
	o := c.srv.newOut()
	oh := o.h()
	oh[0] = opReject
	oh[1] = flagFinal
	oh[2] = reason
	oh.setU32(offITT, reservedTag)
	d := make([]byte, bhsLen)
	copy(d, h[:])
	o.data = d
	oh.setDataLen(bhsLen)
	o.sn = snAdvance
	c.enqueue(o)
}

// abortLocked removes t without a response (c.mu held, reader goroutine
// or teardown).
func (c *conn) abortLocked(t *task) {
	if t.aborted {
		return
	}
	t.aborted = true
	delete(c.tasks, t.itt)
	c.release(t.immediate)
	if t.cancel != nil {
		t.cancel()
	}
	for _, r := range t.r2ts {
		delete(c.r2ts, r.ttt)
	}
	t.r2ts = nil
	t.inUnsol = false
	if !t.started {
		c.freeBuf(t)
		close(t.done)
	}
}

// enqueue hands PDUs to the writer; it never blocks.
func (c *conn) enqueue(os ...*outPDU) {
	if c.push(os...) {
		c.wcond.Signal()
	}
}

// queuedSize is what o counts against cfg.ResponseQueue: its data and
// about what the PDU itself takes.
func queuedSize(o *outPDU) int64 { return int64(len(o.data)) + 128 }

// push queues PDUs; false (and the PDUs freed) once the writer stopped
// or the socket failed.
func (c *conn) push(os ...*outPDU) bool {
	c.wmu.Lock()
	if c.wstop || c.werr != nil {
		c.wmu.Unlock()
		for _, o := range os {
			c.srv.freeOut(o)
		}
		return false
	}
	var n int64
	for _, o := range os {
		n += queuedSize(o)
	}
	c.wqBytes.Add(n)
	c.wq = append(c.wq, os...)
	c.wmu.Unlock()
	return true
}

// dequeued takes n written (or dropped) bytes off the queue count and
// wakes a reader waiting for room (wmu held).
func (c *conn) dequeuedLocked(n int64) {
	if n == 0 {
		return
	}
	c.wqBytes.Add(-n)
	if c.wqWaiters > 0 {
		c.wspace.Broadcast()
	}
}

// kick writes what is queued from the calling goroutine when no batch is
// being written (a command's response then costs no hand-over to the
// writer goroutine); otherwise it wakes the writer. Never call it with
// c.mu held: the write may block on a slow initiator.
func (c *conn) kick() {
	if c.sending.TryLock() {
		c.drain()
		c.sending.Unlock()
		return
	}
	c.wcond.Signal()
}

// stopWriter flushes what is queued (if the socket still works) and ends
// the writer.
func (c *conn) stopWriter() {
	c.wmu.Lock()
	c.wstop = true
	c.wspace.Broadcast()
	c.wmu.Unlock()
	c.wcond.Signal()
	<-c.wdone
}

func (c *conn) writer() {
	defer close(c.wdone)
	for {
		c.wmu.Lock()
		for len(c.wq) == 0 && !c.wstop {
			c.wcond.Wait()
		}
		stop := len(c.wq) == 0
		c.wmu.Unlock()
		if stop {
			return
		}
		c.sending.Lock()
		c.drain()
		c.sending.Unlock()
	}
}

// drain writes the queue, one vectored write per batch, until it is
// empty; the caller holds sending.
func (c *conn) drain() {
	var written int64 // bytes of the last batch, counted until written
	for {
		c.wmu.Lock()
		c.dequeuedLocked(written)
		written = 0
		batch := c.wq
		if len(batch) == 0 {
			c.wmu.Unlock()
			return
		}
		c.wq = c.wbatch[:0]
		broken := c.werr != nil
		c.wmu.Unlock()
		var err error
		if !broken {
			c.wvec, err = c.writeBatch(batch, c.wvec[:0])
		}
		for i, o := range batch {
			written += queuedSize(o)
			c.srv.freeOut(o)
			batch[i] = nil
		}
		c.wbatch = batch
		if err != nil {
			c.wmu.Lock()
			c.werr = err
			q := c.wq
			c.wq = nil
			for _, o := range q {
				written += queuedSize(o)
			}
			c.dequeuedLocked(written)
			written = 0
			c.wspace.Broadcast()
			c.wmu.Unlock()
			for _, o := range q {
				c.srv.freeOut(o)
			}
			switch {
			case c.closing.Load():
			case errors.Is(err, os.ErrDeadlineExceeded):
				c.log.Warn("iscsi initiator stopped reading, dropping connection", "initiator", c.sess.initiatorName, "err", err)
			default:
				c.log.Debug("iscsi write failed", "err", err)
			}
			c.abort("write failed")
		}
	}
}

// fillSN sets StatSN/ExpCmdSN/MaxCmdSN of o per its mode.
func (c *conn) fillSN(o *outPDU) {
	if o.sn == snNone {
		return
	}
	h := o.h()
	h.setU32(offStatSN, c.statSN)
	if o.sn == snAdvance {
		c.statSN++
	}
	exp, max := c.sess.window()
	h.setU32(offExpCmdSN, exp)
	h.setU32(offMaxCmdSN, max)
}

// writeBatch writes PDUs with one vectored write.
func (c *conn) writeBatch(batch []*outPDU, vec net.Buffers) (net.Buffers, error) {
	total := 0
	for _, o := range batch {
		c.fillSN(o)
		o.h().setDataLen(len(o.data))
		hl := bhsLen
		if c.hdrDigest {
			binary.LittleEndian.PutUint32(o.hdr[bhsLen:], crc32.Checksum(o.hdr[:bhsLen], crc32cTable))
			hl += 4
		}
		vec = append(vec, o.hdr[:hl])
		total += hl
		if n := len(o.data); n > 0 {
			vec = append(vec, o.data)
			pad := padLen(n)
			tl := pad
			clear(o.tail[:pad])
			if c.dataDigest {
				crc := crc32.Update(0, crc32cTable, o.data)
				crc = crc32.Update(crc, crc32cTable, o.tail[:pad])
				binary.LittleEndian.PutUint32(o.tail[pad:], crc)
				tl += 4
			}
			if tl > 0 {
				vec = append(vec, o.tail[:tl])
			}
			total += n + tl
		}
	}
	c.nc.SetWriteDeadline(time.Now().Add(c.srv.cfg.WriteTimeout))
	w := vec
	_, err := w.WriteTo(c.nc)
	for _, o := range batch {
		if o.after != nil {
			o.after()
			o.after = nil
		}
	}
	if err == nil {
		c.bytesOut.Add(uint64(total))
	} else if errors.Is(err, os.ErrDeadlineExceeded) {
		err = fmt.Errorf("initiator stopped reading: %w", err)
	}
	clear(vec)
	return vec[:0], err
}

func (s *Server) newOut() *outPDU {
	return s.outs.Get().(*outPDU)
}

func (s *Server) freeOut(o *outPDU) {
	if o.after != nil {
		o.after()
	}
	*o = outPDU{}
	s.outs.Put(o)
}

// resultAborted reports a Result the LU dropped (no response is sent).
func resultAborted(r *scsi.Result) bool { return r.Aborted }
