package iscsi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ukai-storage/ukai/ratelog"
	"github.com/ukai-storage/ukai/target/scsi"
)

// Config configures a Server. Zero values take the documented defaults.
type Config struct {
	// Listen is the TCP address to bind, exactly as given (default
	// "127.0.0.1:3260"). The server never widens it.
	Listen string
	// PortalGroupTag is the target portal group tag (default 1).
	PortalGroupTag uint16
	// TargetAddress is the "host:port" SendTargets advertises (default: the
	// bound listener address; if that is a wildcard address, the local
	// address of the discovery connection).
	TargetAddress string
	Logger        *slog.Logger

	// MaxRecvDataSegmentLength is the largest data segment the target
	// accepts in one PDU, declared to initiators (default 256 KiB,
	// 512..16 MiB-1).
	MaxRecvDataSegmentLength uint32
	// MaxXmitDataSegmentLength caps the Data-In segments the target sends,
	// whatever the initiator declares (default 1 MiB).
	MaxXmitDataSegmentLength uint32
	// MaxBurstLength is the largest solicited burst (one R2T) the target
	// accepts (default 16 MiB - 512, the largest multiple of 512 the
	// 24-bit key allows).
	MaxBurstLength uint32
	// FirstBurstLength bounds immediate plus unsolicited data of a command
	// (default 256 KiB).
	FirstBurstLength uint32
	// InitialR2T=Yes forbids unsolicited Data-Out. The default (false) offers
	// InitialR2T=No, which saves a round trip on writes up to
	// FirstBurstLength; the initiator may still ask for Yes.
	InitialR2T bool
	// DisableImmediateData refuses ImmediateData (default: Yes).
	DisableImmediateData bool
	// MaxOutstandingR2T is how many R2Ts per command may be pending
	// (default 4).
	MaxOutstandingR2T uint32
	// QueueDepth is the CmdSN window: how many commands a session may have
	// in flight (default 128).
	QueueDepth uint32
	// MaxTransferLength is the largest Expected Data Transfer Length of a
	// write the target buffers (default 32 MiB); a bigger write gets CHECK
	// CONDITION. The write buffers of a session are bounded by QueueDepth
	// times this.
	MaxTransferLength uint32
	// LoginTimeout bounds the whole login phase (default 15s).
	LoginTimeout time.Duration
	// WriteTimeout bounds one socket write to an initiator that stopped
	// reading (default 60s); the connection is then dropped.
	WriteTimeout time.Duration
	// NopInterval, if positive, sends a NOP-In ping after that much idle
	// time; an initiator that does not answer within NopInterval is
	// dropped. Default 0: no target-initiated pings.
	NopInterval time.Duration

	// Resource bounds against initiators that misbehave or attack; the
	// answers they get are in docs/security.md.

	// MaxConnections caps the connections of the portal, logged in or
	// not (default 4096); MaxConnectionsPerAddress caps them per source
	// IP address (default 512: a hypervisor opens a session per VM
	// disk). A connection over either is closed at once.
	MaxConnections           int
	MaxConnectionsPerAddress int
	// DataOutTimeout bounds how long a write command waits for its
	// Data-Out (default 30s); the connection is then dropped.
	DataOutTimeout time.Duration
	// SessionWriteBuffer bounds the write (Data-Out) buffers one session
	// holds, from the command's arrival until it completes (default 64
	// MiB, at least MaxTransferLength); a write over it gets TASK SET
	// FULL. WriteBuffer bounds them for the whole server (default 1 GiB,
	// at least SessionWriteBuffer); a write over it gets BUSY.
	SessionWriteBuffer int64
	WriteBuffer        int64
	// ResponseQueue bounds the bytes of responses queued for one
	// connection (default 16 MiB): over it, no more requests are read
	// from the initiator until the queue drains, and a connection whose
	// queue does not drain within WriteTimeout is dropped.
	ResponseQueue int64

	// Authenticator authenticates logins and filters discovery. Nil lets
	// everyone in with AuthMethod=None.
	Authenticator Authenticator
}

