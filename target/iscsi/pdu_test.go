package iscsi

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"
)

func TestPDURoundTrip(t *testing.T) {
	for _, digests := range [][2]bool{{false, false}, {true, false}, {false, true}, {true, true}} {
		for _, n := range []int{0, 1, 3, 4, 5, 48, 8191} {
			p := &pdu{}
			p.h[0] = opSCSICmd | flagImmediate
			p.h[1] = flagFinal | flagWrite
			p.h.setU32(offITT, 0x01020304)
			p.h.setU32(offEDTL, uint32(n))
			p.h.setU32(offCmdSN, 77)
			copy(p.h[32:], []byte{0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0})
			// Extended CDB AHS carrying 4 more CDB bytes (length 5:
			// reserved byte + 4), padded to 8.
			p.ahs = []byte{0, 5, 1, 0, 0xa, 0xb, 0xc, 0xd}
			p.data = bytes.Repeat([]byte{0x5a}, n)
			wire := p.marshal(digests[0], digests[1])
			pr := newPDUReader(bytes.NewReader(wire), 8192)
			pr.hdrDigest, pr.dataDigest = digests[0], digests[1]
			q, err := pr.readPDU()
			if err != nil {
				t.Fatalf("digests %v n %d: %v", digests, n, err)
			}
			if q.h.opcode() != opSCSICmd || !q.h.immediate() || !q.h.final() || q.h.itt() != 0x01020304 || q.h.u32(offCmdSN) != 77 {
				t.Fatalf("header mismatch: %x", q.h)
			}
			if !bytes.Equal(q.data, p.data) || !bytes.Equal(q.ahs, p.ahs) {
				t.Fatalf("data/AHS mismatch")
			}
			cdb, err := q.cdb()
			if err != nil || len(cdb) != 20 || cdb[0] != 0x2a || cdb[19] != 0xd {
				t.Fatalf("cdb %x %v", cdb, err)
			}
			if pr.n != uint64(len(wire)) {
				t.Fatalf("consumed %d of %d", pr.n, len(wire))
			}
			if digests[0] || digests[1] {
				// Corrupt one byte of the digest: must be detected.
				bad := bytes.Clone(wire)
				bad[len(bad)-1] ^= 1
				pr := newPDUReader(bytes.NewReader(bad), 8192)
				pr.hdrDigest, pr.dataDigest = digests[0], digests[1]
				if _, err := pr.readPDU(); err == nil && (digests[1] && n > 0 || digests[0] && n == 0) {
					t.Fatalf("corrupt digest not detected (digests %v n %d)", digests, n)
				}
			}
		}
	}
}

func TestPDULimits(t *testing.T) {
	p := &pdu{}
	p.h[0] = opNopOut
	p.data = make([]byte, 9000)
	wire := p.marshal(false, false)
	pr := newPDUReader(bytes.NewReader(wire), 8192)
	if _, err := pr.readPDU(); !errors.Is(err, errTooLarge) {
		t.Fatalf("oversized segment: %v", err)
	}
	// Truncated streams.
	for i := 1; i < len(wire[:60]); i++ {
		pr := newPDUReader(bytes.NewReader(wire[:i]), 1<<20)
		if _, err := pr.readPDU(); err == nil {
			t.Fatalf("truncated at %d: no error", i)
		}
	}
	// Clean EOF between PDUs is io.EOF.
	pr = newPDUReader(bytes.NewReader(nil), 8192)
	if _, err := pr.readPDU(); err != io.EOF {
		t.Fatalf("empty stream: %v", err)
	}
}

func TestAHSParse(t *testing.T) {
	if _, err := findAHS([]byte{0, 0, 1, 0}, 1); err == nil {
		t.Error("zero-length AHS accepted")
	}
	if _, err := findAHS([]byte{0, 9, 1, 0}, 1); err == nil {
		t.Error("overlong AHS accepted")
	}
	if _, err := findAHS([]byte{0, 1}, 1); err == nil {
		t.Error("truncated AHS accepted")
	}
	// Bidirectional read length AHS (type 2) then extended CDB (type 1).
	ahs := []byte{0, 5, 2, 0, 0, 0, 1, 0, 0, 2, 1, 0, 0xee, 0, 0, 0}
	got, err := findAHS(ahs, 1)
	if err != nil || !bytes.Equal(got, []byte{0, 0xee}) {
		t.Errorf("findAHS = %x, %v", got, err)
	}
}

