package peer

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ukai-storage/ukai/ratelog"
)

// ServerConfig configures a peer server.
type ServerConfig struct {
	// Listen is the IP:port to bind, exactly (a literal IP, no host name;
	// port 0 picks a free port).
	Listen string
	// TLS, when set, makes the server speak HTTP/2 over TLS; nil means
	// cleartext HTTP/2 (h2c).
	TLS *tls.Config
	// Logger receives request failures; nil discards.
	Logger *slog.Logger
	// MaxInflight bounds the requests being served at once (and so the
	// body buffers held); further requests wait. 0 means 64.
	MaxInflight int
	// Volumes serves the I/O other nodes forward for the images this node
	// owns (the /peer/v1/io/ endpoints); nil: those endpoints answer 404
	// "not supported".
	Volumes Volumes
	// Member, when set, says whether a node name is a member of the
	// cluster: with TLS, forwarded I/O is served only for a client whose
	// verified certificate names a member (a certificate of the cluster
	// CA issued to anything else is refused).
	Member func(node string) bool
	// Control serves the control calls of other nodes (prepare and grow
	// a copy, release an image); nil: they answer 404.
	Control Control
	// Commands runs the SCSI commands other nodes forward for the images
	// this node owns (command.go); nil: they answer 404.
	Commands Commands
}

const (
	defaultMaxInflight = 64
	// streamChunk is how much a streamed response reads from the copy at
	// once (at least one block).
	streamChunk = 4 << 20
	// bodyTimeout bounds receiving one write body.
	bodyTimeout = time.Minute
	// closeWait bounds the Close that Serve runs when its ctx ends.
	closeWait = 10 * time.Second
)

var errServerClosing = errors.New("peer server closing")

// Expected is an error a Backend or Commands answers as part of the
// protocol, not a failure (a forwarded I/O the owner wants as a whole
// command): logged at debug, not warn.
type Expected interface {
	error
	Expected() bool
}

// Server serves the node's copies to peers.
type Server struct {
	cfg  ServerConfig
	st   Store
	log  *slog.Logger
	srv  *http.Server
	sem  chan struct{}
	bufs pool

	base   context.Context
	cancel context.CancelCauseFunc

	blkTLS *tls.Config // the TLS handshake of new connections: ALPN blkALPN or h2
	budget *budget     // request and answer bytes held by block connections

	mu       sync.Mutex
	ln       net.Listener
	closed   bool
	conns    map[net.Conn]struct{} // block connections and those not told apart yet
	handlers sync.WaitGroup

	accepted atomic.Int64 // connections accepted (tests)

	bytesIn  atomic.Int64 // block data received (writes)
	bytesOut atomic.Int64 // block data sent (reads, ranges)

	gates gates // per image: the fence floor and the writes in flight

	forbidLog ratelog.Limiter // warnings of refused writes: one a second
}

// Stats are the data bytes a server moved since it started.
type Stats struct {
	BytesIn  int64 `json:"bytes_in"`  // block data written to this node's copies by peers
	BytesOut int64 `json:"bytes_out"` // block data read from this node's copies by peers
}

// Stats returns the byte counters.
func (s *Server) Stats() Stats {
	return Stats{BytesIn: s.bytesIn.Load(), BytesOut: s.bytesOut.Load()}
}