// Defaults of the resource bounds.
const (
	defaultMaxConnections           = 4096
	defaultMaxConnectionsPerAddress = 512
	defaultDataOutTimeout           = 30 * time.Second
	defaultSessionWriteBuffer       = 64 << 20
	defaultWriteBuffer              = 1 << 30
	defaultResponseQueue            = 16 << 20
)

func (c *Config) setDefaults() error {
	if c.Listen == "" {
		c.Listen = "127.0.0.1:3260"
	}
	if c.PortalGroupTag == 0 {
		c.PortalGroupTag = 1
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	def := func(v *uint32, d, lo, hi uint32, name string) error {
		if *v == 0 {
			*v = d
		}
		if *v < lo || *v > hi {
			return fmt.Errorf("iscsi: %s %d out of range [%d, %d]", name, *v, lo, hi)
		}
		return nil
	}
	for _, e := range []error{
		def(&c.MaxRecvDataSegmentLength, 256<<10, 512, 1<<24-1, "MaxRecvDataSegmentLength"),
		def(&c.MaxXmitDataSegmentLength, 1<<20, 512, 1<<24-1, "MaxXmitDataSegmentLength"),
		def(&c.MaxBurstLength, 1<<24-512, 512, 1<<24-1, "MaxBurstLength"),
		def(&c.FirstBurstLength, 256<<10, 512, 1<<24-1, "FirstBurstLength"),
		def(&c.MaxOutstandingR2T, 4, 1, 65535, "MaxOutstandingR2T"),
		def(&c.QueueDepth, 128, 1, 1<<16, "QueueDepth"),
		def(&c.MaxTransferLength, 32<<20, 4096, 1<<30, "MaxTransferLength"),
	} {
		if e != nil {
			return e
		}
	}
	if c.FirstBurstLength > c.MaxBurstLength {
		c.FirstBurstLength = c.MaxBurstLength
	}
	if c.LoginTimeout <= 0 {
		c.LoginTimeout = 15 * time.Second
	}
	if c.WriteTimeout <= 0 {
		c.WriteTimeout = 60 * time.Second
	}
	if c.MaxConnections <= 0 {
		c.MaxConnections = defaultMaxConnections
	}
	if c.MaxConnectionsPerAddress <= 0 {
		c.MaxConnectionsPerAddress = defaultMaxConnectionsPerAddress
	}
	if c.DataOutTimeout <= 0 {
		c.DataOutTimeout = defaultDataOutTimeout
	}
	if c.SessionWriteBuffer <= 0 {
		c.SessionWriteBuffer = max(defaultSessionWriteBuffer, int64(c.MaxTransferLength))
	}
	if c.WriteBuffer <= 0 {
		c.WriteBuffer = max(defaultWriteBuffer, c.SessionWriteBuffer)
	}
	if c.ResponseQueue <= 0 {
		c.ResponseQueue = defaultResponseQueue
	}
	if c.SessionWriteBuffer < int64(c.MaxTransferLength) {
		return fmt.Errorf("iscsi: SessionWriteBuffer %d smaller than MaxTransferLength %d: the largest write could never run", c.SessionWriteBuffer, c.MaxTransferLength)
	}
	if c.WriteBuffer < c.SessionWriteBuffer {
		return fmt.Errorf("iscsi: WriteBuffer %d smaller than SessionWriteBuffer %d", c.WriteBuffer, c.SessionWriteBuffer)
	}
	return nil
}

func (c *Config) limits() limits {
	return limits{
		MaxRecvDataSegmentLength: c.MaxRecvDataSegmentLength,
		MaxBurstLength:           c.MaxBurstLength,
		FirstBurstLength:         c.FirstBurstLength,
		InitialR2T:               c.InitialR2T,
		ImmediateData:            !c.DisableImmediateData,
		MaxOutstandingR2T:        c.MaxOutstandingR2T,
		MaxXmit:                  c.MaxXmitDataSegmentLength,
	}
}

// Targets is the set of exported images; it changes at runtime.
type Targets interface {
	// LookupTarget returns the logical unit (LUN 0) of a target.
	LookupTarget(iqn string) (*scsi.LU, bool)
	// TargetNames lists the targets for SendTargets.
	TargetNames() []string
}

// PortalLister is implemented by Targets reached through several portals
// (one per node, multipath): SendTargets answers each target with the
// addresses TargetPortals gives ("host:port,tag", the preferred first),
// and with this portal's own address when it gives none.
type PortalLister interface {
	TargetPortals(iqns []string) map[string][]string
}

// SessionInfo describes one live session.
type SessionInfo struct {
	InitiatorName string
	ISID          string // 12 hex digits
	TSIH          uint16
	Target        string // "" for discovery sessions
	Discovery     bool
	RemoteAddr    string
	Commands      uint64 // SCSI commands completed
	BytesIn       uint64 // PDU bytes received
	BytesOut      uint64 // PDU bytes sent
}

// Server is an iSCSI target portal.
type Server struct {
	cfg     Config
	targets Targets
	log     *slog.Logger

	mu       sync.Mutex
	ln       net.Listener
	closed   bool
	sessions map[uint16]*session
	conns    map[*conn]struct{}
	perAddr  map[string]int  // connections per source IP address
	refused  ratelog.Limiter // refused connections logged at warn once per refusalLogEvery
	nextTSIH uint16
	closeCtx context.Context // set by Close: in-flight commands may run until it is done

	bufs      bufPool      // write (Data-Out) buffers
	writeHeld atomic.Int64 // bytes of write buffers held, bounded by cfg.WriteBuffer
	outs      sync.Pool    // *outPDU

	wg       sync.WaitGroup // connection goroutines
	serving  chan struct{}  // closed when Close is called
	baseCtx  context.Context
	baseStop context.CancelFunc
}

// NewServer checks cfg and returns a Server; call Listen then Serve.
func NewServer(cfg Config, t Targets) (*Server, error) {
	if t == nil {
		return nil, errors.New("iscsi: nil Targets")
	}
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		cfg:      cfg,
		targets:  t,
		log:      cfg.Logger.With("component", "iscsi"),
		sessions: map[uint16]*session{},
		conns:    map[*conn]struct{}{},
		perAddr:  map[string]int{},
		refused:  ratelog.Limiter{Every: refusalLogEvery},
		serving:  make(chan struct{}),
		baseCtx:  ctx,
		baseStop: cancel,
	}
	s.outs.New = func() any { return new(outPDU) }
	return s, nil
}

