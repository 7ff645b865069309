package iscsi

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"slices"
	"strings"
	"testing"
	"time"
)

func kvGet(kvs []KeyValue, k string) string {
	for _, kv := range kvs {
		if kv.Key == k {
			return kv.Value
		}
	}
	return ""
}

func TestLoginErrors(t *testing.T) {
	_, addr, _ := startServer(t, Config{}, "disk1")
	cases := []struct {
		name string
		kvs  []KeyValue
		tsih uint16
		vmin byte
		want uint16
	}{
		{"no initiator", []KeyValue{{"TargetName", iqnPrefix + ":disk1"}}, 0, 0, 0x0207},
		{"no target", []KeyValue{{"InitiatorName", "iqn.x"}}, 0, 0, 0x0207},
		{"unknown target", []KeyValue{{"InitiatorName", "iqn.x"}, {"TargetName", "iqn.nope"}}, 0, 0, 0x0203},
		{"bad session type", []KeyValue{{"InitiatorName", "iqn.x"}, {"SessionType", "Weird"}}, 0, 0, 0x0209},
		{"unknown tsih", []KeyValue{{"InitiatorName", "iqn.x"}, {"TargetName", iqnPrefix + ":disk1"}}, 99, 0, 0x020a},
		{"version", []KeyValue{{"InitiatorName", "iqn.x"}, {"TargetName", iqnPrefix + ":disk1"}}, 0, 1, 0x0205},
		{"dup key", []KeyValue{{"InitiatorName", "iqn.x"}, {"TargetName", iqnPrefix + ":disk1"}, {"MaxBurstLength", "512"}, {"MaxBurstLength", "512"}}, 0, 0, 0x0200},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cl := dialTest(t, addr)
			cl.tsih = c.tsih
			p := cl.loginPDU(1, 3, true, c.kvs)
			p.h[3] = c.vmin
			p.h[2] = max(c.vmin, p.h[2])
			cl.send(t, p)
			r := cl.recv(t)
			if st := r.h.u16(36); st != c.want {
				t.Errorf("status %04x, want %04x", st, c.want)
			}
			// The target then closes the connection.
			cl.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := cl.nc.Read(make([]byte, 1)); err == nil {
				t.Error("connection left open after a failed login")
			}
		})
	}
}

func TestLoginStages(t *testing.T) {
	_, addr, _ := startServer(t, Config{}, "disk1")
	cl := dialTest(t, addr)
	// Security stage, AuthMethod=None, transit to operational.
	cl.send(t, cl.loginPDU(0, 1, true, []KeyValue{{"InitiatorName", "iqn.x"}, {"TargetName", iqnPrefix + ":disk1"}, {"AuthMethod", "CHAP,None"}}))
	r := cl.recv(t)
	kvs, _ := parseText(r.data)
	if st := r.h.u16(36); st != 0 || kvGet(kvs, "AuthMethod") != "None" || kvGet(kvs, "TargetPortalGroupTag") != "1" {
		t.Fatalf("security: status %04x kvs %v", st, kvs)
	}
	if r.h[1] != flagTransit|0<<2|1 {
		t.Fatalf("security response flags %#x", r.h[1])
	}
	// Operational stage without transit, then with.
	cl.send(t, cl.loginPDU(1, 3, false, []KeyValue{{"HeaderDigest", "None"}, {"MaxRecvDataSegmentLength", "4096"}, {"X-vendor", "1"}}))
	r = cl.recv(t)
	kvs, _ = parseText(r.data)
	if r.h[1]&flagTransit != 0 || kvGet(kvs, "HeaderDigest") != "None" || kvGet(kvs, "X-vendor") != valNotUnderstood || kvGet(kvs, "MaxRecvDataSegmentLength") != "262144" || kvGet(kvs, "TargetPortalGroupTag") != "" {
		t.Fatalf("operational: flags %#x kvs %v", r.h[1], kvs)
	}
	cl.send(t, cl.loginPDU(1, 3, true, []KeyValue{{"ImmediateData", "No"}}))
	r = cl.recv(t)
	if r.h[1] != flagTransit|1<<2|3 || r.h.u16(14) == 0 {
		t.Fatalf("final: flags %#x tsih %d", r.h[1], r.h.u16(14))
	}
	cl.statSN = r.h.u32(offStatSN) + 1
	cl.nop(t, []byte("hello"))
}

