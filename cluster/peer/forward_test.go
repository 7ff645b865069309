package peer

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// senseErr is a Backend error with a SCSI sense, like scsi.SenseError.
type senseErr struct {
	key, asc, ascq byte
	msg            string
}

func (e *senseErr) Error() string                    { return e.msg }
func (e *senseErr) SCSISense() (key, asc, ascq byte) { return e.key, e.asc, e.ascq }

// memBackend is an in-memory Backend. It checks the range like a LU
// (ILLEGAL REQUEST, LBA OUT OF RANGE).
type memBackend struct {
	mu      sync.Mutex
	data    []byte
	calls   int
	fuas    int
	flushes int
	unmaps  int
	fail    error // every call fails with it when set
	stall   bool  // every call blocks until its ctx ends
	entered chan struct{}
	aborted atomic.Int64 // stalled calls that saw their ctx end
	// log records, per 4 KiB slot, the first 8 bytes of every write
	// applied there, in order.
	log map[int64][]uint64
}

func newMemBackend(size int64) *memBackend {
	return &memBackend{data: make([]byte, size), entered: make(chan struct{}, 1), log: map[int64][]uint64{}}
}

func (m *memBackend) enter(ctx context.Context, off, n int64) error {
	m.mu.Lock()
	m.calls++
	fail, stall := m.fail, m.stall
	size := int64(len(m.data))
	m.mu.Unlock()
	if stall {
		select {
		case m.entered <- struct{}{}:
		default:
		}
		<-ctx.Done()
		m.aborted.Add(1)
		return ctx.Err()
	}
	if fail != nil {
		return fail
	}
	if off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("lu: %d bytes at %d: %w", n, off, &senseErr{0x5, 0x21, 0x00, "lba out of range"})
	}
	return nil
}

func (m *memBackend) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := m.enter(ctx, off, int64(len(p))); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(p, m.data[off:])
	return nil
}

func (m *memBackend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := m.enter(ctx, off, int64(len(p))); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], p)
	if fua {
		m.fuas++
	}
	if len(p) == 4096 && m.log != nil {
		m.log[off] = append(m.log[off], binary.LittleEndian.Uint64(p))
	}
	return nil
}

func (m *memBackend) Flush(ctx context.Context) error {
	if err := m.enter(ctx, 0, 0); err != nil {
		return err
	}
	m.mu.Lock()
	m.flushes++
	m.mu.Unlock()
	return nil
}

func (m *memBackend) Unmap(ctx context.Context, off, n int64) error {
	if err := m.enter(ctx, off, n); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+n])
	m.unmaps++
	return nil
}

func (m *memBackend) set(fn func(m *memBackend)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	fn(m)
}

func (m *memBackend) ncalls() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.calls
}

// testVolumes is a Volumes over memBackends.
type testVolumes struct {
	mu   sync.Mutex
	vols map[string]*testVol
}

type testVol struct {
	b        *memBackend
	gen      uint64 // current generation
	notOwner bool
}

func newVolumes() *testVolumes { return &testVolumes{vols: map[string]*testVol{}} }

func (v *testVolumes) Volume(ctx context.Context, ref Ref) (Backend, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	tv, ok := v.vols[ref.ID]
	switch {
	case !ok:
		return nil, fmt.Errorf("image %s: %w", ref.ID, ErrUnknownImage)
	case tv.notOwner:
		return nil, fmt.Errorf("image %s owned elsewhere: %w", ref.ID, ErrNotOwner)
	case ref.Gen < tv.gen:
		return nil, fmt.Errorf("image %s generation %d < %d: %w", ref.ID, ref.Gen, tv.gen, ErrStaleGeneration)
	}
	return tv.b, nil
}

func (v *testVolumes) add(size int64) (Ref, *memBackend) {
	v.mu.Lock()
	defer v.mu.Unlock()
	b := newMemBackend(size)
	id := newID()
	v.vols[id] = &testVol{b: b, gen: 1}
	return Ref{ID: id, Gen: 1}, b
}

func (v *testVolumes) update(id string, fn func(*testVol)) {
	v.mu.Lock()
	defer v.mu.Unlock()
	fn(v.vols[id])
}

// startOwner serves vols (and an empty Store) on 127.0.0.1.
func startOwner(t testing.TB, vols Volumes, cfg ServerConfig) (*Server, string) {
	cfg.Volumes = vols
	return startServer(t, newStore(), cfg)
}