// Listen binds cfg.Listen. A bind failure (address in use, permission) is
// returned, wrapped as "iscsi.listen ADDR: reason".
func (s *Server) Listen() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("iscsi.listen: server closed")
	}
	if s.ln != nil {
		return fmt.Errorf("iscsi.listen %s: already listening", s.cfg.Listen)
	}
	ln, err := net.Listen("tcp", s.cfg.Listen)
	if err != nil {
		return fmt.Errorf("iscsi.listen %s: %w", s.cfg.Listen, rootCause(err))
	}
	s.ln = ln
	s.log.Info("iscsi listening", "addr", ln.Addr().String())
	return nil
}

// rootCause digs the errno out of a net.OpError so the message reads
// "address already in use" while errors.Is(err, syscall.EADDRINUSE) holds.
func rootCause(err error) error {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno
	}
	var se *os.SyscallError
	if errors.As(err, &se) {
		return se.Err
	}
	return err
}

// Addr is the bound address (nil before Listen).
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

// Serve accepts connections until ctx is done or Close is called. It does
// not end the sessions already running: Close does.
func (s *Server) Serve(ctx context.Context) error {
	s.mu.Lock()
	ln := s.ln
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return nil
	}
	if ln == nil {
		return errors.New("iscsi.serve: Listen not called")
	}
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	sweepCtx, endSweep := context.WithCancel(ctx)
	swept := make(chan struct{})
	go func() {
		defer close(swept)
		s.sweepDataOut(sweepCtx)
	}()
	defer func() { endSweep(); <-swept }()
	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			select {
			case <-s.serving:
				return nil
			default:
			}
			if ctx.Err() != nil {
				return nil
			}
			if ne, ok := err.(net.Error); ok && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("iscsi accept", "err", err)
				select {
				case <-time.After(backoff):
				case <-ctx.Done():
					return nil
				}
				continue
			}
			return fmt.Errorf("iscsi.serve %s: %w", ln.Addr(), err)
		}
		backoff = 0
		if !s.startConn(nc) {
			nc.Close()
		}
	}
}

