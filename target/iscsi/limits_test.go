package iscsi

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"net"
	"regexp"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/target/scsi"
)

// heapInuse is the heap in use after a collection.
func heapInuse() uint64 {
	runtime.GC()
	runtime.GC() // and what sync.Pools kept as victims
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// writeCmd sends a WRITE(10) of edtl bytes with the given immediate data;
// immediate sets the I bit (no CmdSN window slot), final=false announces
// unsolicited Data-Out.
func (c *rawClient) writeCmd(t testing.TB, lba uint32, edtl uint32, data []byte, immediate, final bool) uint32 {
	t.Helper()
	p := &pdu{}
	p.h[0] = opSCSICmd
	if immediate {
		p.h[0] |= flagImmediate
	}
	p.h[1] = 0x01 | flagWrite
	if final {
		p.h[1] |= flagFinal
	}
	itt := c.itt
	c.itt++
	p.h.setU32(offITT, itt)
	p.h.setU32(offEDTL, edtl)
	p.h.setU32(offCmdSN, c.cmdSN)
	if !immediate {
		c.cmdSN++
	}
	p.h.setU32(offExpStat, c.statSN)
	copy(p.h[32:48], write10(lba, uint16(edtl/512)))
	p.data = data
	c.send(t, p)
	return itt
}

// answers reads PDUs until every ITT in want has an R2T or a SCSI
// Response; it returns the SCSI status of each answered command (-1 for
// an R2T) and the R2Ts by ITT.
func (c *rawClient) answers(t testing.TB, want map[uint32]bool) (map[uint32]int, map[uint32]*pdu) {
	t.Helper()
	status := map[uint32]int{}
	r2ts := map[uint32]*pdu{}
	for len(status) < len(want) {
		r := c.recv(t)
		itt := r.h.itt()
		if !want[itt] {
			t.Fatalf("unexpected %v (itt %#x)", r, itt)
		}
		switch r.h.opcode() {
		case opR2T:
			if _, seen := status[itt]; !seen {
				status[itt] = -1
				r2ts[itt] = r
			}
		case opSCSIResp:
			status[itt] = int(r.h[3])
		default:
			t.Fatalf("unexpected %v", r)
		}
	}
	return status, r2ts
}

// 200 immediate 1 MiB WRITEs that never send their data: before the
// write buffer budget each held a 1 MiB buffer (200 MiB); now the
// session holds at most its budget (64 MiB by default) and the excess
// is answered TASK SET FULL at once.
func TestWriteBufferBudget(t *testing.T) {
	s, addr, _ := startServer(t, Config{}, "disk1")
	cl := dialTest(t, addr)
	cl.login(t, iqnPrefix+":disk1", nil)
	cl.clearUA(t)
	before := heapInuse()
	want := map[uint32]bool{}
	for i := range 200 {
		want[cl.writeCmd(t, uint32(i)*2048, 1<<20, make([]byte, 4096), true, true)] = true
	}
	status, _ := cl.answers(t, want)
	after := heapInuse()
	var r2t, full int
	for _, st := range status {
		switch st {
		case -1:
			r2t++
		case scsi.StatusTaskSetFull:
			full++
		default:
			t.Errorf("status %#x", st)
		}
	}
	held := s.writeHeld.Load()
	t.Logf("200 x 1 MiB immediate writes without data: %d solicited, %d TASK SET FULL; budget held %d MiB; heap in use %d -> %d MiB (+%d MiB)",
		r2t, full, held>>20, before>>20, after>>20, (int64(after)-int64(before))>>20)
	if r2t != 64 || full != 136 {
		t.Errorf("%d commands admitted, %d refused; want 64 and 136", r2t, full)
	}
	if held > defaultSessionWriteBuffer {
		t.Errorf("session holds %d bytes of write buffers, over its %d budget", held, defaultSessionWriteBuffer)
	}
	if grew := int64(after) - int64(before); grew > 100<<20 {
		t.Errorf("heap grew by %d MiB", grew>>20)
	}
	cl.nc.Close()
	waitHeld(t, s, 0)
}

func waitHeld(t *testing.T, s *Server, n int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for s.writeHeld.Load() != n && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := s.writeHeld.Load(); got != n {
		t.Fatalf("write buffers held %d, want %d", got, n)
	}
}

// The budget is per session and per server: a session over its own gets
// TASK SET FULL, one that finds the server's exhausted gets BUSY; data
// received and commands ended give the budget back.
func TestWriteBufferBudgetPerServer(t *testing.T) {
	s, addr, _ := startServer(t, Config{MaxTransferLength: 1 << 20, SessionWriteBuffer: 4 << 20, WriteBuffer: 6 << 20}, "disk1")
	a := dialTest(t, addr)
	a.login(t, iqnPrefix+":disk1", nil)
	a.clearUA(t)
	b := dialTest(t, addr)
	b.isid[5] = 0x42
	b.login(t, iqnPrefix+":disk1", nil)
	b.clearUA(t)

	want := map[uint32]bool{}
	for i := range 5 {
		want[a.writeCmd(t, uint32(i)*2048, 1<<20, nil, false, true)] = true
	}
	status, r2ts := a.answers(t, want)
	if n := len(r2ts); n != 4 {
		t.Fatalf("session a: %d admitted, want 4 (%v)", n, status)
	}
	for itt, st := range status {
		if st != -1 && st != scsi.StatusTaskSetFull {
			t.Fatalf("session a itt %#x: status %#x, want TASK SET FULL", itt, st)
		}
	}
	want = map[uint32]bool{}
	for i := range 3 {
		want[b.writeCmd(t, uint32(i)*2048, 1<<20, nil, false, true)] = true
	}
	status, _ = b.answers(t, want)
	var busy int
	for _, st := range status {
		if st == scsi.StatusBusy {
			busy++
		}
	}
	if busy != 1 {
		t.Fatalf("session b: %v, want one BUSY", status)
	}
	// Sending a command's data completes it and frees its share.
	for itt, r := range r2ts {
		for r.h.opcode() == opR2T {
			d := &pdu{}
			d.h[0] = opDataOut
			d.h[1] = flagFinal
			d.h.setU32(offITT, itt)
			d.h.setU32(offTTT, r.h.u32(offTTT))
			d.h.setU32(offBufOff, r.h.u32(offBufOff))
			d.data = make([]byte, r.h.u32(offResidual))
			a.send(t, d)
			r = a.recv(t)
		}
		if r.h.opcode() != opSCSIResp || r.h.itt() != itt || r.h[3] != 0 {
			t.Fatalf("write %#x after its data: %v status %#x", itt, r, r.h[3])
		}
		break
	}
	waitHeld(t, s, 5<<20)
	// A session that goes away gives back everything it held.
	a.nc.Close()
	waitHeld(t, s, 2<<20)
	itt := b.writeCmd(t, 0, 1<<20, nil, false, true)
	if r := b.recv(t); r.h.opcode() != opR2T || r.h.itt() != itt {
		t.Fatalf("after a left: %v status %#x", r, r.h[3])
	}
}

// A command whose Data-Out never comes is not held for ever: after
// DataOutTimeout the connection is dropped (ERL 0: the initiator
// reconnects and retries) and its buffers are given back.
func TestDataOutTimeout(t *testing.T) {
	lb := &logBuf{}
	s, addr, _ := startServer(t, Config{DataOutTimeout: 300 * time.Millisecond, Logger: logTo(lb)}, "disk1")
	cl := dialTest(t, addr)
	cl.login(t, iqnPrefix+":disk1", []KeyValue{{"InitialR2T", "No"}})
	cl.clearUA(t)
	itt := cl.writeCmd(t, 0, 64<<10, make([]byte, 4096), false, true)
	if r := cl.recv(t); r.h.opcode() != opR2T || r.h.itt() != itt {
		t.Fatalf("expected R2T, got %v", r)
	}
	cl.writeCmd(t, 1024, 64<<10, make([]byte, 4096), true, false) // unsolicited data announced, never sent
	if s.writeHeld.Load() == 0 {
		waitHeldNonZero(t, s)
	}
	start := time.Now()
	cl.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := io.Copy(io.Discard, cl.nc)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("connection still open after %v with a write waiting for data", time.Since(start))
	}
	waitHeld(t, s, 0)
	waitSessions(t, s, 0)
	if !strings.Contains(lb.String(), "Data-Out") || !strings.Contains(lb.String(), "127.0.0.1") {
		t.Errorf("drop not logged with the remote address: %s", lb.String())
	}
}