// NewServer returns a server for st; it does not bind yet (see Listen).
func NewServer(cfg ServerConfig, st Store) (*Server, error) {
	if st == nil {
		return nil, errors.New("peer.NewServer: nil Store")
	}
	host, port, err := net.SplitHostPort(cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("peer.NewServer: listen address %q: %w", cfg.Listen, err)
	}
	if _, err := netip.ParseAddr(host); err != nil {
		return nil, fmt.Errorf("peer.NewServer: listen address %q: want a literal IP: %w", cfg.Listen, err)
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return nil, fmt.Errorf("peer.NewServer: listen address %q: bad port: %w", cfg.Listen, err)
	}
	if cfg.MaxInflight <= 0 {
		cfg.MaxInflight = defaultMaxInflight
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		forbidLog: ratelog.Limiter{Every: time.Second},
		cfg:       cfg,
		st:        st,
		log:       log.With("component", "peer.server"),
		sem:       make(chan struct{}, cfg.MaxInflight),

		budget: newBudget(maxInflightBytes),
		conns:  map[net.Conn]struct{}{},
	}
	s.base, s.cancel = context.WithCancelCause(context.Background())

	mux := http.NewServeMux()
	mux.HandleFunc("GET "+pathChecksums, s.handle("checksums", s.checksums))
	mux.HandleFunc("GET "+pathRange, s.handle("range", s.readRange))
	mux.HandleFunc("POST "+pathControl+"{op}", s.control)
	mux.HandleFunc("POST "+pathCommand, s.command)

	s.srv = &http.Server{
		Handler:           mux,
		Protocols:         protocols(cfg.TLS),
		HTTP2:             h2config(30 * time.Second),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       10 * time.Minute,
		MaxHeaderBytes:    16 << 10,
		BaseContext:       func(net.Listener) context.Context { return s.base },
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	if cfg.TLS != nil {
		tc := cfg.TLS.Clone()
		tc.NextProtos = []string{"h2"}
		s.srv.TLSConfig = tc
		s.blkTLS = cfg.TLS.Clone()
		s.blkTLS.NextProtos = []string{blkALPN, "h2"}
	}
	return s, nil
}

// Listen binds cfg.Listen. Serve calls it if it was not called.
func (s *Server) Listen() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("peer.listen %s: %w", s.cfg.Listen, http.ErrServerClosed)
	}
	if s.ln != nil {
		return fmt.Errorf("peer.listen %s: already listening", s.cfg.Listen)
	}
	ln, err := net.Listen("tcp", s.cfg.Listen)
	if err != nil {
		var se *os.SyscallError
		if errors.As(err, &se) {
			err = se.Err
		}
		return fmt.Errorf("peer.listen %s: %w", s.cfg.Listen, err)
	}
	s.ln = ln
	return nil
}

// Addr is the bound address, nil before Listen.
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

// Serve serves until ctx ends or Close is called; both end with a nil
// error.
func (s *Server) Serve(ctx context.Context) error {
	if s.Addr() == nil {
		if err := s.Listen(); err != nil {
			return err
		}
	}
	s.mu.Lock()
	ln := s.ln
	s.mu.Unlock()
	stop := context.AfterFunc(ctx, func() {
		cctx, cancel := context.WithTimeout(context.Background(), closeWait)
		defer cancel()
		if err := s.Close(cctx); err != nil {
			s.log.Warn("close", "err", err)
		}
	})
	defer stop()
	s.log.Info("serving", "addr", ln.Addr().String(), "tls", s.cfg.TLS != nil)
	hl := newConnListener(ln.Addr())
	herr := make(chan error, 1)
	go func() { herr <- s.srv.Serve(hl) }()
	err := s.acceptLoop(ln, hl)
	hl.Close()
	if e := <-herr; err == nil && !errors.Is(e, http.ErrServerClosed) && !errors.Is(e, net.ErrClosed) {
		err = e
	}
	if err != nil {
		return fmt.Errorf("peer.serve %s: %w", ln.Addr(), err)
	}
	return nil
}

// Close stops the server: it closes the listener and every connection and
// cancels the requests in flight, then waits, within ctx, for their
// handlers to return.
func (s *Server) Close(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	ln := s.ln
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.cancel(errServerClosing)
	err := s.srv.Close()
	if ln != nil {
		ln.Close() // in case Serve never ran
	}
	done := make(chan struct{})
	go func() {
		s.handlers.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		return fmt.Errorf("peer.close: handlers still running: %w", ctx.Err())
	}
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("peer.close: %w", err)
	}
	return nil
}

// op serves one request on the copy; it returns an error if nothing was
// written to w yet.
type op func(ctx context.Context, w http.ResponseWriter, r *http.Request, l Local) error

