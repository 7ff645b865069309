package peer

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// ClientConfig configures a Client.
type ClientConfig struct {
	// TLS, when set, makes the client speak HTTP/2 over TLS; nil means
	// cleartext HTTP/2 (h2c).
	TLS *tls.Config
	// Timeout bounds each request (default 10s); for the streamed calls
	// (ReadRange, Checksums) it bounds the wait for each block.
	Timeout time.Duration
	// Logger; nil discards.
	Logger *slog.Logger
}

const (
	defaultTimeout = 10 * time.Second
	// rttMaxBytes: requests moving more data than this do not feed RTT.
	rttMaxBytes = 64 << 10
	maxErrBody  = 1 << 10
)

var (
	errTimeout = errors.New("timed out")
	errClosed  = errors.New("client closed")
)

// Client talks to one peer. It is safe for concurrent use; all its
// requests share one multiplexed connection.
type Client struct {
	addr    string
	base    string
	timeout time.Duration
	log     *slog.Logger
	tr      *http.Transport
	hc      *http.Client
	bufs    pool
	rtt     atomic.Int64 // ns, EWMA
	stats   clientStats
	closed  atomic.Bool

	tls    *tls.Config // block connections' (ALPN blkALPN); nil: cleartext
	dialMu sync.Mutex
	dial   *dialing // under dialMu: the dial in progress
	cur    atomic.Pointer[blkConn]
}