func waitHeldNonZero(t *testing.T, s *Server) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for s.writeHeld.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
}

// Immediate commands take no CmdSN window slot; at most QueueDepth of
// them run at once per connection and the excess gets TASK SET FULL.
func TestImmediateCommandsBounded(t *testing.T) {
	_, addr, tt := startServer(t, Config{QueueDepth: 4}, "disk1")
	cl := dialTest(t, addr)
	cl.login(t, iqnPrefix+":disk1", nil)
	cl.clearUA(t)
	tt.be[iqnPrefix+":disk1"].delay.Store(int64(time.Hour))
	want := map[uint32]bool{}
	for i := range 10 {
		want[cl.writeCmd(t, uint32(i), 512, make([]byte, 512), true, true)] = true
	}
	// Four run (and hang in the backend); six are answered.
	got := map[uint32]int{}
	for len(got) < 6 {
		r := cl.recv(t)
		if r.h.opcode() != opSCSIResp || !want[r.h.itt()] {
			t.Fatalf("unexpected %v", r)
		}
		got[r.h.itt()] = int(r.h[3])
	}
	for itt, st := range got {
		if st != scsi.StatusTaskSetFull {
			t.Errorf("itt %#x: status %#x, want TASK SET FULL", itt, st)
		}
	}
	cl.nop(t, []byte("alive")) // and nothing else was answered
}