// fakeAuth requires "CHAP" with a toy exchange (CHAP_N=secret) and hides
// targets named *secret* from discovery.
type fakeAuth struct{}

func (fakeAuth) Begin(ctx context.Context, info LoginInfo) (AuthExchange, error) {
	if info.InitiatorName == "iqn.banned" {
		return nil, fmt.Errorf("acl: %w", ErrNotAuthorized)
	}
	return &fakeEx{}, nil
}

func (fakeAuth) Visible(initiator, target string) bool { return !strings.Contains(target, "secret") }

type fakeEx struct{ step int }

func (*fakeEx) Methods() []string { return []string{"CHAP"} }
func (e *fakeEx) Step(method string, in []KeyValue) ([]KeyValue, bool, error) {
	e.step++
	if e.step == 1 {
		return []KeyValue{{"CHAP_A", "5"}, {"CHAP_I", "1"}, {"CHAP_C", "0x00"}}, false, nil
	}
	if kvGet(in, "CHAP_N") == "secret" {
		return nil, true, nil
	}
	return nil, false, ErrAuthFailed
}

func TestAuthenticatorSeam(t *testing.T) {
	_, addr, _ := startServer(t, Config{Authenticator: fakeAuth{}}, "disk1", "secret1")
	// Skipping the security stage is refused.
	cl := dialTest(t, addr)
	if _, st := cl.tryLogin(t, iqnPrefix+":disk1", nil); st != 0x0201 {
		t.Errorf("no-auth login status %04x", st)
	}
	// Refused initiator.
	cl = dialTest(t, addr)
	cl.send(t, cl.loginPDU(0, 1, true, []KeyValue{{"InitiatorName", "iqn.banned"}, {"TargetName", iqnPrefix + ":disk1"}, {"AuthMethod", "CHAP"}}))
	if r := cl.recv(t); r.h.u16(36) != 0x0202 {
		t.Errorf("banned status %04x", r.h.u16(36))
	}
	// Full exchange.
	for _, secret := range []string{"wrong", "secret"} {
		cl = dialTest(t, addr)
		cl.send(t, cl.loginPDU(0, 1, false, []KeyValue{{"InitiatorName", "iqn.x"}, {"SessionType", "Discovery"}, {"AuthMethod", "None,CHAP"}}))
		r := cl.recv(t)
		kvs, _ := parseText(r.data)
		if kvGet(kvs, "AuthMethod") != "CHAP" {
			t.Fatalf("AuthMethod: %v", kvs)
		}
		cl.send(t, cl.loginPDU(0, 1, false, []KeyValue{{"CHAP_A", "5"}}))
		r = cl.recv(t)
		kvs, _ = parseText(r.data)
		if kvGet(kvs, "CHAP_C") == "" || r.h[1]&flagTransit != 0 {
			t.Fatalf("challenge: %v", kvs)
		}
		cl.send(t, cl.loginPDU(0, 1, true, []KeyValue{{"CHAP_N", secret}, {"CHAP_R", "0x00"}}))
		r = cl.recv(t)
		st := r.h.u16(36)
		if secret == "wrong" {
			if st != 0x0201 {
				t.Errorf("wrong secret status %04x", st)
			}
			continue
		}
		if st != 0 || r.h[1]&flagTransit == 0 {
			t.Fatalf("auth final: %04x flags %#x", st, r.h[1])
		}
		cl.send(t, cl.loginPDU(1, 3, true, nil))
		r = cl.recv(t)
		if r.h.u16(36) != 0 || r.h[1]&flagTransit == 0 {
			t.Fatalf("op stage: %04x", r.h.u16(36))
		}
		cl.statSN = r.h.u32(offStatSN) + 1
		kvs = cl.text(t, "SendTargets=All")
		if slices.ContainsFunc(kvs, func(kv KeyValue) bool { return strings.Contains(kv.Value, "secret") }) || kvGet(kvs, "TargetName") != iqnPrefix+":disk1" {
			t.Errorf("SendTargets shows %v", kvs)
		}
	}
}