func (s *Server) handle(name string, fn op) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		s.handlers.Add(1)
		defer s.handlers.Done()
		ctx := r.Context()
		err := s.serve(ctx, w, r, fn)
		if err != nil {
			s.reply(w, r, name, s.status(ctx, err), err)
		}
	}
}

// logRefused logs a request answered with an error: a warning for the
// server's own failures (5xx), a debug line for refused requests.
func (s *Server) logRefused(op, remote, id string, code int, err error) {
	var ex Expected
	switch {
	case errors.As(err, &ex) && ex.Expected():
		s.log.Debug("request answered with an expected failure", "op", op, "remote", remote, "id", id, "status", code, "err", err)
	case code >= 500:
		s.log.Warn("request failed", "op", op, "remote", remote, "id", id, "status", code, "err", err)
	case code == http.StatusForbidden:
		// Somebody without the authority tried to change a copy: worth a
		// warning, at most one a second (the rest counted) so a flood of
		// them does not flood the log.
		if n, ok := s.forbidLog.Allow(time.Now()); ok {
			s.log.Warn("request refused: no authority over the copy", "op", op, "remote", remote, "id", id, "status", code, "err", err, "not_logged_since", n)
		} else {
			s.log.Debug("request refused", "op", op, "remote", remote, "id", id, "status", code, "err", err)
		}
	default:
		s.log.Debug("request refused", "op", op, "remote", remote, "id", id, "status", code, "err", err)
	}
}

// reply answers a request that failed before anything was written.
func (s *Server) reply(w http.ResponseWriter, r *http.Request, name string, code int, err error) {
	s.logRefused(name, r.RemoteAddr, r.Header.Get(hID), code, err)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(code)
	io.WriteString(w, err.Error())
}

func (s *Server) serve(ctx context.Context, w http.ResponseWriter, r *http.Request, fn op) error {
	ref := Ref{ID: r.Header.Get(hID)}
	if !validID(ref.ID) {
		return fmt.Errorf("%w: image id %q is not 32 hex digits", ErrBadRequest, ref.ID)
	}
	var err error
	if ref.Gen, err = headerUint(r.Header, hGen); err != nil {
		return err
	}
	select {
	case s.sem <- struct{}{}:
	case <-ctx.Done():
		return context.Cause(ctx)
	}
	defer func() { <-s.sem }()
	l, err := s.open(ctx, ref, httpCaller(r), AccessRead)
	if err != nil {
		return err
	}
	return fn(ctx, w, r, l)
}

// httpCaller is the verified node behind an HTTP/2 request.
func httpCaller(r *http.Request) Caller {
	return Caller{Node: certNode(r.TLS), Addr: r.RemoteAddr}
}

// certNode is the node name of a verified client certificate: its
// CommonName ("" without one). The server's TLS configuration verified it
// against the cluster CA during the handshake.
func certNode(cs *tls.ConnectionState) string {
	if cs == nil || len(cs.VerifiedChains) == 0 || len(cs.PeerCertificates) == 0 {
		return ""
	}
	return cs.PeerCertificates[0].Subject.CommonName
}

// open opens the local copy of ref through the store for caller and
// checks the geometry the store reports.
func (s *Server) open(ctx context.Context, ref Ref, caller Caller, a Access) (Local, error) {
	l, err := s.st.Open(ctx, ref, caller, a)
	if err != nil {
		return Local{}, fmt.Errorf("open %s: %w", ref, err)
	}
	if l.Copy == nil || l.Size <= 0 || l.BlockSize < Align || l.BlockSize > maxBlockSize {
		return Local{}, fmt.Errorf("open %s: store returned a bad geometry (size %d, block size %d)", ref, l.Size, l.BlockSize)
	}
	return l, nil
}