// An initiator that sends NOP-Outs and never reads the NOP-Ins: the
// replies queued for it stay bounded (the target stops reading from it
// while ResponseQueue bytes wait) and the connection is dropped, logged
// with the remote address, once nothing drains for WriteTimeout.
func TestResponseQueueBound(t *testing.T) {
	lb := &logBuf{}
	s, addr, _ := startServer(t, Config{ResponseQueue: 1 << 20, WriteTimeout: time.Second, Logger: logTo(lb)}, "disk1")
	cl := dialTest(t, addr)
	cl.login(t, iqnPrefix+":disk1", []KeyValue{{"MaxRecvDataSegmentLength", "262144"}})
	cl.nc.(*net.TCPConn).SetReadBuffer(4096)
	before := heapInuse()
	// 100 MiB of 256 KiB NOP-Outs, none of the answers read.
	var sent atomic.Int64
	flooded := make(chan struct{})
	start := time.Now()
	go func() {
		defer close(flooded)
		data := make([]byte, 256<<10)
		for i := range 400 {
			p := &pdu{}
			p.h[0] = opNopOut | flagImmediate
			p.h[1] = flagFinal
			p.h.setU32(offITT, uint32(i+10))
			p.h.setU32(offTTT, reservedTag)
			p.h.setU32(offCmdSN, cl.cmdSN)
			p.data = data
			cl.nc.SetWriteDeadline(time.Now().Add(15 * time.Second))
			if _, err := cl.nc.Write(p.marshal(false, false)); err != nil {
				return
			}
			sent.Add(int64(len(data)))
		}
	}()
	// Sample what the target holds meanwhile: queued answers and live heap.
	var peakQueue int64
	var peakHeap uint64
	for done := false; !done; {
		select {
		case <-flooded:
			done = true
		case <-time.After(20 * time.Millisecond):
		}
		s.mu.Lock()
		for c := range s.conns {
			peakQueue = max(peakQueue, c.wqBytes.Load())
		}
		s.mu.Unlock()
		peakHeap = max(peakHeap, heapInuse())
	}
	grew := int64(peakHeap) - int64(before)
	t.Logf("%d MiB of NOP-Outs sent in %v, none of the answers read; peak queued answers %d KiB, live heap peak +%d MiB",
		sent.Load()>>20, time.Since(start).Round(time.Millisecond), peakQueue>>10, grew>>20)
	if sent.Load() == 400*256<<10 {
		t.Error("the target took every NOP-Out while none of its answers was read")
	}
	if peakQueue > 1<<20+(256<<10+128) {
		t.Errorf("%d bytes of answers queued, over the 1 MiB bound plus one answer", peakQueue)
	}
	if grew > 32<<20 {
		t.Errorf("live heap grew by %d MiB with 1 MiB of queued answers allowed", grew>>20)
	}
	if !regexp.MustCompile(`remote=127\.0\.0\.1:\d+ .*(stopped reading|does not read its responses)`).MatchString(lb.String()) {
		t.Errorf("drop not logged with the remote address: %s", lb.String())
	}
}

// Connections are capped per portal and per source address; one over a
// cap is closed at once, before any login.
func TestConnectionLimits(t *testing.T) {
	lb := &logBuf{}
	s, addr, _ := startServer(t, Config{MaxConnections: 3, MaxConnectionsPerAddress: 2, LoginTimeout: time.Minute, Logger: logTo(lb)}, "disk1")
	dialFrom := func(src string) net.Conn {
		t.Helper()
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
		nc, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { nc.Close() })
		return nc
	}
	closedAtOnce := func(nc net.Conn) bool {
		nc.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, err := nc.Read(make([]byte, 1))
		var ne net.Error
		return !(errors.As(err, &ne) && ne.Timeout())
	}
	waitConns := func(n int) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for s.connCount() != n && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if got := s.connCount(); got != n {
			t.Fatalf("%d connections, want %d", got, n)
		}
	}
	a1 := dialFrom("127.0.0.1")
	dialFrom("127.0.0.1")
	waitConns(2)
	if !closedAtOnce(dialFrom("127.0.0.1")) {
		t.Fatal("third connection from one address not refused")
	}
	dialFrom("127.0.0.2")
	waitConns(3)
	if !closedAtOnce(dialFrom("127.0.0.3")) {
		t.Fatal("connection over the portal's cap not refused")
	}
	if closedAtOnce(a1) {
		t.Fatal("an admitted connection was closed")
	}
	// A freed slot is usable again, for a full login.
	a1.Close()
	waitConns(2)
	cl := dialTest(t, addr)
	cl.login(t, iqnPrefix+":disk1", nil)
	cl.nop(t, []byte("in"))
	if !strings.Contains(lb.String(), "refused") {
		t.Errorf("refusals not logged: %s", lb.String())
	}
}