func (s *Server) startConn(nc net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	addr := sourceAddr(nc.RemoteAddr())
	switch {
	case len(s.conns) >= s.cfg.MaxConnections:
		s.refuseLocked(nc, "portal connection limit", s.cfg.MaxConnections)
		return false
	case s.perAddr[addr] >= s.cfg.MaxConnectionsPerAddress:
		s.refuseLocked(nc, "per-address connection limit", s.cfg.MaxConnectionsPerAddress)
		return false
	}
	s.perAddr[addr]++
	if tc, ok := nc.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
		tc.SetKeepAlive(true)
		tc.SetKeepAlivePeriod(30 * time.Second)
	}
	c := newConn(s, nc)
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		c.run()
		s.mu.Lock()
		delete(s.conns, c)
		if s.perAddr[addr]--; s.perAddr[addr] <= 0 {
			delete(s.perAddr, addr)
		}
		s.mu.Unlock()
	}()
	return true
}

// Close stops accepting and ends every session. In-flight commands may
// complete until ctx is done; they are then cancelled. Close waits for all
// goroutines, or returns ctx's error if they outlive it.
func (s *Server) Close(ctx context.Context) error {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		s.closeCtx = ctx
		close(s.serving)
		if s.ln != nil {
			s.ln.Close()
		}
	}
	conns := s.connsLocked()
	s.mu.Unlock()
	for _, c := range conns {
		c.shutdown("server closing")
	}
	done := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		s.baseStop()
		return nil
	case <-ctx.Done():
	}
	// Out of patience: cancel every command, drop every connection and
	// wait a little more.
	s.baseStop()
	s.mu.Lock()
	for c := range s.conns {
		c.abort("server close deadline")
	}
	s.mu.Unlock()
	select {
	case <-done:
		return nil
	case <-time.After(2 * time.Second):
		return fmt.Errorf("iscsi.close: sessions still running: %w", ctx.Err())
	}
}

// drainCtx is the context in-flight commands may still run under when a
// connection is shut down gracefully.
func (s *Server) drainCtx() context.Context {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closeCtx != nil {
		return s.closeCtx
	}
	return nil
}

// DropTarget ends every session logged in to target iqn (the image is
// gone). Their commands are cancelled; DropTarget waits (up to 10s) until
// the sessions have stopped using the LU.
func (s *Server) DropTarget(iqn string) {
	s.drop("target removed", func(ss *session) bool { return ss.targetName == iqn })
}

// DropInitiator ends the sessions of initiator on target iqn (its access
// was withdrawn), like DropTarget.
func (s *Server) DropInitiator(iqn, initiator string) {
	s.drop("access withdrawn", func(ss *session) bool {
		return ss.targetName == iqn && strings.EqualFold(ss.initiatorName, initiator)
	})
}