// NewClient returns a client for the peer at addr (host:port). It does
// not connect until the first request.
func NewClient(addr string, cfg ClientConfig) *Client {
	if cfg.Timeout <= 0 {
		cfg.Timeout = defaultTimeout
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Client{
		addr:    addr,
		base:    "http://" + addr,
		timeout: cfg.Timeout,
		log:     log.With("component", "peer.client", "peer", addr),
	}
	d := &net.Dialer{Timeout: cfg.Timeout, KeepAlive: 30 * time.Second}
	c.tr = &http.Transport{
		Protocols:          protocols(cfg.TLS),
		HTTP2:              h2config(cfg.Timeout),
		DialContext:        d.DialContext,
		DisableCompression: true,
		MaxConnsPerHost:    1,
		IdleConnTimeout:    10 * time.Minute,
	}
	if cfg.TLS != nil {
		tc := cfg.TLS.Clone()
		tc.NextProtos = []string{"h2"}
		c.tr.TLSClientConfig = tc
		c.tr.ForceAttemptHTTP2 = true
		c.base = "https://" + addr
		c.tls = cfg.TLS.Clone()
		c.tls.NextProtos = []string{blkALPN}
		if c.tls.ServerName == "" {
			if host, _, err := net.SplitHostPort(addr); err == nil {
				c.tls.ServerName = host // as the HTTP transport does
			}
		}
	}
	c.hc = &http.Client{
		Transport: c.tr,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
	return c
}

// Addr is the peer address.
func (c *Client) Addr() string { return c.addr }

// Close drops the client's idle connection; later calls fail with
// ErrUnavailable.
func (c *Client) Close() error {
	c.closed.Store(true)
	c.tr.CloseIdleConnections()
	c.dialMu.Lock()
	bc := c.cur.Load()
	c.dialMu.Unlock()
	if bc != nil {
		bc.fail(errClosed)
	}
	return nil
}

// RTT is the smoothed latency of recent small requests (EWMA), 0 when
// unknown.
func (c *Client) RTT() time.Duration { return time.Duration(c.rtt.Load()) }

// clientStats are a client's counters since it was made.
type clientStats struct {
	requests, errors, sent, recv atomic.Int64
}

// ClientStats is what a client did since it was made: block requests
// (reads, writes, forwards, pings, ...) and those that failed, and block
// data sent and received (streamed sync reads included).
type ClientStats struct {
	Requests, Errors int64
	SentBytes        int64
	RecvBytes        int64
}

// Stats returns the client's counters.
func (c *Client) Stats() ClientStats {
	return ClientStats{
		Requests: c.stats.requests.Load(), Errors: c.stats.errors.Load(),
		SentBytes: c.stats.sent.Load(), RecvBytes: c.stats.recv.Load(),
	}
}

func (c *Client) sample(d time.Duration) {
	for {
		old := c.rtt.Load()
		nv := int64(d)
		if old != 0 {
			nv = old + (int64(d)-old)/8
		}
		if nv <= 0 {
			nv = 1
		}
		if c.rtt.CompareAndSwap(old, nv) {
			return
		}
	}
}

// call is one streamed HTTP/2 request: its context, whose timeout is
// re-armed for each block, and error mapping.
type call struct {
	c      *Client
	op     string
	parent context.Context
	ctx    context.Context
	cancel context.CancelCauseFunc
	timer  *time.Timer
}

func (c *Client) begin(ctx context.Context, op string) *call {
	k := &call{c: c, op: op, parent: ctx}
	k.ctx, k.cancel = context.WithCancelCause(ctx)
	k.timer = time.AfterFunc(c.timeout, func() { k.cancel(errTimeout) })
	return k
}

func (k *call) rearm()  { k.timer.Reset(k.c.timeout) }
func (k *call) pause()  { k.timer.Stop() }
func (k *call) finish() { k.timer.Stop(); k.cancel(nil) }

// fail maps a transport-level failure.
func (k *call) fail(err error) error {
	k.c.log.Debug("request failed", "op", k.op, "err", err)
	if errors.Is(context.Cause(k.ctx), errTimeout) {
		return fmt.Errorf("peer %s: %s: %w: timed out after %v", k.c.addr, k.op, ErrUnavailable, k.c.timeout)
	}
	if perr := k.parent.Err(); perr != nil {
		return fmt.Errorf("peer %s: %s: %w", k.c.addr, k.op, context.Cause(k.parent))
	}
	return fmt.Errorf("peer %s: %s: %w: %v", k.c.addr, k.op, ErrUnavailable, err)
}

// statusErr maps an error status (or a trailer status) and its message.
func (k *call) statusErr(code int, msg string) error {
	return codeErr(k.c.addr, k.op, code, strings.TrimSpace(msg))
}

func (c *Client) checkIO(op string, n int) error {
	if n > MaxIO {
		return fmt.Errorf("peer %s: %s: %w: length %d above %d", c.addr, op, ErrBadRequest, n, MaxIO)
	}
	return nil
}

// ReadAt reads len(p) bytes at off of the peer's copy into p.
func (c *Client) ReadAt(ctx context.Context, ref Ref, p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	if err := c.checkIO("read", len(p)); err != nil {
		return err
	}
	return c.roundTrip(ctx, reqHdr{op: opRead, id: ref.ID, gen: ref.Gen, off: off, n: int64(len(p))}, nil, p)
}

// WriteAt writes p at off on the peer's copy; with durable it is on the
// peer's stable storage when WriteAt returns nil.
func (c *Client) WriteAt(ctx context.Context, ref Ref, p []byte, off int64, durable bool) error {
	if len(p) == 0 {
		return nil
	}
	if err := c.checkIO("write", len(p)); err != nil {
		return err
	}
	h := reqHdr{op: opWrite, id: ref.ID, gen: ref.Gen, epoch: ref.Epoch, off: off, n: int64(len(p))}
	if durable {
		h.flags = flagFUA
	}
	return c.roundTrip(ctx, h, p, nil)
}

// Sync makes every completed write on the peer's copy durable.
func (c *Client) Sync(ctx context.Context, ref Ref) error {
	return c.roundTrip(ctx, reqHdr{op: opSync, id: ref.ID, gen: ref.Gen}, nil, nil)
}

// Unmap deallocates [off, off+n) on the peer's copy.
func (c *Client) Unmap(ctx context.Context, ref Ref, off, n int64) error {
	return c.roundTrip(ctx, reqHdr{op: opUnmap, id: ref.ID, gen: ref.Gen, epoch: ref.Epoch, off: off, n: n}, nil, nil)
}

// Fence makes the peer's copy refuse writes and unmaps older than
// (ref.Gen, ref.Epoch) from now on; it returns once those it already
// accepted are applied.
func (c *Client) Fence(ctx context.Context, ref Ref) error {
	return c.roundTrip(ctx, reqHdr{op: opFence, id: ref.ID, gen: ref.Gen, epoch: ref.Epoch}, nil, nil)
}

// pingID fills the image id field of a ping.
const pingID = "00000000000000000000000000000000"

// Ping measures one round trip to the peer on the block connection (and
// feeds RTT).
func (c *Client) Ping(ctx context.Context) (time.Duration, error) {
	start := time.Now()
	if err := c.roundTrip(ctx, reqHdr{op: opPing, id: pingID}, nil, nil); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

// get sends a GET of path for ref and returns the response if its status
// is want. The caller closes the body and calls k.finish.
func (k *call) get(path string, ref Ref, hdr [][2]string, want int) (*http.Response, error) {
	if k.c.closed.Load() {
		return nil, fmt.Errorf("peer %s: %s: %w: %v", k.c.addr, k.op, ErrUnavailable, errClosed)
	}
	if !validID(ref.ID) {
		return nil, fmt.Errorf("peer %s: %s: %w: image id %q is not 32 hex digits", k.c.addr, k.op, ErrBadRequest, ref.ID)
	}
	req, err := http.NewRequestWithContext(k.ctx, http.MethodGet, k.c.base+path, nil)
	if err != nil {
		return nil, fmt.Errorf("peer %s: %s: %w", k.c.addr, k.op, err)
	}
	h := req.Header
	h[hID] = []string{ref.ID}
	h[hGen] = []string{strconv.FormatUint(ref.Gen, 10)}
	for _, kv := range hdr {
		h[kv[0]] = []string{kv[1]}
	}
	resp, err := k.c.hc.Do(req)
	if err != nil {
		return nil, k.fail(err)
	}
	if resp.StatusCode != want {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrBody))
		resp.Body.Close()
		return nil, k.statusErr(resp.StatusCode, string(msg))
	}
	return resp, nil
}

// stream is a streamed block-range response being read.
type stream struct {
	k     *call
	resp  *http.Response
	size  int64
	bs    int64
	from  int64
	to    int64
	probe [1]byte
}

func (c *Client) openStream(k *call, path string, ref Ref, from, to int64) (*stream, error) {
	if from < 0 || to <= from {
		return nil, fmt.Errorf("peer %s: %s: %w: blocks [%d,%d)", c.addr, k.op, ErrBadRequest, from, to)
	}
	hdr := [][2]string{{hFrom, strconv.FormatInt(from, 10)}, {hTo, strconv.FormatInt(to, 10)}}
	resp, err := k.get(path, ref, hdr, http.StatusOK)
	if err != nil {
		return nil, err
	}
	s := &stream{k: k, resp: resp, from: from, to: to}
	s.size, err = headerInt(resp.Header, hSize)
	if err == nil {
		s.bs, err = headerInt(resp.Header, hBlockSize)
	}
	if err == nil && (s.size <= 0 || s.bs < Align || s.bs > maxBlockSize || to > (s.size+s.bs-1)/s.bs) {
		err = fmt.Errorf("geometry size %d block size %d does not hold blocks [%d,%d)", s.size, s.bs, from, to)
	}
	if err != nil {
		resp.Body.Close()
		return nil, fmt.Errorf("peer %s: %s: %w: bad response: %v", c.addr, k.op, ErrUnavailable, err)
	}
	return s, nil
}

// full reads len(p) bytes of the body with the per-block timeout armed.
func (s *stream) full(p []byte) error {
	s.k.rearm()
	_, err := io.ReadFull(s.resp.Body, p)
	s.k.pause()
	if err == nil {
		return nil
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		// The stream ended early: the trailer may say why.
		if terr := s.trailerErr(); terr != nil {
			return terr
		}
		return fmt.Errorf("peer %s: %s: %w: truncated response", s.k.c.addr, s.k.op, ErrUnavailable)
	}
	return s.k.fail(err)
}

// end checks the stream ends here with the "ok" trailer.
func (s *stream) end() error {
	s.k.rearm()
	n, err := io.ReadFull(s.resp.Body, s.probe[:])
	if n != 0 {
		return fmt.Errorf("peer %s: %s: %w: response longer than announced", s.k.c.addr, s.k.op, ErrUnavailable)
	}
	if !errors.Is(err, io.EOF) {
		return s.k.fail(err)
	}
	if err := s.trailerErr(); err != nil {
		return err
	}
	if s.resp.Trailer.Get(hStatus) != "ok" {
		return fmt.Errorf("peer %s: %s: %w: response without status trailer", s.k.c.addr, s.k.op, ErrUnavailable)
	}
	return nil
}

func (s *stream) trailerErr() error {
	v := s.resp.Trailer.Get(hStatus)
	if v == "" || v == "ok" {
		return nil
	}
	code, msg, _ := strings.Cut(v, " ")
	n, err := strconv.Atoi(code)
	if err != nil {
		return fmt.Errorf("peer %s: %s: %w: bad status trailer %q", s.k.c.addr, s.k.op, ErrUnavailable, v)
	}
	return s.k.statusErr(n, msg)
}

// Checksums returns the SHA-256 of each block in [from, to) of the peer's
// copy (the last block of the image: its real length; holes hash like
// zeros).
func (c *Client) Checksums(ctx context.Context, ref Ref, from, to int64) ([]Sum, error) {
	k := c.begin(ctx, "checksums")
	defer k.finish()
	s, err := c.openStream(k, pathChecksums, ref, from, to)
	if err != nil {
		return nil, err
	}
	defer s.resp.Body.Close()
	sums := make([]Sum, 0, min(to-from, 4096))
	for b := from; b < to; b++ {
		var sum Sum
		if err := s.full(sum[:]); err != nil {
			return nil, err
		}
		sums = append(sums, sum)
	}
	if err := s.end(); err != nil {
		return nil, err
	}
	return sums, nil
}

// ReadRange reads whole blocks [from, to) of the peer's copy in one
// streamed response and calls fn for each block in order (the image's last
// block at its real length). data is valid only during fn. An error from
// fn stops the transfer and is returned as is. The timeout applies to
// each block; time spent in fn does not count.
func (c *Client) ReadRange(ctx context.Context, ref Ref, from, to int64, fn func(block int64, data []byte) error) (err error) {
	c.stats.requests.Add(1)
	defer func() {
		if err != nil {
			c.stats.errors.Add(1)
		}
	}()
	k := c.begin(ctx, "range")
	defer k.finish()
	s, err := c.openStream(k, pathRange, ref, from, to)
	if err != nil {
		return err
	}
	defer s.resp.Body.Close()
	buf := c.bufs.get(int(s.bs))
	defer c.bufs.put(buf)
	for b := from; b < to; b++ {
		data := (*buf)[:blockLen(b, s.size, s.bs)]
		if err := s.full(data); err != nil {
			return err
		}
		c.stats.recv.Add(int64(len(data)))
		if err := fn(b, data); err != nil {
			return err
		}
	}
	return s.end()
}
