package iscsi

import (
	"bytes"
	"log/slog"
	"math/rand/v2"
	"runtime"
	"sync"
	"testing"
	"time"
)

// writeRead writes a pattern to a block through c and reads it back.
func (c *rawClient) writeRead(t testing.TB, lba uint32, seed byte) {
	t.Helper()
	data := bytes.Repeat([]byte{seed}, 512)
	itt := c.cmd(t, write10(lba, 1), 512, false, true, data, true)
	if r := c.recv(t); r.h.opcode() != opSCSIResp || r.h.itt() != itt || r.h[3] != 0 {
		t.Fatalf("write: %v status %#x", r, r.h[3])
	}
	itt = c.cmd(t, read10(lba, 1), 512, true, false, nil, true)
	var got []byte
	for {
		r := c.recv(t)
		if r.h.itt() != itt {
			t.Fatalf("read: unexpected %v", r)
		}
		if r.h.opcode() == opDataIn {
			got = append(got, r.data...)
			if r.h[1]&0x01 == 0 { // no status in this Data-In
				continue
			}
			break
		}
		if r.h.opcode() != opSCSIResp || r.h[3] != 0 {
			t.Fatalf("read: %v status %#x", r, r.h[3])
		}
		break
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("read back %d bytes, not the pattern %#x", len(got), seed)
	}
}

// An initiator that floods commands far beyond its CmdSN window, then
// sends garbage, neither crashes the target nor disturbs another session
// on the same LUN, and leaves no goroutines behind.
func TestFloodAndGarbageDoNotHurtOthers(t *testing.T) {
	s, addr, _ := startServer(t, Config{QueueDepth: 8}, "disk1")
	before := runtime.NumGoroutine()

	good := dialTest(t, addr)
	good.isid = [6]byte{0x80, 9, 9, 9, 9, 9}
	good.login(t, iqnPrefix+":disk1", nil)
	good.clearUA(t)

	bad := dialTest(t, addr)
	bad.login(t, iqnPrefix+":disk1", nil)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		// The flood: 20000 writes with immediate data, never reading an
		// answer, CmdSN running far past MaxCmdSN.
		defer wg.Done()
		data := make([]byte, 512)
		for i := range 20000 {
			p := &pdu{}
			p.h[0] = opSCSICmd
			p.h[1] = 0x01 | flagFinal | flagWrite
			p.h.setU32(offITT, uint32(i+100))
			p.h.setU32(offEDTL, 512)
			p.h.setU32(offCmdSN, bad.cmdSN+uint32(i))
			copy(p.h[32:48], write10(uint32(1000+i%100), 1))
			p.data = data
			bad.nc.SetWriteDeadline(time.Now().Add(20 * time.Second))
			if _, err := bad.nc.Write(p.marshal(false, false)); err != nil {
				return // the target may cut the flood off
			}
		}
		// Then garbage.
		junk := make([]byte, 1<<16)
		rng := rand.New(rand.NewPCG(1, 2))
		for i := range junk {
			junk[i] = byte(rng.Uint32())
		}
		bad.nc.Write(junk)
	}()
	go func() {
		// Drain whatever the target answers the flood, so TCP does not
		// stall it for a reason of the test's making.
		defer wg.Done()
		buf := make([]byte, 1<<16)
		for {
			bad.nc.SetReadDeadline(time.Now().Add(20 * time.Second))
			if _, err := bad.nc.Read(buf); err != nil {
				return
			}
		}
	}()
	// Meanwhile the other session works, every time.
	for i := range 200 {
		good.writeRead(t, uint32(i%50), byte(i))
	}
	wg.Wait()
	good.writeRead(t, 7, 0x77)
	good.nop(t, []byte("alive"))

	// The flooding connection is gone or harmless; the target is whole.
	bad.nc.Close()
	waitSessions(t, s, 1)
	fresh := dialTest(t, addr)
	fresh.isid = [6]byte{0x80, 7, 7, 7, 7, 7}
	fresh.login(t, iqnPrefix+":disk1", nil)
	fresh.nop(t, nil)
	fresh.nc.Close()
	good.nc.Close()
	waitSessions(t, s, 0)
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before+2 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before+2 {
		t.Errorf("%d goroutines left behind (%d before)", n-before, before)
	}
}

func waitSessions(t *testing.T, s *Server, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for len(s.Sessions()) != n && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := len(s.Sessions()); got != n {
		t.Fatalf("%d sessions, want %d", got, n)
	}
}

// FuzzSession sends arbitrary bytes on a logged-in session. Whatever they
// are, the target must not crash, and a new session must work afterwards.
func FuzzSession(f *testing.F) {
	tur := &pdu{}
	tur.h[0] = opSCSICmd
	tur.h[1] = flagFinal
	tur.h.setU32(offCmdSN, 1)
	f.Add(tur.marshal(false, false))
	w := &pdu{}
	w.h[0] = opSCSICmd
	w.h[1] = flagFinal | flagWrite
	w.h.setU32(offEDTL, 1<<20)
	w.h.setU32(offCmdSN, 1)
	copy(w.h[32:48], write10(0, 2048))
	w.data = make([]byte, 4096)
	f.Add(w.marshal(false, false))
	d := &pdu{}
	d.h[0] = opDataOut
	d.h.setU32(offBufOff, 1<<30)
	d.h.setDataLen(512)
	d.data = make([]byte, 512)
	f.Add(append(w.marshal(false, false), d.marshal(false, false)...))
	f.Add(bytes.Repeat([]byte{0xff}, 96))
	logout := &pdu{}
	logout.h[0] = opLogoutReq | flagImmediate
	logout.h[1] = flagFinal
	f.Add(logout.marshal(false, false))

	// Logs are discarded: the fuzzing engine forbids logging to f from
	// the target's goroutines.
	_, addr, _ := startServer(f, Config{QueueDepth: 16, MaxRecvDataSegmentLength: 8192, Logger: slog.New(slog.DiscardHandler)}, "disk1")
	f.Fuzz(func(t *testing.T, b []byte) {
		c := dialTest(t, addr)
		c.login(t, iqnPrefix+":disk1", nil)
		c.nc.SetWriteDeadline(time.Now().Add(2 * time.Second))
		c.nc.Write(b)
		// Read what comes for a moment, then go away.
		c.nc.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		buf := make([]byte, 4096)
		for {
			if _, err := c.nc.Read(buf); err != nil {
				break
			}
		}
		c.nc.Close()
		ok := dialTest(t, addr)
		ok.isid = [6]byte{0x80, 4, 4, 4, 4, 4}
		ok.login(t, iqnPrefix+":disk1", nil)
		ok.nop(t, []byte("x"))
		ok.nc.Close()
	})
}