func logTo(w io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// FuzzSessionLimits sends arbitrary bytes on a session of a target with
// small bounds (queue depth, write buffers, response queue, Data-Out
// timeout), so fuzzed input runs into them. Whatever it sends, the write
// buffer budget is all given back once the connection is gone (no leak
// that would starve later sessions), and a new session works.
func FuzzSessionLimits(f *testing.F) {
	var seed []byte
	add := func(ps ...*pdu) {
		seed = seed[:0]
		for _, p := range ps {
			seed = append(seed, p.marshal(false, false)...)
		}
		f.Add(bytes.Clone(seed))
	}
	write := func(itt uint32, immediate, final bool, data []byte) *pdu {
		p := &pdu{}
		p.h[0] = opSCSICmd
		if immediate {
			p.h[0] |= flagImmediate
		}
		p.h[1] = 0x01 | flagWrite
		if final {
			p.h[1] |= flagFinal
		}
		p.h.setU32(offITT, itt)
		p.h.setU32(offEDTL, 64<<10)
		p.h.setU32(offCmdSN, 1+itt)
		copy(p.h[32:48], write10(itt*128, 128))
		p.data = data
		return p
	}
	// Immediate writes without their data: past the session's budget.
	var ws []*pdu
	for i := range 6 {
		ws = append(ws, write(uint32(i), true, true, nil))
	}
	add(ws...)
	// Unsolicited data announced, partly sent.
	d := &pdu{}
	d.h[0] = opDataOut
	d.h.setU32(offITT, 1)
	d.h.setU32(offTTT, reservedTag)
	d.h.setU32(offBufOff, 4096)
	d.data = make([]byte, 4096)
	add(write(1, false, false, make([]byte, 4096)), d)
	// NOP-Outs whose answers overflow the response queue.
	var nops []*pdu
	for i := range 8 {
		n := &pdu{}
		n.h[0] = opNopOut | flagImmediate
		n.h[1] = flagFinal
		n.h.setU32(offITT, uint32(i+100))
		n.h.setU32(offTTT, reservedTag)
		n.data = make([]byte, 8192)
		nops = append(nops, n)
	}
	add(nops...)
	// Immediate commands past the queue depth.
	var turs []*pdu
	for i := range 12 {
		p := &pdu{}
		p.h[0] = opSCSICmd | flagImmediate
		p.h[1] = flagFinal
		p.h.setU32(offITT, uint32(i+200))
		turs = append(turs, p)
	}
	add(turs...)

	s, addr, _ := startServer(f, Config{
		QueueDepth: 8, MaxRecvDataSegmentLength: 8192, MaxTransferLength: 64 << 10,
		SessionWriteBuffer: 128 << 10, WriteBuffer: 192 << 10, ResponseQueue: 16 << 10,
		DataOutTimeout: time.Second, WriteTimeout: time.Second,
		Logger: slog.New(slog.DiscardHandler),
	}, "disk1")
	f.Fuzz(func(t *testing.T, b []byte) {
		c := dialTest(t, addr)
		c.login(t, iqnPrefix+":disk1", []KeyValue{{"InitialR2T", "No"}, {"MaxRecvDataSegmentLength", "8192"}})
		c.nc.SetWriteDeadline(time.Now().Add(2 * time.Second))
		c.nc.Write(b)
		c.nc.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		buf := make([]byte, 4096)
		for {
			if _, err := c.nc.Read(buf); err != nil {
				break
			}
		}
		c.nc.Close()
		deadline := time.Now().Add(5 * time.Second)
		for s.writeHeld.Load() != 0 && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		if n := s.writeHeld.Load(); n != 0 {
			t.Fatalf("%d bytes of write budget still held after the connection closed", n)
		}
		ok := dialTest(t, addr)
		ok.isid = [6]byte{0x80, 4, 4, 4, 4, 4}
		ok.login(t, iqnPrefix+":disk1", nil)
		ok.nop(t, []byte("x"))
		ok.nc.Close()
	})
}