func TestForwardRoundTrip(t *testing.T) {
	ctx := context.Background()
	vols := newVolumes()
	const size = 8 << 20
	ref, mb := vols.add(size)
	s, addr := startOwner(t, vols, ServerConfig{})
	c := newClient(t, addr, ClientConfig{})

	data := randBytes(1 << 20)
	if err := c.ForwardWrite(ctx, ref, data, 4096, false); err != nil {
		t.Fatal(err)
	}
	tail := randBytes(4096)
	if err := c.ForwardWrite(ctx, ref, tail, size-4096, true); err != nil {
		t.Fatal(err)
	}
	if err := c.ForwardFlush(ctx, ref); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1<<20)
	if err := c.ForwardRead(ctx, ref, got, 4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("read back differs")
	}
	if err := c.ForwardRead(ctx, ref, got[:4096], size-4096); err != nil || !bytes.Equal(got[:4096], tail) {
		t.Fatalf("tail: %v", err)
	}
	mb.set(func(m *memBackend) {
		if !bytes.Equal(m.data[4096:4096+len(data)], data) {
			t.Error("backend does not hold the forwarded write")
		}
		if m.fuas != 1 || m.flushes != 1 {
			t.Errorf("fua %d flushes %d, want 1 1", m.fuas, m.flushes)
		}
	})
	// Unmap, larger than MaxIO: no length cap.
	big := int64(size - 4096)
	if err := c.ForwardUnmap(ctx, ref, 0, big); err != nil {
		t.Fatal(err)
	}
	if err := c.ForwardRead(ctx, ref, got, 4096); err != nil || !bytes.Equal(got, make([]byte, len(got))) {
		t.Fatalf("after unmap: %v", err)
	}
	if err := c.ForwardRead(ctx, ref, got[:4096], size-4096); err != nil || !bytes.Equal(got[:4096], tail) {
		t.Fatalf("unmap went too far: %v", err)
	}
	// A largest-size I/O.
	maxBuf := randBytes(MaxIO)
	vref, _ := vols.add(MaxIO)
	if err := c.ForwardWrite(ctx, vref, maxBuf, 0, false); err != nil {
		t.Fatal(err)
	}
	back := make([]byte, MaxIO)
	if err := c.ForwardRead(ctx, vref, back, 0); err != nil || !bytes.Equal(back, maxBuf) {
		t.Fatalf("MaxIO round trip: %v", err)
	}
	// Zero-length I/O is a no-op that never reaches the owner.
	n := mb.ncalls()
	if err := c.ForwardWrite(ctx, ref, nil, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := c.ForwardRead(ctx, ref, nil, 0); err != nil {
		t.Fatal(err)
	}
	if mb.ncalls() != n {
		t.Fatal("zero-length I/O reached the backend")
	}
	// Forwarding does not move the copy counters.
	if st := s.Stats(); st.BytesIn != 0 || st.BytesOut != 0 {
		t.Errorf("copy stats moved: %+v", st)
	}
}