// text sends a Text request and collects the (possibly continued) answer.
func (c *rawClient) text(t testing.TB, req string) []KeyValue {
	t.Helper()
	ttt := uint32(reservedTag)
	itt := c.itt
	c.itt++
	var all []byte
	data := []byte(req + "\x00")
	for {
		p := &pdu{}
		p.h[0] = opTextReq | flagImmediate
		p.h[1] = flagFinal
		p.h.setU32(offITT, itt)
		p.h.setU32(offTTT, ttt)
		p.h.setU32(offCmdSN, c.cmdSN)
		p.h.setU32(offExpStat, c.statSN)
		p.data = data
		c.send(t, p)
		r := c.recv(t)
		if r.h.opcode() != opTextResp {
			t.Fatalf("text: opcode %#x", r.h.opcode())
		}
		c.statSN = r.h.u32(offStatSN) + 1
		all = append(all, r.data...)
		if r.h[1]&flagFinal != 0 {
			break
		}
		ttt = r.h.u32(offTTT)
		data = nil
	}
	var kvs []KeyValue
	for _, item := range strings.Split(strings.TrimRight(string(all), "\x00"), "\x00") {
		if item == "" {
			continue
		}
		k, v, ok := strings.Cut(item, "=")
		if !ok {
			t.Fatalf("text response item %q", item)
		}
		kvs = append(kvs, KeyValue{k, v})
	}
	return kvs
}

func TestSendTargetsContinuation(t *testing.T) {
	var names []string
	for i := range 300 {
		names = append(names, fmt.Sprintf("a-rather-long-image-name-%04d", i))
	}
	_, addr, _ := startServer(t, Config{}, names...)
	cl := dialTest(t, addr)
	cl.login(t, "", []KeyValue{{"MaxRecvDataSegmentLength", "4096"}})
	kvs := cl.text(t, "SendTargets=All")
	n := 0
	for _, kv := range kvs {
		if kv.Key == "TargetName" {
			n++
		} else if kv.Key == "TargetAddress" && kv.Value != addr+",1" {
			t.Fatalf("TargetAddress %q", kv.Value)
		}
	}
	if n != 300 {
		t.Fatalf("SendTargets listed %d targets", n)
	}
	kvs = cl.text(t, "SendTargets="+iqnPrefix+":"+names[7])
	if len(kvs) != 2 || kvs[0].Value != iqnPrefix+":"+names[7] {
		t.Fatalf("SendTargets=<iqn>: %v", kvs)
	}
	if kvs := cl.text(t, "SendTargets=iqn.none"); len(kvs) != 0 {
		t.Fatalf("SendTargets=<unknown>: %v", kvs)
	}
}

func TestReinstatement(t *testing.T) {
	s, addr, _ := startServer(t, Config{}, "disk1")
	a := dialTest(t, addr)
	a.login(t, iqnPrefix+":disk1", nil)
	b := dialTest(t, addr) // same initiator name and ISID
	b.login(t, iqnPrefix+":disk1", nil)
	a.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := a.nc.Read(make([]byte, 1)); err == nil {
		t.Error("old session still open after reinstatement")
	}
	b.nop(t, nil)
	// A different ISID is a second session to the same target.
	c := dialTest(t, addr)
	c.isid[5] = 0x99
	c.login(t, iqnPrefix+":disk1", nil)
	c.nop(t, []byte("x"))
	b.nop(t, []byte("y"))
	if n := len(s.Sessions()); n != 2 {
		t.Errorf("sessions = %d: %+v", n, s.Sessions())
	}
}

func TestRejects(t *testing.T) {
	_, addr, _ := startServer(t, Config{}, "disk1")
	cl := dialTest(t, addr)
	cl.login(t, iqnPrefix+":disk1", nil)
	for _, c := range []struct {
		op     byte
		reason byte
	}{{0x1c, rejectNotSupported}, {opSNACK, rejectProtocolError}, {opLoginReq, rejectProtocolError}, {opNopIn, rejectNotSupported}} {
		p := &pdu{}
		p.h[0] = c.op
		p.h[1] = flagFinal
		p.h.setU32(offITT, 0x1234)
		p.data = []byte("junk")
		cl.send(t, p)
		r := cl.recv(t)
		if r.h.opcode() != opReject || r.h[2] != c.reason || len(r.data) != bhsLen || r.data[0]&0x3f != c.op {
			t.Fatalf("op %#x: got %v reason %#x", c.op, r, r.h[2])
		}
		cl.statSN = r.h.u32(offStatSN) + 1
	}
	cl.nop(t, []byte("still alive"))
	// A data segment beyond MaxRecvDataSegmentLength closes the connection.
	p := &pdu{}
	p.h[0] = opNopOut | flagImmediate
	p.h[1] = flagFinal
	p.h.setU32(offITT, 1)
	p.h.setDataLen(1 << 23)
	cl.nc.Write(p.h[:])
	cl.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := cl.nc.Read(make([]byte, 1)); err == nil {
		t.Error("oversized PDU did not close the connection")
	}
}