func (s *Server) drop(reason string, match func(*session) bool) {
	s.mu.Lock()
	var victims []*session
	for tsih, ss := range s.sessions {
		if match(ss) {
			victims = append(victims, ss)
			delete(s.sessions, tsih)
		}
	}
	s.mu.Unlock()
	for _, ss := range victims {
		s.log.Info("iscsi session dropped: "+reason, "target", ss.targetName, "initiator", ss.initiatorName, "tsih", ss.tsih)
		ss.close(reason)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, ss := range victims {
		ss.wait(ctx)
	}
}

// Sessions lists the live (fully logged-in) sessions.
func (s *Server) Sessions() []SessionInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]SessionInfo, 0, len(s.sessions))
	for _, ss := range s.sessions {
		out = append(out, ss.info())
	}
	return out
}

// registerSession allocates a TSIH and registers ss, first closing any
// session it reinstates (same initiator name, ISID and target). It returns
// the sessions to close.
func (s *Server) registerSession(ss *session) (old []*session, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, errors.New("server closing")
	}
	for tsih, o := range s.sessions {
		if o.initiatorName == ss.initiatorName && o.isid == ss.isid && o.targetName == ss.targetName {
			old = append(old, o)
			delete(s.sessions, tsih)
		}
	}
	for range 1 << 16 {
		s.nextTSIH++
		if s.nextTSIH == 0 {
			continue
		}
		if _, used := s.sessions[s.nextTSIH]; !used {
			ss.tsih = s.nextTSIH
			s.sessions[ss.tsih] = ss
			return old, nil
		}
	}
	return old, errors.New("no free TSIH")
}

func (s *Server) unregisterSession(ss *session) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if cur, ok := s.sessions[ss.tsih]; ok && cur == ss {
		delete(s.sessions, ss.tsih)
	}
}

func (s *Server) lookupSession(tsih uint16) *session {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sessions[tsih]
}

// targetAddress is the TargetAddress value advertised on connection c.
func (s *Server) targetAddress(local net.Addr) string {
	addr := s.cfg.TargetAddress
	if addr == "" {
		if a := s.Addr(); a != nil {
			addr = a.String()
			if ta, ok := a.(*net.TCPAddr); ok && ta.IP.IsUnspecified() && local != nil {
				addr = local.String()
			}
		} else if local != nil {
			addr = local.String()
		}
	}
	return addr + "," + strconv.Itoa(int(s.cfg.PortalGroupTag))
}

// connCount is the number of connections, logged in or not.
func (s *Server) connCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// sourceAddr is the IP address a connection comes from.
func sourceAddr(a net.Addr) string {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.IP.String()
	}
	host, _, err := net.SplitHostPort(a.String())
	if err != nil {
		return a.String()
	}
	return host
}

// connsLocked lists the open connections (s.mu held), so that they can
// be acted on after s.mu is let go.
func (s *Server) connsLocked() []*conn {
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	return conns
}

// sweepDataOut checks every connection for write commands waiting too
// long for Data-Out (conn.checkDataOut), every DataOutTimeout/4, until ctx
// ends.
func (s *Server) sweepDataOut(ctx context.Context) {
	timeout := s.cfg.DataOutTimeout
	tk := time.NewTicker(max(timeout/4, 10*time.Millisecond))
	defer tk.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.serving:
			return
		case now := <-tk.C:
			s.mu.Lock()
			conns := s.connsLocked()
			s.mu.Unlock()
			for _, c := range conns {
				c.checkDataOut(now, timeout)
			}
		}
	}
}

// refusalLogEvery is how often a refused connection is logged at warn
// (with the count of those not logged meanwhile); the others go to debug.
const refusalLogEvery = 10 * time.Second

// refuseLocked logs a connection refused for reason (s.mu held). The
// caller closes it.
func (s *Server) refuseLocked(nc net.Conn, reason string, limit int) {
	missed, ok := s.refused.Allow(time.Now())
	if !ok {
		s.log.Debug("iscsi connection refused", "remote", nc.RemoteAddr().String(), "reason", reason, "limit", limit)
		return
	}
	s.log.Warn("iscsi connection refused", "remote", nc.RemoteAddr().String(), "reason", reason, "limit", limit, "refused_since_last_log", missed)
}