func TestForwardErrors(t *testing.T) {
	ctx := context.Background()
	vols := newVolumes()
	const size = 1 << 20
	ref, mb := vols.add(size)
	_, addr := startOwner(t, vols, ServerConfig{})
	c := newClient(t, addr, ClientConfig{})
	buf := randBytes(4096)

	// Unknown image.
	other := Ref{ID: newID(), Gen: 1}
	wantErr(t, c.ForwardRead(ctx, other, buf, 0), ErrUnknownImage)
	wantErr(t, c.ForwardWrite(ctx, other, buf, 0, false), ErrUnknownImage)
	wantErr(t, c.ForwardFlush(ctx, other), ErrUnknownImage)
	wantErr(t, c.ForwardUnmap(ctx, other, 0, 4096), ErrUnknownImage)

	// Stale generation.
	vols.update(ref.ID, func(v *testVol) { v.gen = 3 })
	wantErr(t, c.ForwardWrite(ctx, ref, buf, 0, false), ErrStaleGeneration)
	wantErr(t, c.ForwardRead(ctx, ref, buf, 0), ErrStaleGeneration)
	wantErr(t, c.ForwardFlush(ctx, Ref{ID: ref.ID, Gen: 2}), ErrStaleGeneration)
	wantErr(t, c.ForwardUnmap(ctx, Ref{ID: ref.ID, Gen: 2}, 0, 4096), ErrStaleGeneration)
	ref.Gen = 3
	if err := c.ForwardWrite(ctx, ref, buf, 0, false); err != nil {
		t.Fatal(err)
	}

	// Not the owner (any more).
	vols.update(ref.ID, func(v *testVol) { v.notOwner = true })
	wantErr(t, c.ForwardWrite(ctx, ref, make([]byte, 4096), 0, false), ErrNotOwner)
	wantErr(t, c.ForwardRead(ctx, ref, make([]byte, 4096), 0), ErrNotOwner)
	wantErr(t, c.ForwardFlush(ctx, ref), ErrNotOwner)
	wantErr(t, c.ForwardUnmap(ctx, ref, 0, 4096), ErrNotOwner)
	vols.update(ref.ID, func(v *testVol) { v.notOwner = false })
	got := make([]byte, 4096)
	if err := c.ForwardRead(ctx, ref, got, 0); err != nil || !bytes.Equal(got, buf) {
		t.Fatalf("refused requests changed the image: %v", err)
	}

	// A sense crosses the hop intact: the owner's range check...
	err := c.ForwardRead(ctx, ref, got, size)
	checkSense(t, "read beyond end", err, 0x5, 0x21, 0x00, "lba out of range")
	err = c.ForwardUnmap(ctx, ref, size-4096, 8192)
	checkSense(t, "unmap beyond end", err, 0x5, 0x21, 0x00, "lba out of range")
	// ... and a failed write: MEDIUM ERROR, WRITE ERROR (min_copies not met).
	mb.set(func(m *memBackend) {
		m.fail = fmt.Errorf("volume: %w", &senseErr{0x3, 0x0c, 0x00, "1 of 2 copies written, min_copies 2"})
	})
	for name, err := range map[string]error{
		"write": c.ForwardWrite(ctx, ref, randBytes(4096), 0, true),
		"read":  c.ForwardRead(ctx, ref, got, 0),
		"flush": c.ForwardFlush(ctx, ref),
		"unmap": c.ForwardUnmap(ctx, ref, 0, 4096),
	} {
		checkSense(t, name, err, 0x3, 0x0c, 0x00, "min_copies 2")
	}
	// An error without a sense stays an error (500 with the message),
	// not a ForwardedError, never a success.
	mb.set(func(m *memBackend) { m.fail = errors.New("disk on fire") })
	err = c.ForwardWrite(ctx, ref, randBytes(4096), 0, false)
	var fe *ForwardedError
	if err == nil || errors.As(err, &fe) || errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "disk on fire") {
		t.Fatalf("plain owner error: %v", err)
	}
	// A backend reporting ErrNotOwner mid-way (ownership moved) maps too.
	mb.set(func(m *memBackend) { m.fail = fmt.Errorf("fenced: %w", ErrNotOwner) })
	wantErr(t, c.ForwardWrite(ctx, ref, randBytes(4096), 0, false), ErrNotOwner)
	mb.set(func(m *memBackend) { m.fail = nil })

	// A node that serves no Volumes: not "unknown image", unavailable.
	_, addr2 := startServer(t, newStore(), ServerConfig{})
	c2 := newClient(t, addr2, ClientConfig{})
	err = c2.ForwardWrite(ctx, ref, buf, 0, false)
	if !errors.Is(err, ErrUnavailable) || errors.Is(err, ErrUnknownImage) || !strings.Contains(err.Error(), "not serve forwarded") {
		t.Fatalf("no forwarding: %v", err)
	}
	wantErr(t, c2.ForwardRead(ctx, ref, buf, 0), ErrUnavailable)

	// The copy endpoints are unchanged on a forwarding server.
	wantErr(t, c.ReadAt(ctx, ref, buf, 0), ErrNoCopy)
}

func checkSense(t *testing.T, name string, err error, key, asc, ascq byte, msg string) {
	t.Helper()
	var fe *ForwardedError
	if !errors.As(err, &fe) {
		t.Fatalf("%s: %v (%T), want a ForwardedError", name, err, err)
	}
	var sc SenseCarrier
	if !errors.As(err, &sc) {
		t.Fatalf("%s: not a SenseCarrier", name)
	}
	if k, a, q := sc.SCSISense(); k != key || a != asc || q != ascq {
		t.Fatalf("%s: sense %x/%02x/%02x, want %x/%02x/%02x", name, k, a, q, key, asc, ascq)
	}
	if !strings.Contains(fe.Msg, msg) {
		t.Fatalf("%s: message %q lacks %q", name, fe.Msg, msg)
	}
	if errors.Is(err, ErrUnavailable) || errors.Is(err, ErrBadRequest) {
		t.Fatalf("%s: %v wraps a transport sentinel", name, err)
	}
}