func TestCmdSNWindow(t *testing.T) {
	_, addr, _ := startServer(t, Config{QueueDepth: 4}, "disk1")
	cl := dialTest(t, addr)
	cl.login(t, iqnPrefix+":disk1", nil)
	tur := make([]byte, 6)
	// Too high: ignored.
	cl.cmdSN += 10
	cl.cmd(t, tur, 0, false, false, nil, true)
	cl.cmdSN -= 11
	// Too low: ignored.
	cl.cmdSN--
	cl.cmd(t, tur, 0, false, false, nil, true)
	// In order: answered, and only that one.
	cl.clearUA(t)
	itt := cl.cmd(t, tur, 0, false, false, nil, true)
	r := cl.recv(t)
	if r.h.opcode() != opSCSIResp || r.h.itt() != itt || r.h[3] != 0 {
		t.Fatalf("TUR: %v status %#x", r, r.h[3])
	}
	exp, maxSN := r.h.u32(offExpCmdSN), r.h.u32(offMaxCmdSN)
	if exp != cl.cmdSN || maxSN != exp+3 {
		t.Errorf("ExpCmdSN %d MaxCmdSN %d (next CmdSN %d)", exp, maxSN, cl.cmdSN)
	}
}

func TestR2TAndDataIn(t *testing.T) {
	_, addr, tt := startServer(t, Config{MaxOutstandingR2T: 2}, "disk1")
	cl := dialTest(t, addr)
	kvs := cl.login(t, iqnPrefix+":disk1", []KeyValue{
		{"InitialR2T", "Yes"}, {"ImmediateData", "No"}, {"MaxBurstLength", "8192"},
		{"MaxRecvDataSegmentLength", "4096"}, {"MaxOutstandingR2T", "8"},
	})
	if kvGet(kvs, "MaxOutstandingR2T") != "2" || kvGet(kvs, "InitialR2T") != "Yes" {
		t.Fatalf("negotiated %v", kvs)
	}
	const size = 64 << 10
	payload := make([]byte, size)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	cl.clearUA(t)
	itt := cl.cmd(t, write10(8, size/512), size, false, true, nil, true)
	// Serve R2Ts: at most 2 outstanding, 8 KiB bursts, in 4 KiB PDUs.
	got := 0
	var r *pdu
	for {
		r = cl.recv(t)
		if r.h.opcode() != opR2T {
			break
		}
		if r.h.itt() != itt {
			t.Fatalf("R2T itt %#x", r.h.itt())
		}
		off, l, ttt, r2tsn := r.h.u32(offBufOff), r.h.u32(offResidual), r.h.u32(offTTT), r.h.u32(offDataSN)
		if l > 8192 || int(r2tsn) != got {
			t.Fatalf("R2T len %d r2tsn %d", l, r2tsn)
		}
		got++
		for sn, o := uint32(0), uint32(0); o < l; sn, o = sn+1, o+4096 {
			d := &pdu{}
			d.h[0] = opDataOut
			if o+4096 >= l {
				d.h[1] = flagFinal
			}
			d.h.setU32(offITT, itt)
			d.h.setU32(offTTT, ttt)
			d.h.setU32(offDataSN, sn)
			d.h.setU32(offBufOff, off+o)
			d.data = payload[off+o : off+min(o+4096, l)]
			cl.send(t, d)
		}
	}
	if got != size/8192 {
		t.Errorf("%d R2Ts", got)
	}
	if r.h.opcode() == opSCSIResp && r.h[3] == 2 {
		// Unit attention after login: retry not needed for this check.
		t.Fatalf("write got CHECK CONDITION")
	}
	if r.h.opcode() != opSCSIResp || r.h[3] != 0 || r.h.u32(offDataSN) != uint32(got) {
		t.Fatalf("write response %v status %#x expdatasn %d", r, r.h[3], r.h.u32(offDataSN))
	}
	be := tt.be[iqnPrefix+":disk1"]
	be.mu.RLock()
	same := bytes.Equal(be.data[8*512:8*512+size], payload)
	be.mu.RUnlock()
	if !same {
		t.Fatal("written data differs")
	}
	// Read back: Data-In in 4 KiB PDUs, status in the last one; EDTL one
	// block larger than the transfer: underflow.
	itt = cl.cmd(t, read10(8, size/512), size+512, true, false, nil, true)
	var back []byte
	for sn := uint32(0); ; sn++ {
		r = cl.recv(t)
		if r.h.opcode() != opDataIn || r.h.itt() != itt || r.h.u32(offDataSN) != sn || r.h.u32(offBufOff) != uint32(len(back)) || len(r.data) > 4096 {
			t.Fatalf("Data-In %d: %v datasn %d off %d", sn, r, r.h.u32(offDataSN), r.h.u32(offBufOff))
		}
		back = append(back, r.data...)
		if r.h[1]&flagStatus != 0 {
			if r.h[1]&flagFinal == 0 || r.h[1]&flagUnderflow == 0 || r.h.u32(offResidual) != 512 || r.h[3] != 0 {
				t.Fatalf("final Data-In flags %#x residual %d", r.h[1], r.h.u32(offResidual))
			}
			break
		}
	}
	if !bytes.Equal(back, payload) {
		t.Fatal("read data differs")
	}
}