func (s *Server) status(ctx context.Context, err error) int {
	switch {
	case errors.Is(err, ErrNotOwner):
		return http.StatusMisdirectedRequest
	case errors.Is(err, ErrNoCopy), errors.Is(err, ErrUnknownImage):
		return http.StatusNotFound
	case errors.Is(err, ErrStaleGeneration):
		return http.StatusConflict
	case errors.Is(err, ErrForbidden):
		return http.StatusForbidden
	case errors.Is(err, ErrStaleEpoch):
		return http.StatusPreconditionFailed
	case errors.Is(err, ErrBadRequest):
		return http.StatusBadRequest
	case errors.Is(context.Cause(s.base), errServerClosing), errors.Is(err, ErrUnavailable):
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

func headerUint(h http.Header, key string) (uint64, error) {
	v := h[key]
	if len(v) != 1 {
		return 0, fmt.Errorf("%w: header %s missing or repeated", ErrBadRequest, key)
	}
	n, err := strconv.ParseUint(v[0], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: header %s: %v", ErrBadRequest, key, err)
	}
	return n, nil
}

func headerInt(h http.Header, key string) (int64, error) {
	v := h[key]
	if len(v) != 1 {
		return 0, fmt.Errorf("%w: header %s missing or repeated", ErrBadRequest, key)
	}
	n, err := strconv.ParseInt(v[0], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: header %s: %v", ErrBadRequest, key, err)
	}
	return n, nil
}

func (s *Server) checksums(ctx context.Context, w http.ResponseWriter, r *http.Request, l Local) error {
	sums := s.bufs.get(int(max(1, streamChunk/l.BlockSize) * sha256.Size)) // one chunk's sums
	defer s.bufs.put(sums)
	return s.stream(ctx, w, r, l, func(chunk []byte, k int64) error {
		out := (*sums)[:0]
		for i := int64(0); i < k; i++ {
			blk := chunk[i*l.BlockSize : min((i+1)*l.BlockSize, int64(len(chunk)))]
			sum := sha256.Sum256(blk)
			out = append(out, sum[:]...)
		}
		_, err := w.Write(out)
		return err
	})
}

func (s *Server) readRange(ctx context.Context, w http.ResponseWriter, r *http.Request, l Local) error {
	return s.stream(ctx, w, r, l, func(chunk []byte, _ int64) error {
		_, err := w.Write(chunk)
		return err
	})
}

// stream validates a block range, then reads it from the copy a chunk of
// whole blocks at a time and passes each chunk (k blocks; the image's last
// block at its real length) to emit, flushing after each. The status ends
// up in the trailer.
func (s *Server) stream(ctx context.Context, w http.ResponseWriter, r *http.Request, l Local, emit func(chunk []byte, k int64) error) error {
	from, err := headerInt(r.Header, hFrom)
	if err != nil {
		return err
	}
	to, err := headerInt(r.Header, hTo)
	if err != nil {
		return err
	}
	if err := checkBlocks(from, to, l); err != nil {
		return err
	}
	per := max(1, streamChunk/l.BlockSize)
	buf := s.bufs.get(int(per * l.BlockSize))
	defer s.bufs.put(buf)
	h := w.Header()
	h.Set("Trailer", hStatus)
	h.Set("Content-Type", "application/octet-stream")
	h.Set(hSize, strconv.FormatInt(l.Size, 10))
	h.Set(hBlockSize, strconv.FormatInt(l.BlockSize, 10))
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	for b := from; b < to; b += per {
		k := min(per, to-b)
		off := b * l.BlockSize
		end := min(off+k*l.BlockSize, l.Size)
		chunk := (*buf)[:end-off]
		err := ctx.Err()
		if err == nil {
			err = l.Copy.ReadAt(ctx, chunk, off)
		}
		if err != nil {
			code := s.status(ctx, err)
			s.log.Warn("stream failed", "remote", r.RemoteAddr, "id", r.Header.Get(hID), "block", b, "status", code, "err", err)
			h.Set(hStatus, strconv.Itoa(code)+" "+headerSafe(err.Error()))
			return nil
		}
		if err := emit(chunk, k); err != nil {
			return nil // client gone
		}
		if err := rc.Flush(); err != nil {
			return nil
		}
	}
	h.Set(hStatus, "ok")
	return nil
}

// headerSafe makes msg fit in a header value.
func headerSafe(msg string) string {
	msg = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, msg)
	if len(msg) > 512 {
		msg = msg[:512]
	}
	return msg
}
