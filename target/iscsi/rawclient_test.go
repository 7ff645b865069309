package iscsi

import (
	"bufio"
	"encoding/binary"
	"net"
	"testing"
	"time"
)

// rawClient is a minimal initiator for protocol tests.
type rawClient struct {
	nc     net.Conn
	pr     *pduReader
	isid   [6]byte
	itt    uint32
	cmdSN  uint32
	statSN uint32
	tsih   uint16
}

func dialTest(t testing.TB, addr string) *rawClient {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return &rawClient{nc: nc, pr: newPDUReader(bufio.NewReader(nc), 1<<24), isid: [6]byte{0x80, 1, 2, 3, 4, 5}, cmdSN: 1}
}

func (c *rawClient) send(t testing.TB, p *pdu) {
	t.Helper()
	if _, err := c.nc.Write(p.marshal(false, false)); err != nil {
		t.Fatalf("send: %v", err)
	}
}

func (c *rawClient) recv(t testing.TB) *pdu {
	t.Helper()
	c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	p, err := c.pr.readPDU()
	if err != nil {
		t.Fatalf("recv: %v", err)
	}
	return p
}

// loginPDU builds a login request.
func (c *rawClient) loginPDU(csg, nsg int, transit bool, kvs []KeyValue) *pdu {
	p := &pdu{}
	p.h[0] = opLoginReq | flagImmediate
	p.h[1] = byte(csg<<2 | nsg)
	if transit {
		p.h[1] |= flagTransit
	}
	copy(p.h[8:14], c.isid[:])
	p.h.setU16(14, c.tsih)
	p.h.setU32(offITT, c.itt)
	p.h.setU32(offCmdSN, c.cmdSN)
	p.h.setU32(offExpStat, c.statSN)
	p.data = encodeText(kvs)
	return p
}

// login does a one-PDU operational-stage login and returns the response
// keys; extra keys are added to the request. It fails the test unless the
// login succeeds.
func (c *rawClient) login(t testing.TB, target string, extra []KeyValue) []KeyValue {
	t.Helper()
	kvs, st := c.tryLogin(t, target, extra)
	if st != 0 {
		t.Fatalf("login status %04x", st)
	}
	return kvs
}

func (c *rawClient) tryLogin(t testing.TB, target string, extra []KeyValue) ([]KeyValue, uint16) {
	t.Helper()
	kvs := []KeyValue{{"InitiatorName", "iqn.2024-01.test:raw"}}
	if target == "" {
		kvs = append(kvs, KeyValue{"SessionType", "Discovery"})
	} else {
		kvs = append(kvs, KeyValue{"TargetName", target})
	}
	kvs = append(kvs, extra...)
	c.send(t, c.loginPDU(1, 3, true, kvs))
	r := c.recv(t)
	if r.h.opcode() != opLoginResp {
		t.Fatalf("login: got opcode %#x", r.h.opcode())
	}
	st := r.h.u16(36)
	c.statSN = r.h.u32(offStatSN) + 1
	c.tsih = r.h.u16(14)
	out, err := parseText(r.data)
	if err != nil {
		t.Fatalf("login response text: %v", err)
	}
	c.itt++
	return out, st
}

// cmd sends a SCSI command (non-immediate) with optional immediate data.
func (c *rawClient) cmd(t testing.TB, cdb []byte, edtl uint32, read, write bool, data []byte, final bool) uint32 {
	t.Helper()
	p := &pdu{}
	p.h[0] = opSCSICmd
	p.h[1] = 0x01 // simple
	if final {
		p.h[1] |= flagFinal
	}
	if read {
		p.h[1] |= flagRead
	}
	if write {
		p.h[1] |= flagWrite
	}
	itt := c.itt
	c.itt++
	p.h.setU32(offITT, itt)
	p.h.setU32(offEDTL, edtl)
	p.h.setU32(offCmdSN, c.cmdSN)
	c.cmdSN++
	p.h.setU32(offExpStat, c.statSN)
	copy(p.h[32:48], cdb)
	p.data = data
	c.send(t, p)
	return itt
}

func (c *rawClient) nop(t testing.TB, data []byte) {
	t.Helper()
	p := &pdu{}
	p.h[0] = opNopOut | flagImmediate
	p.h[1] = flagFinal
	itt := c.itt
	c.itt++
	p.h.setU32(offITT, itt)
	p.h.setU32(offTTT, reservedTag)
	p.h.setU32(offCmdSN, c.cmdSN)
	p.data = data
	c.send(t, p)
	r := c.recv(t)
	if r.h.opcode() != opNopIn || r.h.itt() != itt || string(r.data) != string(data) {
		t.Fatalf("nop: got %v data %q", r, r.data)
	}
}

func read10(lba uint32, blocks uint16) []byte {
	cdb := make([]byte, 10)
	cdb[0] = 0x28
	binary.BigEndian.PutUint32(cdb[2:], lba)
	binary.BigEndian.PutUint16(cdb[7:], blocks)
	return cdb
}

func write10(lba uint32, blocks uint16) []byte {
	cdb := read10(lba, blocks)
	cdb[0] = 0x2a
	return cdb
}