func TestAbortTask(t *testing.T) {
	s, addr, tt := startServer(t, Config{}, "disk1")
	be := tt.be[iqnPrefix+":disk1"]
	be.delay.Store(int64(time.Hour))
	cl := dialTest(t, addr)
	cl.login(t, iqnPrefix+":disk1", nil)
	cl.clearUA(t)
	data := make([]byte, 4096)
	witt := cl.cmd(t, write10(0, 8), 4096, false, true, data, true)
	time.Sleep(50 * time.Millisecond)
	tmf := func(fn byte, ref uint32) *pdu {
		p := &pdu{}
		p.h[0] = opTMFReq | flagImmediate
		p.h[1] = flagFinal | fn
		itt := cl.itt
		cl.itt++
		p.h.setU32(offITT, itt)
		p.h.setU32(offTTT, ref)
		p.h.setU32(offCmdSN, cl.cmdSN)
		p.h.setU32(32, cl.cmdSN-1)
		cl.send(t, p)
		r := cl.recv(t)
		if r.h.opcode() != opTMFResp || r.h.itt() != itt {
			t.Fatalf("TMF %d: got %v (itt %#x)", fn, r, r.h.itt())
		}
		return r
	}
	if r := tmf(tmfAbortTask, witt); r.h[2] != tmfRespComplete {
		t.Fatalf("ABORT TASK response %d", r.h[2])
	}
	if r := tmf(tmfAbortTask, witt); r.h[2] != tmfRespNoTask {
		t.Fatalf("second ABORT TASK response %d", r.h[2])
	}
	// LU reset with a command in flight.
	cl.cmd(t, write10(0, 8), 4096, false, true, data, true)
	time.Sleep(50 * time.Millisecond)
	if r := tmf(tmfLUReset, reservedTag); r.h[2] != tmfRespComplete {
		t.Fatalf("LU RESET response %d", r.h[2])
	}
	if r := tmf(tmfClearACA, reservedTag); r.h[2] != tmfRespNotSupported {
		t.Fatalf("CLEAR ACA response %d", r.h[2])
	}
	be.delay.Store(0)
	cl.nop(t, []byte("after"))
	if got := s.Sessions(); len(got) != 1 || got[0].Commands == 0 {
		t.Errorf("sessions %+v", got)
	}
}