func TestForwardRefused(t *testing.T) {
	ctx := context.Background()
	vols := newVolumes()
	const size = 4 << 20
	ref, mb := vols.add(size)
	_, addr := startOwner(t, vols, ServerConfig{})
	c := newClient(t, addr, ClientConfig{})
	buf := make([]byte, 4096)

	for _, tc := range []struct {
		name string
		err  error
	}{
		{"unaligned offset read", c.ForwardRead(ctx, ref, buf, 100)},
		{"unaligned offset write", c.ForwardWrite(ctx, ref, buf, 100, false)},
		{"unaligned length read", c.ForwardRead(ctx, ref, buf[:1000], 0)},
		{"unaligned length write", c.ForwardWrite(ctx, ref, buf[:1000], 0, false)},
		{"negative offset", c.ForwardRead(ctx, ref, buf, -4096)},
		{"unmap unaligned", c.ForwardUnmap(ctx, ref, 1, 4096)},
		{"unmap unaligned length", c.ForwardUnmap(ctx, ref, 0, 4095)},
		{"unmap zero", c.ForwardUnmap(ctx, ref, 0, 0)},
		{"unmap overflow", c.ForwardUnmap(ctx, ref, 1<<62, 1<<62)},
		{"oversized read", c.ForwardRead(ctx, ref, make([]byte, MaxIO+512), 0)},
		{"oversized write", c.ForwardWrite(ctx, ref, make([]byte, MaxIO+512), 0, false)},
		{"bad id", c.ForwardFlush(ctx, Ref{ID: "xyz", Gen: 1})},
	} {
		if !errors.Is(tc.err, ErrBadRequest) {
			t.Errorf("%s: %v, want ErrBadRequest", tc.name, tc.err)
		}
	}

	rb := dialRawBlk(t, addr)
	good := reqHdr{op: opFwdRead, id: ref.ID, gen: 1, n: 4096}
	with := func(f func(h *reqHdr)) reqHdr { h := good; f(&h); return h }
	for i, tc := range []struct {
		name  string
		parts [][]byte
	}{
		{"oversized read length", [][]byte{with(func(h *reqHdr) { h.n = 1 << 30 }).bytes()}},
		{"zero length", [][]byte{with(func(h *reqHdr) { h.n = 0 }).bytes()}},
		{"unaligned length at the top", [][]byte{with(func(h *reqHdr) { h.op, h.n = opFwdUnmap, 1<<63-1 }).bytes()}},
		{"flush with an offset", [][]byte{with(func(h *reqHdr) { h.op, h.off, h.n = opFwdFlush, 4096, 0 }).bytes()}},
		{"fua on an unmap", [][]byte{with(func(h *reqHdr) { h.op, h.flags = opFwdUnmap, flagFUA }).bytes()}},
		{"unaligned write", [][]byte{with(func(h *reqHdr) { h.op, h.n = opFwdWrite, 1000 }).bytes(), make([]byte, 1000)}},
	} {
		rb.refused(tc.name, uint32(100+i), rflagForward, tc.parts...)
	}
	// A write cut short is never applied.
	rb2 := dialRawBlk(t, addr)
	rb2.send(with(func(h *reqHdr) { h.op, h.n = opFwdWrite, 8192 }).bytes(), make([]byte, 4096))
	rb2.nc.(*net.TCPConn).CloseWrite()
	if !rb2.closed() {
		t.Error("write cut short: connection not ended")
	}
	if n := mb.ncalls(); n != 0 {
		t.Fatalf("refused requests reached the backend %d times", n)
	}
	// A well-formed hand-made request goes through.
	rb.send(reqHdr{op: opFwdFlush, id: ref.ID, gen: 1, tag: 9}.bytes())
	if h, msg, err := rb.recv(); err != nil || h.code != codeOK || h.tag != 9 {
		t.Fatalf("flush: %+v %q %v", h, msg, err)
	}
}