func TestLUN(t *testing.T) {
	cases := []struct {
		raw  [8]byte
		want uint64
	}{
		{[8]byte{}, 0},
		{[8]byte{0, 5}, 5},
		{[8]byte{0x40, 0x01}, 1},
		{[8]byte{0x41, 0x02}, 0x102},
	}
	for _, c := range cases {
		if got := decodeLUN(c.raw); got != c.want {
			t.Errorf("decodeLUN(%x) = %d, want %d", c.raw, got, c.want)
		}
	}
	for _, lun := range []uint64{0, 1, 255, 256, 16383} {
		if got := decodeLUN(encodeLUN(lun)); got != lun {
			t.Errorf("round trip %d = %d", lun, got)
		}
	}
	// Multi-level and other address methods never look like LUN 0..16383.
	for _, raw := range [][8]byte{{0, 0, 0, 1}, {0x80, 1}, {0xc0}, {0x01, 0}} {
		if got := decodeLUN(raw); got < 1<<14 {
			t.Errorf("decodeLUN(%x) = %d", raw, got)
		}
	}
}

func TestSerialWindow(t *testing.T) {
	cases := []struct {
		sn, exp, max uint32
		want         bool
	}{
		{5, 5, 10, true},
		{10, 5, 10, true},
		{11, 5, 10, false},
		{4, 5, 10, false},
		{0, 0xfffffffe, 3, true},
		{0xfffffffd, 0xfffffffe, 3, false},
		{5, 5, 4, false}, // closed window
	}
	for _, c := range cases {
		if got := inWindow(c.sn, c.exp, c.max); got != c.want {
			t.Errorf("inWindow(%d,%d,%d) = %v", c.sn, c.exp, c.max, got)
		}
	}
	if !snLess(0xffffffff, 0) || snLess(0, 0xffffffff) {
		t.Error("snLess wrap")
	}
}

func TestBufPool(t *testing.T) {
	var bp bufPool
	for _, n := range []int{1, 4096, 4097, 1 << 20, 3<<20 + 1} {
		b := bp.get(n)
		if len(b) != n || cap(b)&(cap(b)-1) != 0 {
			t.Fatalf("get(%d): len %d cap %d", n, len(b), cap(b))
		}
		bp.put(b)
	}
}

// FuzzReadPDU feeds arbitrary bytes to the PDU decoder: it must never
// panic nor allocate a data segment beyond the limit.
func FuzzReadPDU(f *testing.F) {
	p := &pdu{}
	p.h[0] = opLoginReq
	p.data = encodeText([]KeyValue{{"InitiatorName", "iqn.x"}})
	f.Add(p.marshal(false, false), false, false)
	f.Add(p.marshal(true, true), true, true)
	p.ahs = []byte{0, 5, 1, 0, 1, 2, 3, 4}
	f.Add(p.marshal(false, false), false, false)
	f.Add(bytes.Repeat([]byte{0xff}, 100), true, false)
	const limit = 4096
	f.Fuzz(func(t *testing.T, b []byte, hd, dd bool) {
		pr := newPDUReader(bytes.NewReader(b), limit)
		pr.hdrDigest, pr.dataDigest = hd, dd
		for range 8 {
			q, err := pr.readPDU()
			if err != nil {
				return
			}
			if len(q.data) > limit || len(q.ahs) > maxAHSLen {
				t.Fatalf("allocated beyond limits: data %d ahs %d", len(q.data), len(q.ahs))
			}
			if q.h.opcode() == opSCSICmd {
				if cdb, err := q.cdb(); err == nil && len(cdb) > 16+maxAHSLen {
					t.Fatalf("cdb %d", len(cdb))
				}
			}
			_ = decodeLUN(q.h.lunRaw())
			if kvs, err := parseText(q.data); err == nil {
				_, _ = newNegotiator(testLimits()).negotiate(kvs, nil)
			}
		}
	})
}

func TestMarshalHeaderFields(t *testing.T) {
	p := &pdu{}
	p.h[0] = opDataIn
	p.data = []byte{1, 2, 3}
	w := p.marshal(false, false)
	if len(w) != bhsLen+4 || w[7] != 3 || binary.BigEndian.Uint32(w[4:8])&0xffffff != 3 {
		t.Fatalf("marshal: %x", w)
	}
}