func TestDisconnectMidDataOut(t *testing.T) {
	s, addr, _ := startServer(t, Config{}, "disk1")
	cl := dialTest(t, addr)
	cl.login(t, iqnPrefix+":disk1", nil)
	// 1 MiB write with 4 KiB immediate data, then the initiator vanishes
	// halfway through a Data-Out.
	cl.cmd(t, write10(0, 2048), 1<<20, false, true, make([]byte, 4096), true)
	r := cl.recv(t)
	if r.h.opcode() != opR2T {
		t.Fatalf("expected R2T, got %v", r)
	}
	d := &pdu{}
	d.h[0] = opDataOut
	d.h.setU32(offITT, r.h.itt())
	d.h.setU32(offTTT, r.h.u32(offTTT))
	d.h.setU32(offBufOff, 4096)
	d.h.setDataLen(65536)
	cl.nc.Write(d.h[:])
	cl.nc.Write(make([]byte, 1000))
	cl.nc.Close()
	deadline := time.Now().Add(5 * time.Second)
	for len(s.Sessions()) > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := len(s.Sessions()); n != 0 {
		t.Fatalf("session survived its connection: %d", n)
	}
	c2 := dialTest(t, addr)
	c2.login(t, iqnPrefix+":disk1", nil)
	c2.nop(t, nil)
}

func TestLoginTimeout(t *testing.T) {
	_, addr, _ := startServer(t, Config{LoginTimeout: 200 * time.Millisecond})
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	start := time.Now()
	if _, err := nc.Read(make([]byte, 1)); err == nil || time.Since(start) > 3*time.Second {
		t.Fatalf("silent connection not closed by the login timeout: %v", err)
	}
}

// clearUA sends TEST UNIT READY until it succeeds (the unit attention
// every new nexus gets).
func (c *rawClient) clearUA(t testing.TB) {
	t.Helper()
	for range 5 {
		itt := c.cmd(t, make([]byte, 6), 0, false, false, nil, true)
		r := c.recv(t)
		if r.h.opcode() != opSCSIResp || r.h.itt() != itt {
			t.Fatalf("TUR: %v", r)
		}
		if r.h[3] == 0 {
			return
		}
	}
	t.Fatal("unit attention never cleared")
}

func TestNopKeepalive(t *testing.T) {
	_, addr, _ := startServer(t, Config{NopInterval: 150 * time.Millisecond}, "disk1")
	cl := dialTest(t, addr)
	cl.login(t, iqnPrefix+":disk1", nil)
	// The target pings an idle initiator; answering keeps the session.
	for range 2 {
		r := cl.recv(t)
		if r.h.opcode() != opNopIn || r.h.itt() != reservedTag || r.h.u32(offTTT) == reservedTag {
			t.Fatalf("expected a NOP-In ping, got %v", r)
		}
		p := &pdu{}
		p.h[0] = opNopOut | flagImmediate
		p.h[1] = flagFinal
		p.h.setU32(offITT, reservedTag)
		p.h.setU32(offTTT, r.h.u32(offTTT))
		p.h.setU32(offCmdSN, cl.cmdSN)
		cl.send(t, p)
	}
	cl.nop(t, []byte("alive"))
	// Not answering gets the connection dropped.
	cl.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 4096)
	for {
		if _, err := cl.nc.Read(buf); err != nil {
			break
		}
	}
}

func TestCloseDrainsInflight(t *testing.T) {
	s, addr, tt := startServer(t, Config{}, "disk1")
	cl := dialTest(t, addr)
	cl.login(t, iqnPrefix+":disk1", nil)
	cl.clearUA(t)
	tt.be[iqnPrefix+":disk1"].delay.Store(int64(300 * time.Millisecond))
	itt := cl.cmd(t, write10(0, 8), 4096, false, true, make([]byte, 4096), true)
	time.Sleep(50 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- s.Close(ctx) }()
	r := cl.recv(t)
	if r.h.opcode() != opSCSIResp || r.h.itt() != itt || r.h[3] != 0 {
		t.Fatalf("in-flight write during Close: %v status %#x", r, r.h[3])
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	// A Close whose context expires cancels the command instead.
	s2, addr2, tt2 := startServer(t, Config{}, "disk1")
	cl2 := dialTest(t, addr2)
	cl2.login(t, iqnPrefix+":disk1", nil)
	cl2.clearUA(t)
	tt2.be[iqnPrefix+":disk1"].delay.Store(int64(time.Hour))
	cl2.cmd(t, write10(0, 8), 4096, false, true, make([]byte, 4096), true)
	time.Sleep(50 * time.Millisecond)
	ctx2, cancel2 := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel2()
	start := time.Now()
	s2.Close(ctx2)
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("Close took %v", d)
	}
}