// TestForwardConcurrent runs 64 writers on one connection, each writing
// versions 1..n in order to its own 4 KiB slot and reading each back.
func TestForwardConcurrent(t *testing.T) {
	ctx := context.Background()
	vols := newVolumes()
	const writers, versions = 64, 20
	ref, mb := vols.add(writers * 4096)
	s, addr := startOwner(t, vols, ServerConfig{})
	c := newClient(t, addr, ClientConfig{})
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for g := 0; g < writers; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			off := int64(g) * 4096
			buf := make([]byte, 4096)
			got := make([]byte, 4096)
			for v := uint64(1); v <= versions; v++ {
				binary.LittleEndian.PutUint64(buf, v)
				binary.LittleEndian.PutUint64(buf[4088:], uint64(g))
				if err := c.ForwardWrite(ctx, ref, buf, off, v%5 == 0); err != nil {
					errs <- err
					return
				}
				if err := c.ForwardRead(ctx, ref, got, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, buf) {
					errs <- fmt.Errorf("slot %d: read version %d after writing %d", g, binary.LittleEndian.Uint64(got), v)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	mb.set(func(m *memBackend) {
		for g := int64(0); g < writers; g++ {
			l := m.log[g*4096]
			if len(l) != versions {
				t.Fatalf("slot %d: %d writes applied, want %d", g, len(l), versions)
			}
			for i, v := range l {
				if v != uint64(i+1) {
					t.Fatalf("slot %d: applied order %v", g, l)
				}
			}
		}
	})
	if n := s.accepted.Load(); n != 1 {
		t.Fatalf("%d connections, want 1", n)
	}
}

func TestForwardStalled(t *testing.T) {
	ctx := context.Background()
	vols := newVolumes()
	ref, mb := vols.add(1 << 20)
	mb.set(func(m *memBackend) { m.stall = true })
	_, addr := startOwner(t, vols, ServerConfig{})
	const timeout = 300 * time.Millisecond
	c := newClient(t, addr, ClientConfig{Timeout: timeout})
	for name, call := range map[string]func() error{
		"write": func() error { return c.ForwardWrite(ctx, ref, randBytes(4096), 0, true) },
		"read":  func() error { return c.ForwardRead(ctx, ref, make([]byte, 4096), 0) },
		"flush": func() error { return c.ForwardFlush(ctx, ref) },
		"unmap": func() error { return c.ForwardUnmap(ctx, ref, 0, 4096) },
	} {
		t0 := time.Now()
		err := call()
		d := time.Since(t0)
		if !errors.Is(err, ErrUnavailable) || d < timeout || d > timeout+time.Second {
			t.Fatalf("stalled %s: %v after %v", name, err, d)
		}
	}
	// The owner saw the requests abandoned.
	deadline := time.Now().Add(5 * time.Second)
	for mb.aborted.Load() < 4 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := mb.aborted.Load(); n != 4 {
		t.Fatalf("%d backend calls cancelled, want 4", n)
	}
	// The caller's own deadline is its error, not ErrUnavailable.
	cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	err := c.ForwardWrite(cctx, ref, randBytes(4096), 0, false)
	if errors.Is(err, ErrUnavailable) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("caller deadline: %v", err)
	}
	// The connection survives.
	mb.set(func(m *memBackend) { m.stall = false })
	if err := c.ForwardWrite(ctx, ref, randBytes(4096), 0, false); err != nil {
		t.Fatal(err)
	}
}

// BenchmarkForward measures forwarded I/O over a real 127.0.0.1
// connection to an in-memory backend: the cost of the hop itself.
func BenchmarkForward(b *testing.B) {
	const imgSize = 64 << 20
	vols := newVolumes()
	ref, mb := vols.add(imgSize)
	mb.set(func(m *memBackend) { m.log = nil })
	_, addr := startOwner(b, vols, ServerConfig{})
	c := newClient(b, addr, ClientConfig{})
	for _, tc := range []struct {
		size, qd int
	}{{4 << 10, 1}, {4 << 10, 16}, {1 << 20, 1}} {
		for _, op := range []string{"write", "read"} {
			name := fmt.Sprintf("%s/%dK/qd%d", op, tc.size>>10, tc.qd)
			b.Run(name, func(b *testing.B) {
				benchForward(b, c, ref, op == "write", tc.size, tc.qd, imgSize)
			})
		}
	}
}

func benchForward(b *testing.B, c *Client, ref Ref, write bool, size, qd int, imgSize int64) {
	ctx := context.Background()
	b.SetBytes(int64(size))
	slots := imgSize / int64(size)
	var next atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Value
	b.ResetTimer()
	for g := 0; g < qd; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := randBytes(size)
			for {
				i := next.Add(1) - 1
				if i >= int64(b.N) {
					return
				}
				off := (i * 7919 % slots) * int64(size)
				var err error
				if write {
					err = c.ForwardWrite(ctx, ref, buf, off, false)
				} else {
					err = c.ForwardRead(ctx, ref, buf, off)
				}
				if err != nil {
					failed.Store(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if err, _ := failed.Load().(error); err != nil {
		b.Fatal(err)
	}
}
