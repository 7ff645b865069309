package scsi

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"strings"
	"sync"
	"testing"
)

const (
	testSize = 64 << 20 // 131072 blocks of 512
	nexA     = NexusID("iqn.a,isid1,tpg1")
	nexB     = NexusID("iqn.b,isid2,tpg1")
)

func testConfig() Config {
	return Config{
		Size:                  testSize,
		OptimalTransferBlocks: 8192,
		Serial:                "SER-0001",
		DeviceID:              [16]byte{0xAB, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
		ThinProvisioning:      true,
		WriteCache:            true,
		MaxUnmapBlocks:        65536,
		MaxWriteSameBlocks:    65536,
		MaxTransferBlocks:     8192,
	}
}

func newLU(t testing.TB, cfg Config) (*LU, *memBackend) {
	t.Helper()
	be := newMemBackend(cfg.Size)
	lu, err := NewLU(cfg, be, nil)
	if err != nil {
		t.Fatal(err)
	}
	return lu, be
}

// readyLU returns an LU on which nexA (and nexB) have consumed their
// power-on unit attention.
func readyLU(t testing.TB, cfg Config) (*LU, *memBackend) {
	t.Helper()
	lu, be := newLU(t, cfg)
	for _, n := range []NexusID{nexA, nexB} {
		lu.AddNexus(n)
		r := run(lu, n, cdbTUR(), nil)
		wantSense(t, r, SenseUnitAttention, 0x29, 0x00)
		r = run(lu, n, cdbTUR(), nil)
		wantGood(t, r)
	}
	return lu, be
}

func run(lu *LU, n NexusID, cdb []byte, data []byte) Result {
	return lu.Execute(context.Background(), &Command{Nexus: n, CDB: cdb, DataOut: data, ExpectedLen: 1 << 30})
}

func wantGood(t testing.TB, r Result) {
	t.Helper()
	if r.Status != StatusGood || r.Sense != nil || r.Aborted {
		t.Fatalf("status %#x sense %x, want GOOD", r.Status, r.Sense)
	}
}

func wantSense(t testing.TB, r Result, key, asc, ascq byte) {
	t.Helper()
	if r.Status != StatusCheckCondition {
		t.Fatalf("status %#x, want CHECK CONDITION %x/%02x/%02x", r.Status, key, asc, ascq)
	}
	if len(r.Sense) < 14 || r.Sense[0]&0x7f != 0x70 {
		t.Fatalf("bad sense %x", r.Sense)
	}
	if r.Sense[2]&0x0f != key || r.Sense[12] != asc || r.Sense[13] != ascq {
		t.Fatalf("sense %x/%02x/%02x, want %x/%02x/%02x", r.Sense[2]&0xf, r.Sense[12], r.Sense[13], key, asc, ascq)
	}
	if int(r.Sense[7])+8 != len(r.Sense) {
		t.Fatalf("additional length %d, len %d", r.Sense[7], len(r.Sense))
	}
}

func cdbTUR() []byte { return make([]byte, 6) }

func cdb10(op byte, lba uint32, n uint16) []byte {
	c := make([]byte, 10)
	c[0] = op
	binary.BigEndian.PutUint32(c[2:6], lba)
	binary.BigEndian.PutUint16(c[7:9], n)
	return c
}

func cdb12(op byte, lba uint32, n uint32) []byte {
	c := make([]byte, 12)
	c[0] = op
	binary.BigEndian.PutUint32(c[2:6], lba)
	binary.BigEndian.PutUint32(c[6:10], n)
	return c
}

func cdb16(op byte, lba uint64, n uint32) []byte {
	c := make([]byte, 16)
	c[0] = op
	binary.BigEndian.PutUint64(c[2:10], lba)
	binary.BigEndian.PutUint32(c[10:14], n)
	return c
}

func fill(n int, b byte) []byte { return bytes.Repeat([]byte{b}, n) }

func TestNewLUValidation(t *testing.T) {
	be := newMemBackend(1 << 20)
	for _, c := range []Config{
		{Size: 0},
		{Size: 1000},
		{Size: 1 << 20, LogicalBlockSize: 1024},
		{Size: 1 << 20, Vendor: "much-too-long-vendor"},
		{Size: 1 << 20, Serial: "bad\x01"},
	} {
		if _, err := NewLU(c, be, nil); err == nil {
			t.Errorf("NewLU(%+v) accepted", c)
		}
	}
	if _, err := NewLU(Config{Size: 1 << 20}, nil, nil); err == nil {
		t.Error("nil backend accepted")
	}
	lu, err := NewLU(Config{Size: 1 << 20, LogicalBlockSize: 4096}, be, nil)
	if err != nil || lu.Size() != 1<<20 {
		t.Fatal(err)
	}
}

func TestUnitAttentionFlow(t *testing.T) {
	lu, _ := newLU(t, testConfig())
	lu.AddNexus(nexA)
	// INQUIRY, REPORT LUNS do not consume the UA.
	inq := []byte{opInquiry, 0, 0, 0, 96, 0}
	wantGood(t, run(lu, nexA, inq, nil))
	rl := make([]byte, 12)
	rl[0] = opReportLUNs
	rl[9] = 16
	wantGood(t, run(lu, nexA, rl, nil))
	wantSense(t, run(lu, nexA, cdb10(opRead10, 0, 1), nil), SenseUnitAttention, 0x29, 0)
	wantGood(t, run(lu, nexA, cdb10(opRead10, 0, 1), nil))

	// Unknown nexus: treated as added now.
	wantSense(t, run(lu, "stranger", cdbTUR(), nil), SenseUnitAttention, 0x29, 0)
	wantGood(t, run(lu, "stranger", cdbTUR(), nil))

	// REQUEST SENSE reports and clears the UA.
	lu.AddNexus(nexB)
	r := run(lu, nexB, []byte{opRequestSense, 0, 0, 0, 252, 0}, nil)
	wantGood(t, r)
	if r.DataIn[2]&0xf != SenseUnitAttention || r.DataIn[12] != 0x29 {
		t.Fatalf("request sense %x", r.DataIn)
	}
	r = run(lu, nexB, []byte{opRequestSense, 0, 0, 0, 252, 0}, nil)
	wantGood(t, r)
	if r.DataIn[2]&0xf != SenseNoSense || r.DataIn[12] != 0 {
		t.Fatalf("request sense %x", r.DataIn)
	}

	// Resize: every nexus gets 2A/09.
	if err := lu.Resize(testSize * 2); err != nil {
		t.Fatal(err)
	}
	wantSense(t, run(lu, nexA, cdbTUR(), nil), SenseUnitAttention, 0x2a, 0x09)
	wantSense(t, run(lu, nexB, cdbTUR(), nil), SenseUnitAttention, 0x2a, 0x09)
	wantGood(t, run(lu, nexA, cdbTUR(), nil))
	if lu.Size() != testSize*2 {
		t.Fatal("size not changed")
	}
	if err := lu.Resize(1000); err == nil {
		t.Fatal("bad resize accepted")
	}

	// LU reset: UA 29/03 to the others only.
	lu.Reset(nexA)
	wantGood(t, run(lu, nexA, cdbTUR(), nil))
	wantSense(t, run(lu, nexB, cdbTUR(), nil), SenseUnitAttention, 0x29, 0x03)

	// RemoveNexus then a new command: a fresh nexus, power-on UA again.
	lu.RemoveNexus(nexB)
	wantSense(t, run(lu, nexB, cdbTUR(), nil), SenseUnitAttention, 0x29, 0)
}

func TestOtherLUN(t *testing.T) {
	lu, _ := readyLU(t, testConfig())
	ex := func(cdb []byte) Result {
		return lu.Execute(context.Background(), &Command{Nexus: nexA, LUN: 3, CDB: cdb})
	}
	r := ex([]byte{opInquiry, 0, 0, 0, 96, 0})
	wantGood(t, r)
	if r.DataIn[0] != 0x7f {
		t.Fatalf("peripheral byte %#x", r.DataIn[0])
	}
	rl := make([]byte, 12)
	rl[0] = opReportLUNs
	rl[9] = 64
	wantGood(t, ex(rl))
	r = ex([]byte{opRequestSense, 0, 0, 0, 18, 0})
	wantGood(t, r)
	if r.DataIn[12] != 0x25 {
		t.Fatalf("request sense %x", r.DataIn)
	}
	wantSense(t, ex(cdbTUR()), SenseIllegalRequest, 0x25, 0)
	wantSense(t, ex(cdb10(opRead10, 0, 1)), SenseIllegalRequest, 0x25, 0)
}

func TestReadWrite(t *testing.T) {
	lu, be := readyLU(t, testConfig())
	nb := uint64(testSize / 512)
	data := make([]byte, 8*512)
	for i := range data {
		data[i] = byte(i * 7)
	}
	type rw struct {
		name  string
		write []byte
		read  []byte
	}
	cases := []rw{
		{"6", []byte{opWrite6, 0, 0, 10, 8, 0}, []byte{opRead6, 0, 0, 10, 8, 0}},
		{"10", cdb10(opWrite10, 20, 8), cdb10(opRead10, 20, 8)},
		{"12", cdb12(opWrite12, 30, 8), cdb12(opRead12, 30, 8)},
		{"16", cdb16(opWrite16, nb-8, 8), cdb16(opRead16, nb-8, 8)},
		{"wv10", cdb10(opWriteVerify10, 40, 8), cdb10(opRead10, 40, 8)},
		{"wv12", cdb12(opWriteVerify12, 50, 8), cdb12(opRead12, 50, 8)},
		{"wv16", cdb16(opWriteVerify16, 60, 8), cdb16(opRead16, 60, 8)},
	}
	for _, c := range cases {
		r := run(lu, nexA, c.write, data)
		wantGood(t, r)
		if r.TransferLen != uint32(len(data)) {
			t.Fatalf("%s: write TransferLen %d", c.name, r.TransferLen)
		}
		r = run(lu, nexA, c.read, nil)
		wantGood(t, r)
		if !bytes.Equal(r.DataIn, data) || r.TransferLen != uint32(len(data)) {
			t.Fatalf("%s: read back differs", c.name)
		}
	}
	// FUA goes to the backend; the write cache setting too.
	before := be.fuaN
	c := cdb10(opWrite10, 0, 1)
	c[1] = 0x08
	wantGood(t, run(lu, nexA, c, data[:512]))
	if be.fuaN != before+1 {
		t.Fatal("FUA not passed")
	}
	c[1] = 0x18 // DPO+FUA read
	c[0] = opRead10
	wantGood(t, run(lu, nexA, c, nil))

	// READ6 with 0 length means 256 blocks.
	r := run(lu, nexA, []byte{opRead6, 0, 0, 0, 0, 0}, nil)
	wantGood(t, r)
	if len(r.DataIn) != 256*512 {
		t.Fatalf("read6 0 -> %d bytes", len(r.DataIn))
	}
	// 0 blocks.
	r = run(lu, nexA, cdb10(opRead10, 0, 0), nil)
	wantGood(t, r)
	if len(r.DataIn) != 0 {
		t.Fatal("data for 0 blocks")
	}
	wantGood(t, run(lu, nexA, cdb16(opWrite16, nb, 0), nil))
}

func TestWriteCacheOffForcesFUA(t *testing.T) {
	cfg := testConfig()
	cfg.WriteCache = false
	lu, be := readyLU(t, cfg)
	wantGood(t, run(lu, nexA, cdb10(opWrite10, 0, 1), make([]byte, 512)))
	if be.fuaN != 1 {
		t.Fatal("write not FUA with write cache off")
	}
}

func TestBadCDBs(t *testing.T) {
	lu, _ := readyLU(t, testConfig())
	nb := uint64(testSize / 512)
	rdprotect := cdb10(opRead10, 0, 1)
	rdprotect[1] = 0x20
	reserved := cdb10(opRead10, 0, 1)
	reserved[6] = 0x80
	naca := cdb10(opRead10, 0, 1)
	naca[9] = 0x04
	cases := []struct {
		name           string
		cdb            []byte
		data           []byte
		key, asc, ascq byte
	}{
		{"empty", []byte{}, nil, SenseIllegalRequest, 0x20, 0},
		{"unknown opcode", []byte{0xff, 0, 0, 0, 0, 0}, nil, SenseIllegalRequest, 0x20, 0},
		{"short read10", []byte{opRead10, 0, 0}, nil, SenseIllegalRequest, 0x24, 0},
		{"short read16", cdb10(opRead16, 0, 1), nil, SenseIllegalRequest, 0x24, 0},
		{"rdprotect", rdprotect, nil, SenseIllegalRequest, 0x24, 0},
		{"reserved bits", reserved, nil, SenseIllegalRequest, 0x24, 0},
		{"naca", naca, nil, SenseIllegalRequest, 0x24, 0},
		{"read beyond end", cdb10(opRead10, uint32(nb), 1), nil, SenseIllegalRequest, 0x21, 0},
		{"read crossing end", cdb10(opRead10, uint32(nb-1), 2), nil, SenseIllegalRequest, 0x21, 0},
		{"read16 lba -1", cdb16(opRead16, ^uint64(0), 1), nil, SenseIllegalRequest, 0x21, 0},
		{"read16 0 blocks past end", cdb16(opRead16, nb+1, 0), nil, SenseIllegalRequest, 0x21, 0},
		{"read16 2^63", cdb16(opRead16, 1<<63, 1), nil, SenseIllegalRequest, 0x21, 0},
		{"write beyond end", cdb16(opWrite16, nb, 1), make([]byte, 512), SenseIllegalRequest, 0x21, 0},
		{"read over max transfer", cdb10(opRead10, 0, 8193), nil, SenseIllegalRequest, 0x24, 0},
		{"write over max transfer", cdb12(opWrite12, 0, 8193), nil, SenseIllegalRequest, 0x24, 0},
		{"verify bytchk 2", []byte{opVerify10, 0x04, 0, 0, 0, 0, 0, 0, 1, 0}, nil, SenseIllegalRequest, 0x24, 0},
		{"rc10 lba without pmi", []byte{opReadCapacity10, 0, 0, 0, 0, 1, 0, 0, 0, 0}, nil, SenseIllegalRequest, 0x24, 0},
		{"service action in bad sa", []byte{opServiceActionIn16, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0}, nil, SenseIllegalRequest, 0x24, 0},
		{"inquiry page without evpd", []byte{opInquiry, 0, 0x80, 0, 96, 0}, nil, SenseIllegalRequest, 0x24, 0},
		{"inquiry cmddt", []byte{opInquiry, 0x02, 0, 0, 96, 0}, nil, SenseIllegalRequest, 0x24, 0},
		{"inquiry unknown vpd", []byte{opInquiry, 1, 0x99, 0, 96, 0}, nil, SenseIllegalRequest, 0x24, 0},
		{"report luns alloc 8", []byte{opReportLUNs, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0}, nil, SenseIllegalRequest, 0x24, 0},
		{"mode sense saved", []byte{opModeSense6, 0, 0xc0 | 0x3f, 0, 255, 0}, nil, SenseIllegalRequest, 0x39, 0},
		{"mode sense unknown page", []byte{opModeSense6, 0, 0x01, 0, 255, 0}, nil, SenseIllegalRequest, 0x24, 0},
		{"request sense desc", []byte{opRequestSense, 1, 0, 0, 252, 0}, nil, SenseIllegalRequest, 0x24, 0},
		{"get lba status beyond", cdb16(opServiceActionIn16, nb, 24), nil, SenseIllegalRequest, 0x24, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if c.name == "get lba status beyond" {
				c.cdb[1] = saGetLBAStatus
				c.asc = 0x21
			}
			wantSense(t, run(lu, nexA, c.cdb, c.data), c.key, c.asc, c.ascq)
		})
	}
}

func TestWriteResiduals(t *testing.T) {
	lu, _ := readyLU(t, testConfig())
	wantGood(t, run(lu, nexA, cdb10(opWrite10, 0, 2), fill(1024, 'a')))
	// The initiator sent one block of two: only that block is written.
	r := run(lu, nexA, cdb10(opWrite10, 0, 2), fill(512, 'b'))
	wantGood(t, r)
	if r.TransferLen != 1024 {
		t.Fatalf("TransferLen %d", r.TransferLen)
	}
	r = run(lu, nexA, cdb10(opRead10, 0, 2), nil)
	if !bytes.Equal(r.DataIn, append(fill(512, 'b'), fill(512, 'a')...)) {
		t.Fatal("wrong data after short write")
	}
	// Sent more than the CDB says: only the CDB's blocks are written.
	wantGood(t, run(lu, nexA, cdb10(opWrite10, 0, 1), fill(1024, 'c')))
	r = run(lu, nexA, cdb10(opRead10, 0, 2), nil)
	if !bytes.Equal(r.DataIn, append(fill(512, 'c'), fill(512, 'a')...)) {
		t.Fatal("wrote beyond the transfer length")
	}
	// Nothing or a partial block sent: GOOD, nothing written.
	wantGood(t, run(lu, nexA, cdb10(opWrite10, 0, 1), nil))
	wantGood(t, run(lu, nexA, cdb10(opWrite10, 0, 1), fill(200, 'd')))
	r = run(lu, nexA, cdb10(opRead10, 0, 1), nil)
	if !bytes.Equal(r.DataIn, fill(512, 'c')) {
		t.Fatal("partial block written")
	}
}

func TestReadOnly(t *testing.T) {
	cfg := testConfig()
	cfg.ReadOnly = true
	lu, _ := readyLU(t, cfg)
	for _, c := range [][]byte{
		cdb10(opWrite10, 0, 1), cdb16(opWrite16, 0, 1), cdb10(opWriteSame10, 0, 1),
		cdb10(opUnmap, 0, 24), cdb16(opCompareAndWrite, 0, 0),
	} {
		if c[0] == opCompareAndWrite {
			c[13] = 1
		}
		wantSense(t, run(lu, nexA, c, make([]byte, 1024)), SenseDataProtect, 0x27, 0)
	}
	wantGood(t, run(lu, nexA, cdb10(opRead10, 0, 1), nil))
	r := run(lu, nexA, []byte{opModeSense6, 0, 0x3f, 0, 255, 0}, nil)
	if r.DataIn[2]&0x80 == 0 {
		t.Fatal("WP not set")
	}
}

func TestBackendErrors(t *testing.T) {
	lu, be := readyLU(t, testConfig())
	be.failOff, be.failErr = 512*5, errInjected
	wantSense(t, run(lu, nexA, cdb10(opRead10, 4, 2), nil), SenseMediumError, 0x11, 0)
	wantSense(t, run(lu, nexA, cdb10(opWrite10, 4, 2), make([]byte, 1024)), SenseMediumError, 0x0c, 0)
	be.failErr = &SenseError{Key: SenseNotReady, ASC: 0x04, ASCQ: 0x01, Err: errInjected}
	wantSense(t, run(lu, nexA, cdb10(opRead10, 4, 2), nil), SenseNotReady, 0x04, 0x01)
	be.failErr = nil
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r := lu.Execute(ctx, &Command{Nexus: nexA, CDB: cdb10(opRead10, 0, 1)})
	if !r.Aborted {
		t.Fatal("cancelled read not aborted")
	}
}

func TestInquiry(t *testing.T) {
	lu, _ := readyLU(t, testConfig())
	r := run(lu, nexA, []byte{opInquiry, 0, 0, 0, 255, 0}, nil)
	wantGood(t, r)
	d := r.DataIn
	if len(d) != 96 || d[0] != 0 || d[2] != 6 || d[3]&0x0f != 2 || int(d[4]) != len(d)-5 {
		t.Fatalf("standard inquiry %x", d)
	}
	if string(d[8:16]) != "UKAI    " || string(d[16:32]) != "ukai-image      " || string(d[32:36]) != "0001" {
		t.Fatalf("identification %q", d[8:36])
	}
	vers := map[uint16]bool{}
	for i := 58; i < 74; i += 2 {
		vers[binary.BigEndian.Uint16(d[i:])] = true
	}
	for _, v := range []uint16{verSAM5, verSPC4, verSBC3, verISCSI} {
		if !vers[v] {
			t.Errorf("version descriptor %#x missing", v)
		}
	}
	// Allocation length honoured.
	for _, n := range []byte{0, 1, 5, 36} {
		r := run(lu, nexA, []byte{opInquiry, 0, 0, 0, n, 0}, nil)
		wantGood(t, r)
		if len(r.DataIn) != int(n) || r.TransferLen != uint32(n) {
			t.Fatalf("alloc %d: got %d", n, len(r.DataIn))
		}
	}
	vpd := func(page byte) []byte {
		r := run(lu, nexA, []byte{opInquiry, 1, page, 0x10, 0, 0}, nil)
		wantGood(t, r)
		if r.DataIn[1] != page || int(binary.BigEndian.Uint16(r.DataIn[2:4]))+4 != len(r.DataIn) {
			t.Fatalf("vpd %#x header %x", page, r.DataIn)
		}
		return r.DataIn
	}
	if p := vpd(0); !bytes.Equal(p[4:], []byte{0, 0x80, 0x83, 0xb0, 0xb1, 0xb2}) {
		t.Fatalf("supported pages %x", p)
	}
	if p := vpd(0x80); string(p[4:]) != "SER-0001" {
		t.Fatalf("serial %q", p[4:])
	}
	p := vpd(0x83)
	var naa, t10 bool
	for off := 4; off+4 <= len(p); {
		l := int(p[off+3])
		desc := p[off : off+4+l]
		switch desc[1] & 0x0f {
		case 3:
			naa = desc[0]&0x0f == 1 && l == 16 && desc[4]>>4 == 6 && desc[4]&0xf == 0xB && desc[5] == 1
		case 1:
			t10 = desc[0]&0x0f == 2 && string(desc[4:12]) == "UKAI    "
		}
		if desc[1]&0x30 != 0 {
			t.Fatal("designator not associated with the LU")
		}
		off += 4 + l
	}
	if !naa || !t10 {
		t.Fatalf("designators %x", p)
	}
	p = vpd(0xb0)
	if p[4]&1 != 1 || p[5] != 255 || binary.BigEndian.Uint16(p[6:8]) != 8192 ||
		binary.BigEndian.Uint32(p[8:12]) != 8192 || binary.BigEndian.Uint32(p[20:24]) != 65536 ||
		binary.BigEndian.Uint32(p[24:28]) != maxUnmapDescriptors || binary.BigEndian.Uint64(p[36:44]) != 65536 {
		t.Fatalf("block limits %x", p)
	}
	p = vpd(0xb1)
	if binary.BigEndian.Uint16(p[4:6]) != 1 {
		t.Fatalf("rotation rate %x", p)
	}
	p = vpd(0xb2)
	if p[5]&0xe0 != 0xe0 || p[6]&7 != 2 {
		t.Fatalf("lbp %x", p)
	}
	// Identical identity on another node serving the same image.
	lu2, _ := readyLU(t, testConfig())
	r2 := run(lu2, nexA, []byte{opInquiry, 1, 0x83, 1, 0, 0}, nil)
	r1 := run(lu, nexA, []byte{opInquiry, 1, 0x83, 1, 0, 0}, nil)
	if !bytes.Equal(r1.DataIn, r2.DataIn) {
		t.Fatal("device identification differs between LUs of the same image")
	}
}

func TestReadCapacity(t *testing.T) {
	cfg := testConfig()
	lu, _ := readyLU(t, cfg)
	r := run(lu, nexA, make([]byte, 10), nil)
	_ = r
	c := make([]byte, 10)
	c[0] = opReadCapacity10
	r = run(lu, nexA, c, nil)
	wantGood(t, r)
	if binary.BigEndian.Uint32(r.DataIn[0:4]) != testSize/512-1 || binary.BigEndian.Uint32(r.DataIn[4:8]) != 512 {
		t.Fatalf("rc10 %x", r.DataIn)
	}
	c16 := make([]byte, 16)
	c16[0], c16[1], c16[13] = opServiceActionIn16, saReadCapacity16, 32
	r = run(lu, nexA, c16, nil)
	wantGood(t, r)
	if binary.BigEndian.Uint64(r.DataIn[0:8]) != testSize/512-1 || binary.BigEndian.Uint32(r.DataIn[8:12]) != 512 || r.DataIn[14]&0xc0 != 0xc0 {
		t.Fatalf("rc16 %x", r.DataIn)
	}
	c16[13] = 12
	r = run(lu, nexA, c16, nil)
	wantGood(t, r)
	if len(r.DataIn) != 12 {
		t.Fatal("rc16 alloc not honoured")
	}
	// Huge LU: RC10 saturates.
	cfg.Size = 4 << 40
	big, _ := newLU(t, cfg)
	r = run(big, nexA, c, nil)
	r = run(big, nexA, c, nil)
	if binary.BigEndian.Uint32(r.DataIn[0:4]) != 0xffffffff {
		t.Fatalf("rc10 big %x", r.DataIn)
	}
}

func TestModeSense(t *testing.T) {
	lu, _ := readyLU(t, testConfig())
	r := run(lu, nexA, []byte{opModeSense6, 0, 0x3f, 0, 255, 0}, nil)
	wantGood(t, r)
	d := r.DataIn
	if int(d[0]) != len(d)-1 || d[2]&0x10 == 0 || d[3] != 8 {
		t.Fatalf("mode sense6 header %x", d[:4])
	}
	if binary.BigEndian.Uint32(d[4:8]) != testSize/512 || binary.BigEndian.Uint32(d[8:12])&0xffffff != 512 {
		t.Fatalf("block descriptor %x", d[4:12])
	}
	pages := map[byte][]byte{}
	for off := 12; off < len(d); off += int(d[off+1]) + 2 {
		pages[d[off]&0x3f] = d[off : off+int(d[off+1])+2]
	}
	if c := pages[0x08]; c == nil || c[2]&0x04 == 0 {
		t.Fatalf("caching page %x", c)
	}
	if pages[0x0a] == nil || pages[0x1c] == nil {
		t.Fatal("control/IE page missing")
	}
	// Truncation.
	r = run(lu, nexA, []byte{opModeSense6, 0, 0x3f, 0, 4, 0}, nil)
	wantGood(t, r)
	if len(r.DataIn) != 4 || r.TransferLen != 4 {
		t.Fatal("truncation")
	}
	// DBD, single page, MODE SENSE(10) with LLBAA.
	r = run(lu, nexA, []byte{opModeSense6, 0x08, 0x08, 0, 255, 0}, nil)
	wantGood(t, r)
	if r.DataIn[3] != 0 || len(r.DataIn) != 4+20 || r.DataIn[4] != 0x08 {
		t.Fatalf("dbd caching %x", r.DataIn)
	}
	r = run(lu, nexA, []byte{opModeSense10, 0x10, 0x0a, 0, 0, 0, 0, 1, 0, 0}, nil)
	wantGood(t, r)
	d = r.DataIn
	if binary.BigEndian.Uint16(d[0:2]) != uint16(len(d)-2) || d[4]&1 != 1 || binary.BigEndian.Uint16(d[6:8]) != 16 || d[24] != 0x0a {
		t.Fatalf("mode sense10 %x", d)
	}
	// Write cache off reflected.
	cfg := testConfig()
	cfg.WriteCache = false
	lu2, _ := readyLU(t, cfg)
	r = run(lu2, nexA, []byte{opModeSense6, 0x08, 0x08, 0, 255, 0}, nil)
	if r.DataIn[6]&0x04 != 0 {
		t.Fatal("WCE set with write cache off")
	}
}

func TestModeSelect(t *testing.T) {
	lu, _ := readyLU(t, testConfig())
	r := run(lu, nexA, []byte{opModeSense6, 0x08, 0x08, 0, 255, 0}, nil)
	page := append([]byte(nil), r.DataIn...)
	page[0] = 0 // mode data length is reserved in MODE SELECT
	// Identical caching page: accepted.
	wantGood(t, run(lu, nexA, []byte{opModeSelect6, 0x10, 0, 0, byte(len(page)), 0}, page))
	// Turning WCE off: refused.
	page[4+2] &^= 0x04
	wantSense(t, run(lu, nexA, []byte{opModeSelect6, 0x10, 0, 0, byte(len(page)), 0}, page), SenseIllegalRequest, 0x26, 0)
	// SP not supported.
	wantSense(t, run(lu, nexA, []byte{opModeSelect6, 0x11, 0, 0, 0, 0}, nil), SenseIllegalRequest, 0x24, 0)
	wantGood(t, run(lu, nexA, []byte{opModeSelect10, 0x10, 0, 0, 0, 0, 0, 0, 0, 0}, nil))
}

func TestVerify(t *testing.T) {
	lu, _ := readyLU(t, testConfig())
	data := fill(4*512, 'v')
	wantGood(t, run(lu, nexA, cdb10(opWrite10, 100, 4), data))
	for _, mk := range []func(byte) []byte{
		func(b byte) []byte { c := cdb10(opVerify10, 100, 4); c[1] = b; return c },
		func(b byte) []byte { c := cdb12(opVerify12, 100, 4); c[1] = b; return c },
		func(b byte) []byte { c := cdb16(opVerify16, 100, 4); c[1] = b; return c },
	} {
		wantGood(t, run(lu, nexA, mk(0), nil))
		wantGood(t, run(lu, nexA, mk(0x02), data))
		bad := append([]byte(nil), data...)
		bad[3*512+17] = 'x'
		r := run(lu, nexA, mk(0x02), bad)
		wantSense(t, r, SenseMiscompare, 0x1d, 0)
		if r.Sense[0]&0x80 == 0 || binary.BigEndian.Uint32(r.Sense[3:7]) != 3*512+17 {
			t.Fatalf("miscompare info %x", r.Sense)
		}
		// BYTCHK=0 ignores data differences.
		wantGood(t, run(lu, nexA, mk(0), bad))
		// BYTCHK=3: one block compared with each.
		wantGood(t, run(lu, nexA, mk(0x06), data[:512]))
	}
	wantSense(t, run(lu, nexA, cdb10(opVerify10, uint32(testSize/512-1), 2), nil), SenseIllegalRequest, 0x21, 0)
}

func TestSyncPrefetchStartStop(t *testing.T) {
	lu, be := readyLU(t, testConfig())
	nb := uint64(testSize / 512)
	wantGood(t, run(lu, nexA, cdb10(opSyncCache10, 0, 0), nil))
	wantGood(t, run(lu, nexA, cdb16(opSyncCache16, 0, 10), nil))
	if be.flushes != 2 {
		t.Fatalf("flushes %d", be.flushes)
	}
	wantSense(t, run(lu, nexA, cdb16(opSyncCache16, nb, 1), nil), SenseIllegalRequest, 0x21, 0)
	for _, c := range [][]byte{cdb10(opPrefetch10, 0, 16), cdb16(opPrefetch16, nb-1, 1), cdb16(opPrefetch16, nb, 0)} {
		if r := run(lu, nexA, c, nil); r.Status != StatusConditionMet || r.Sense != nil {
			t.Fatalf("prefetch %x: %+v", c, r)
		}
	}
	wantSense(t, run(lu, nexA, cdb16(opPrefetch16, nb, 1), nil), SenseIllegalRequest, 0x21, 0)
	wantGood(t, run(lu, nexA, []byte{opStartStopUnit, 0, 0, 0, 1, 0}, nil))
	wantGood(t, run(lu, nexA, []byte{opStartStopUnit, 1, 0, 0, 0, 0}, nil))
	wantSense(t, run(lu, nexA, []byte{opStartStopUnit, 1, 0, 0, 2, 0}, nil), SenseIllegalRequest, 0x24, 0)
	wantGood(t, run(lu, nexA, []byte{opPreventAllow, 0, 0, 0, 1, 0}, nil))
}

func unmapList(descs ...[2]uint64) []byte {
	d := make([]byte, 8+16*len(descs))
	binary.BigEndian.PutUint16(d[0:2], uint16(len(d)-2))
	binary.BigEndian.PutUint16(d[2:4], uint16(16*len(descs)))
	for i, x := range descs {
		binary.BigEndian.PutUint64(d[8+16*i:], x[0])
		binary.BigEndian.PutUint32(d[16+16*i:], uint32(x[1]))
	}
	return d
}

func unmapCDB(plen int) []byte {
	c := make([]byte, 10)
	c[0] = opUnmap
	binary.BigEndian.PutUint16(c[7:9], uint16(plen))
	return c
}

func TestUnmap(t *testing.T) {
	lu, be := readyLU(t, testConfig())
	nb := uint64(testSize / 512)
	wantGood(t, run(lu, nexA, cdb10(opWrite10, 0, 256), fill(256*512, 'a')))
	l := unmapList([2]uint64{0, 100}, [2]uint64{200, 10}, [2]uint64{nb, 0})
	r := run(lu, nexA, unmapCDB(len(l)), l)
	wantGood(t, r)
	r = run(lu, nexA, cdb10(opRead10, 0, 256), nil)
	want := fill(256*512, 'a')
	clear(want[:100*512])
	clear(want[200*512 : 210*512])
	if !bytes.Equal(r.DataIn, want) {
		t.Fatal("unmapped blocks do not read as zeros")
	}
	if be.unmaps != 2 {
		t.Fatalf("backend unmaps %d", be.unmaps)
	}
	// 0 param length, no descriptors.
	wantGood(t, run(lu, nexA, unmapCDB(0), nil))
	wantGood(t, run(lu, nexA, unmapCDB(8), unmapList()))
	// 256 descriptors of one block each.
	var many [][2]uint64
	for i := uint64(0); i < 256; i++ {
		many = append(many, [2]uint64{i, 1})
	}
	l = unmapList(many...)
	wantGood(t, run(lu, nexA, unmapCDB(len(l)), l))
	// Errors.
	wantSense(t, run(lu, nexA, unmapCDB(4), make([]byte, 4)), SenseIllegalRequest, 0x1a, 0)
	l = unmapList([2]uint64{nb - 1, 2})
	wantSense(t, run(lu, nexA, unmapCDB(len(l)), l), SenseIllegalRequest, 0x21, 0)
	l = unmapList([2]uint64{0, 65537})
	wantSense(t, run(lu, nexA, unmapCDB(len(l)), l), SenseIllegalRequest, 0x26, 0)
	var tooMany [][2]uint64
	for i := 0; i <= maxUnmapDescriptors; i++ {
		tooMany = append(tooMany, [2]uint64{0, 1})
	}
	l = unmapList(tooMany...)
	wantSense(t, run(lu, nexA, unmapCDB(len(l)), l), SenseIllegalRequest, 0x26, 0)
	c := unmapCDB(24)
	c[1] = 1 // ANCHOR
	wantSense(t, run(lu, nexA, c, unmapList([2]uint64{0, 1})), SenseIllegalRequest, 0x24, 0)

	// Without thin provisioning UNMAP does not exist.
	cfg := testConfig()
	cfg.ThinProvisioning = false
	thick, _ := readyLU(t, cfg)
	wantSense(t, run(thick, nexA, unmapCDB(24), unmapList([2]uint64{0, 1})), SenseIllegalRequest, 0x20, 0)
}

func TestWriteSame(t *testing.T) {
	lu, be := readyLU(t, testConfig())
	nb := uint64(testSize / 512)
	blk := fill(512, 'w')
	wantGood(t, run(lu, nexA, cdb10(opWriteSame10, 10, 20), blk))
	r := run(lu, nexA, cdb10(opRead10, 9, 22), nil)
	want := append(append(make([]byte, 512), fill(20*512, 'w')...), make([]byte, 512)...)
	if !bytes.Equal(r.DataIn, want) {
		t.Fatal("write same 10 data")
	}
	// Large: crosses the chunk size.
	wantGood(t, run(lu, nexA, cdb16(opWriteSame16, 1000, 65536), blk))
	r = run(lu, nexA, cdb16(opRead16, 1000+65536-8192, 8192), nil)
	if !bytes.Equal(r.DataIn, fill(8192*512, 'w')) {
		t.Fatal("write same 16 data")
	}
	// UNMAP bit with zeros -> Backend.Unmap.
	u := be.unmaps
	c := cdb16(opWriteSame16, 1000, 65536)
	c[1] = 0x08
	wantGood(t, run(lu, nexA, c, make([]byte, 512)))
	if be.unmaps != u+1 {
		t.Fatal("write same unmap did not unmap")
	}
	r = run(lu, nexA, cdb16(opRead16, 1000, 8), nil)
	if !AllZero(r.DataIn) {
		t.Fatal("not zero after write same unmap")
	}
	// UNMAP bit with data: written.
	c = cdb10(opWriteSame10, 5, 1)
	c[1] = 0x08
	wantGood(t, run(lu, nexA, c, blk))
	// NDOB.
	c = cdb16(opWriteSame16, 10, 20)
	c[1] = 0x01
	r = run(lu, nexA, c, nil)
	wantGood(t, r)
	if r.TransferLen != 0 {
		t.Fatal("NDOB transfer length")
	}
	r = run(lu, nexA, cdb10(opRead10, 10, 20), nil)
	if !AllZero(r.DataIn) {
		t.Fatal("NDOB did not zero")
	}
	// Errors.
	wantSense(t, run(lu, nexA, cdb10(opWriteSame10, 0, 0), blk), SenseIllegalRequest, 0x24, 0) // WSNZ
	wantSense(t, run(lu, nexA, cdb16(opWriteSame16, nb+1, 1), blk), SenseIllegalRequest, 0x21, 0)
	wantSense(t, run(lu, nexA, cdb16(opWriteSame16, 1<<63, 1), blk), SenseIllegalRequest, 0x21, 0)
	wantSense(t, run(lu, nexA, cdb16(opWriteSame16, 0, 65537), blk), SenseIllegalRequest, 0x24, 0)
	wantSense(t, run(lu, nexA, cdb10(opWriteSame10, 0, 1), blk[:256]), SenseIllegalRequest, 0x24, 0)
	wantSense(t, run(lu, nexA, cdb10(opWriteSame10, 0, 1), fill(1024, 1)), SenseIllegalRequest, 0x24, 0)
	c = cdb10(opWriteSame10, 0, 1)
	c[1] = 0x10 // ANCHOR
	wantSense(t, run(lu, nexA, c, blk), SenseIllegalRequest, 0x24, 0)
}

func cawCDB(lba uint64, n byte) []byte {
	c := make([]byte, 16)
	c[0] = opCompareAndWrite
	binary.BigEndian.PutUint64(c[2:10], lba)
	c[13] = n
	return c
}

func TestCompareAndWrite(t *testing.T) {
	lu, _ := readyLU(t, testConfig())
	nb := uint64(testSize / 512)
	wantGood(t, run(lu, nexA, cdb10(opWrite10, 0, 4), fill(4*512, 'A')))
	data := append(fill(4*512, 'A'), fill(4*512, 'B')...)
	r := run(lu, nexA, cawCDB(0, 4), data)
	wantGood(t, r)
	if r.TransferLen != 8*512 {
		t.Fatalf("TransferLen %d", r.TransferLen)
	}
	r = run(lu, nexA, cdb10(opRead10, 0, 4), nil)
	if !bytes.Equal(r.DataIn, fill(4*512, 'B')) {
		t.Fatal("caw did not write")
	}
	// Miscompare: nothing written, offset reported.
	data = append(fill(4*512, 'B'), fill(4*512, 'C')...)
	data[4*512-27] = 'x'
	r = run(lu, nexA, cawCDB(0, 4), data)
	wantSense(t, r, SenseMiscompare, 0x1d, 0)
	if binary.BigEndian.Uint32(r.Sense[3:7]) != 4*512-27 {
		t.Fatalf("miscompare offset %d", binary.BigEndian.Uint32(r.Sense[3:7]))
	}
	r = run(lu, nexA, cdb10(opRead10, 0, 4), nil)
	if !bytes.Equal(r.DataIn, fill(4*512, 'B')) {
		t.Fatal("caw wrote after miscompare")
	}
	wantGood(t, run(lu, nexA, cawCDB(0, 0), nil))
	wantSense(t, run(lu, nexA, cawCDB(nb-1, 2), make([]byte, 2048)), SenseIllegalRequest, 0x21, 0)
	wantSense(t, run(lu, nexA, cawCDB(0, 2), make([]byte, 1024)), SenseIllegalRequest, 0x24, 0)
	wantSense(t, run(lu, nexA, cawCDB(0, 1), make([]byte, 2048)), SenseIllegalRequest, 0x24, 0)
	wantSense(t, run(lu, nexA, cawCDB(0, 1), make([]byte, 1024)), SenseMiscompare, 0x1d, 0)
}

// TestCompareAndWriteAtomic runs CAW increments against concurrent
// ordinary writes elsewhere and checks no increment is lost.
func TestCompareAndWriteAtomic(t *testing.T) {
	lu, _ := readyLU(t, testConfig())
	wantGood(t, run(lu, nexA, cdb10(opWrite10, 0, 1), make([]byte, 512)))
	const workers, per = 4, 50
	var wg sync.WaitGroup
	stop := make(chan struct{})
	go func() {
		buf := make([]byte, 512)
		for {
			select {
			case <-stop:
				return
			default:
				run(lu, nexB, cdb10(opWrite10, 1, 1), buf)
			}
		}
	}()
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for done := 0; done < per; {
				r := run(lu, nexA, cdb10(opRead10, 0, 1), nil)
				cur := binary.BigEndian.Uint32(r.DataIn)
				data := make([]byte, 1024)
				copy(data, r.DataIn)
				binary.BigEndian.PutUint32(data[512:], cur+1)
				r = run(lu, nexA, cawCDB(0, 1), data)
				if r.Status == StatusGood {
					done++
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	r := run(lu, nexA, cdb10(opRead10, 0, 1), nil)
	if got := binary.BigEndian.Uint32(r.DataIn); got != workers*per {
		t.Fatalf("counter %d, want %d", got, workers*per)
	}
}

func TestReserve6(t *testing.T) {
	lu, _ := readyLU(t, testConfig())
	res := []byte{opReserve6, 0, 0, 0, 0, 0}
	rel := []byte{opRelease6, 0, 0, 0, 0, 0}
	wantGood(t, run(lu, nexA, res, nil))
	wantGood(t, run(lu, nexA, res, nil))
	if r := run(lu, nexB, res, nil); r.Status != StatusReservationConflict {
		t.Fatal("second reserve not in conflict")
	}
	wantGood(t, run(lu, nexB, rel, nil)) // no-op
	wantGood(t, run(lu, nexA, []byte{opModeSense6, 0, 0x3f, 0, 255, 0}, nil))
	if r := run(lu, nexB, []byte{opModeSense6, 0, 0x3f, 0, 255, 0}, nil); r.Status != StatusReservationConflict || r.Sense != nil {
		t.Fatal("mode sense from other nexus not in conflict")
	}
	if r := run(lu, nexB, cdb10(opWrite10, 0, 1), make([]byte, 512)); r.Status != StatusReservationConflict {
		t.Fatal("write from other nexus not in conflict")
	}
	wantGood(t, run(lu, nexB, []byte{opInquiry, 0, 0, 0, 96, 0}, nil))
	wantGood(t, run(lu, nexA, rel, nil))
	wantGood(t, run(lu, nexB, []byte{opReserve10, 0, 0, 0, 0, 0, 0, 0, 0, 0}, nil))
	// Session loss releases it.
	lu.RemoveNexus(nexB)
	lu.AddNexus(nexB)
	run(lu, nexA, cdbTUR(), nil)
	wantGood(t, run(lu, nexA, res, nil))
	// LU reset clears it.
	lu.Reset(nexB)
	run(lu, nexB, cdbTUR(), nil)
	wantGood(t, run(lu, nexB, res, nil))
}

func proutCDB(sa, typ byte) []byte {
	c := make([]byte, 10)
	c[0], c[1], c[2] = opPROut, sa, typ
	c[8] = 24
	return c
}

func proutData(key, sakey uint64) []byte {
	d := make([]byte, 24)
	binary.BigEndian.PutUint64(d[0:8], key)
	binary.BigEndian.PutUint64(d[8:16], sakey)
	return d
}

func prin(t *testing.T, lu *LU, n NexusID, sa byte) []byte {
	t.Helper()
	c := make([]byte, 10)
	c[0], c[1], c[8] = opPRIn, sa, 255
	r := run(lu, n, c, nil)
	wantGood(t, r)
	return r.DataIn
}

func TestPersistentReservations(t *testing.T) {
	lu, _ := readyLU(t, testConfig())
	const ka, kb = 0xaaaa, 0xbbbb
	wantGood(t, run(lu, nexA, proutCDB(proutRegister, 0), proutData(0, ka)))
	wantGood(t, run(lu, nexB, proutCDB(proutRegisterIgnore, 0), proutData(0, kb)))
	// Wrong key for REGISTER.
	if r := run(lu, nexB, proutCDB(proutRegister, 0), proutData(123, kb)); r.Status != StatusReservationConflict {
		t.Fatal("register with wrong key accepted")
	}
	keys := prin(t, lu, nexA, prinReadKeys)
	if binary.BigEndian.Uint32(keys[4:8]) != 16 {
		t.Fatalf("read keys %x", keys)
	}
	// Reserve write exclusive by A.
	wantGood(t, run(lu, nexA, proutCDB(proutReserve, prWriteExclusive), proutData(ka, 0)))
	rr := prin(t, lu, nexB, prinReadReservation)
	if binary.BigEndian.Uint32(rr[4:8]) != 16 || binary.BigEndian.Uint64(rr[8:16]) != ka || rr[21] != prWriteExclusive {
		t.Fatalf("read reservation %x", rr)
	}
	wantGood(t, run(lu, nexB, cdb10(opRead10, 0, 1), nil))
	if r := run(lu, nexB, cdb10(opWrite10, 0, 1), make([]byte, 512)); r.Status != StatusReservationConflict {
		t.Fatal("write by non-holder under WE")
	}
	wantGood(t, run(lu, nexA, cdb10(opWrite10, 0, 1), make([]byte, 512)))
	if r := run(lu, nexB, proutCDB(proutReserve, prWriteExclusive), proutData(kb, 0)); r.Status != StatusReservationConflict {
		t.Fatal("second reserve accepted")
	}
	// RESERVE(6) conflicts with PR.
	if r := run(lu, nexA, []byte{opReserve6, 0, 0, 0, 0, 0}, nil); r.Status != StatusReservationConflict {
		t.Fatal("reserve6 under PR")
	}
	// Release with wrong type.
	wantSense(t, run(lu, nexA, proutCDB(proutRelease, prExclusiveAccess), proutData(ka, 0)), SenseIllegalRequest, 0x26, 0x04)
	wantGood(t, run(lu, nexA, proutCDB(proutRelease, prWriteExclusive), proutData(ka, 0)))
	wantGood(t, run(lu, nexB, cdb10(opWrite10, 0, 1), make([]byte, 512)))

	// EA registrants only: registered B can write, unregistered cannot.
	wantGood(t, run(lu, nexA, proutCDB(proutReserve, prExclusiveAccessRO), proutData(ka, 0)))
	wantGood(t, run(lu, nexB, cdb10(opWrite10, 0, 1), make([]byte, 512)))
	wantGood(t, run(lu, nexB, proutCDB(proutRegister, 0), proutData(kb, 0))) // unregister
	if r := run(lu, nexB, cdb10(opRead10, 0, 1), nil); r.Status != StatusReservationConflict {
		t.Fatal("read by non-registrant under EA_RO")
	}
	// B registers again and preempts A.
	wantGood(t, run(lu, nexB, proutCDB(proutRegister, 0), proutData(0, kb)))
	wantGood(t, run(lu, nexB, proutCDB(proutPreempt, prExclusiveAccess), proutData(kb, ka)))
	wantSense(t, run(lu, nexA, cdbTUR(), nil), SenseUnitAttention, 0x2a, 0x05)
	if r := run(lu, nexA, cdb10(opRead10, 0, 1), nil); r.Status != StatusReservationConflict {
		t.Fatal("preempted A can still read under EA")
	}
	keys = prin(t, lu, nexA, prinReadKeys)
	if binary.BigEndian.Uint32(keys[4:8]) != 8 || binary.BigEndian.Uint64(keys[8:16]) != kb {
		t.Fatalf("keys after preempt %x", keys)
	}
	// All registrants: key 0 in READ RESERVATION.
	wantGood(t, run(lu, nexB, proutCDB(proutRelease, prExclusiveAccess), proutData(kb, 0)))
	wantGood(t, run(lu, nexA, proutCDB(proutRegister, 0), proutData(0, ka)))
	wantGood(t, run(lu, nexA, proutCDB(proutReserve, prWriteExclusiveAllRg), proutData(ka, 0)))
	rr = prin(t, lu, nexB, prinReadReservation)
	if binary.BigEndian.Uint64(rr[8:16]) != 0 || rr[21] != prWriteExclusiveAllRg {
		t.Fatalf("read reservation all registrants %x", rr)
	}
	wantGood(t, run(lu, nexB, cdb10(opWrite10, 0, 1), make([]byte, 512)))
	// CLEAR.
	gen := binary.BigEndian.Uint32(prin(t, lu, nexA, prinReadKeys)[0:4])
	wantGood(t, run(lu, nexA, proutCDB(proutClear, 0), proutData(ka, 0)))
	keys = prin(t, lu, nexA, prinReadKeys)
	if binary.BigEndian.Uint32(keys[4:8]) != 0 || binary.BigEndian.Uint32(keys[0:4]) <= gen {
		t.Fatalf("keys after clear %x", keys)
	}
	if rr := prin(t, lu, nexA, prinReadReservation); binary.BigEndian.Uint32(rr[4:8]) != 0 {
		t.Fatal("reservation after clear")
	}
	caps := prin(t, lu, nexA, prinReportCapabilities)
	if binary.BigEndian.Uint16(caps[0:2]) != 8 || caps[3]&0x80 == 0 {
		t.Fatalf("capabilities %x", caps)
	}
	// Parameter list length and APTPL.
	c := proutCDB(proutRegister, 0)
	c[8] = 20
	wantSense(t, run(lu, nexA, c, make([]byte, 20)), SenseIllegalRequest, 0x1a, 0)
	d := proutData(0, 5)
	d[20] = 1
	wantSense(t, run(lu, nexA, proutCDB(proutRegister, 0), d), SenseIllegalRequest, 0x26, 0)
}

func TestReportSupportedOpcodes(t *testing.T) {
	lu, _ := readyLU(t, testConfig())
	c := make([]byte, 12)
	c[0], c[1] = opMaintenanceIn, saReportSupported
	binary.BigEndian.PutUint32(c[6:10], 65535)
	r := run(lu, nexA, c, nil)
	wantGood(t, r)
	d := r.DataIn
	if int(binary.BigEndian.Uint32(d[0:4])) != len(d)-4 || (len(d)-4)%8 != 0 {
		t.Fatalf("all commands header %x", d[:8])
	}
	type key struct {
		op byte
		sa uint16
	}
	seen := map[key]bool{}
	for off := 4; off < len(d); off += 8 {
		seen[key{d[off], binary.BigEndian.Uint16(d[off+2:])}] = true
		op, sa, servactv := d[off], binary.BigEndian.Uint16(d[off+2:]), d[off+5]&1 != 0
		// One command for each.
		q := make([]byte, 12)
		q[0], q[1] = opMaintenanceIn, saReportSupported
		q[2] = 1
		if servactv {
			q[2] = 2
		}
		q[3] = op
		binary.BigEndian.PutUint16(q[4:6], sa)
		binary.BigEndian.PutUint32(q[6:10], 255)
		r := run(lu, nexA, q, nil)
		wantGood(t, r)
		if r.DataIn[1]&7 != 3 || r.DataIn[4] != op || int(binary.BigEndian.Uint16(r.DataIn[2:4])) != int(binary.BigEndian.Uint16(d[off+6:])) {
			t.Fatalf("one command %#x/%#x: %x", op, sa, r.DataIn)
		}
		// The wrong reporting option is refused.
		if servactv {
			q[2] = 1
		} else {
			q[2] = 2
		}
		wantSense(t, run(lu, nexA, q, nil), SenseIllegalRequest, 0x24, 0)
	}
	for _, k := range []key{{opRead10, 0}, {opWrite16, 0}, {opServiceActionIn16, saReadCapacity16}, {opPROut, proutPreempt}, {opUnmap, 0}} {
		if !seen[k] {
			t.Errorf("%#x/%#x not reported", k.op, k.sa)
		}
	}
	// RCTD: descriptors with timeouts.
	c[2] = 0x80
	r = run(lu, nexA, c, nil)
	wantGood(t, r)
	if (len(r.DataIn)-4)%20 != 0 || r.DataIn[4+5]&2 == 0 {
		t.Fatal("rctd")
	}
	// Unsupported opcode: "not supported".
	q := make([]byte, 12)
	q[0], q[1], q[2], q[3] = opMaintenanceIn, saReportSupported, 1, 0xff
	q[9] = 255
	r = run(lu, nexA, q, nil)
	wantGood(t, r)
	if r.DataIn[1]&7 != 1 {
		t.Fatalf("unsupported opcode reported %x", r.DataIn)
	}
}

func TestGetLBAStatus(t *testing.T) {
	lu, _ := readyLU(t, testConfig())
	nb := uint64(testSize / 512)
	c := cdb16(opServiceActionIn16, nb-10, 24)
	c[1] = saGetLBAStatus
	r := run(lu, nexA, c, nil)
	wantGood(t, r)
	if binary.BigEndian.Uint64(r.DataIn[8:16]) != nb-10 || binary.BigEndian.Uint32(r.DataIn[16:20]) != 10 {
		t.Fatalf("lba status %x", r.DataIn)
	}
}

func TestReportLUNs(t *testing.T) {
	lu, _ := readyLU(t, testConfig())
	c := make([]byte, 12)
	c[0] = opReportLUNs
	c[9] = 255
	r := run(lu, nexA, c, nil)
	wantGood(t, r)
	if len(r.DataIn) != 16 || binary.BigEndian.Uint32(r.DataIn[0:4]) != 8 || !AllZero(r.DataIn[8:]) {
		t.Fatalf("report luns %x", r.DataIn)
	}
}

func Test4KBlocks(t *testing.T) {
	cfg := testConfig()
	cfg.LogicalBlockSize = 4096
	lu, _ := readyLU(t, cfg)
	wantGood(t, run(lu, nexA, cdb10(opWrite10, 1, 2), fill(8192, 'k')))
	r := run(lu, nexA, cdb10(opRead10, 0, 3), nil)
	if !bytes.Equal(r.DataIn, append(make([]byte, 4096), fill(8192, 'k')...)) {
		t.Fatal("4k data")
	}
	c := make([]byte, 10)
	c[0] = opReadCapacity10
	r = run(lu, nexA, c, nil)
	if binary.BigEndian.Uint32(r.DataIn[4:8]) != 4096 || binary.BigEndian.Uint32(r.DataIn[0:4]) != testSize/4096-1 {
		t.Fatalf("rc10 %x", r.DataIn)
	}
}

func TestConcurrentIO(t *testing.T) {
	lu, _ := readyLU(t, testConfig())
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			buf := fill(8*512, byte(w))
			for i := 0; i < 100; i++ {
				lba := uint32(w*1000 + i*8)
				if r := run(lu, nexA, cdb10(opWrite10, lba, 8), buf); r.Status != StatusGood {
					t.Error("write failed")
					return
				}
				if r := run(lu, nexB, cdb10(opRead10, lba, 8), nil); !bytes.Equal(r.DataIn, buf) {
					t.Error("read back differs")
					return
				}
			}
		}(w)
	}
	wg.Wait()
}

func TestPRINReadFullStatus(t *testing.T) {
	lu, _ := newLU(t, testConfig())
	ctx := context.Background()
	a := NexusID("iqn.a,i,0x000000000001,iqn.t")
	register := make([]byte, 24)
	binary.BigEndian.PutUint64(register[8:16], 0xabc)
	lu.AddNexus(a)
	lu.Execute(ctx, &Command{Nexus: a, CDB: []byte{0x00, 0, 0, 0, 0, 0}}) // clear the UA
	res := lu.Execute(ctx, &Command{Nexus: a, CDB: []byte{0x5f, proutRegister, 0, 0, 0, 0, 0, 0, 24, 0}, DataOut: register, Write: true})
	if res.Status != StatusGood {
		t.Fatalf("register: %+v", res)
	}
	res = lu.Execute(ctx, &Command{Nexus: a, CDB: []byte{0x5e, prinReadFullStatus, 0, 0, 0, 0, 0, 0x10, 0, 0}, Read: true})
	if res.Status != StatusGood {
		t.Fatalf("READ FULL STATUS: %+v", res)
	}
	d := res.DataIn
	if binary.BigEndian.Uint32(d[4:8]) != uint32(len(d)-8) || binary.BigEndian.Uint64(d[8:16]) != 0xabc {
		t.Fatalf("descriptor: % x", d)
	}
	tid := d[8+24:]
	if tid[0] != 0x45 || !strings.HasPrefix(string(tid[4:]), "iqn.a,i,0x000000000001\x00") {
		t.Fatalf("TransportID: % x", tid)
	}
}

// Registrations per LU are bounded: past MaxRegistrations, REGISTER (and
// REGISTER AND IGNORE EXISTING KEY) of a new nexus answers INSUFFICIENT
// REGISTRATION RESOURCES (SPC-4 5.15.7), while registered nexuses may
// still change or drop their key and a freed slot can be taken again.
func TestPRRegistrationsBounded(t *testing.T) {
	lu, _ := newLU(t, testConfig())
	nex := func(i int) NexusID {
		n := NexusID(fmt.Sprintf("iqn.flood,i,0x%012x,tgt", i))
		run(lu, n, cdbTUR(), nil) // its power-on unit attention
		return n
	}
	for i := range DefaultMaxRegistrations {
		sa := byte(proutRegister)
		if i%2 == 1 {
			sa = proutRegisterIgnore
		}
		wantGood(t, run(lu, nex(i), proutCDB(sa, 0), proutData(0, uint64(i+1))))
	}
	over := nex(DefaultMaxRegistrations)
	wantSense(t, run(lu, over, proutCDB(proutRegister, 0), proutData(0, 7)), SenseIllegalRequest, 0x55, 0x04)
	wantSense(t, run(lu, over, proutCDB(proutRegisterIgnore, 0), proutData(0, 7)), SenseIllegalRequest, 0x55, 0x04)
	keys := prin(t, lu, nex(0), prinReadKeys)
	if n := binary.BigEndian.Uint32(keys[4:8]) / 8; n != DefaultMaxRegistrations {
		t.Fatalf("%d registrations, want %d", n, DefaultMaxRegistrations)
	}
	// A registered nexus changes its key; unregistering frees a slot.
	wantGood(t, run(lu, nex(0), proutCDB(proutRegister, 0), proutData(1, 99)))
	wantGood(t, run(lu, nex(1), proutCDB(proutRegister, 0), proutData(2, 0)))
	wantGood(t, run(lu, over, proutCDB(proutRegister, 0), proutData(0, 7)))
	// An unregistered nexus registering key 0 takes no slot: still GOOD.
	wantGood(t, run(lu, nex(DefaultMaxRegistrations+1), proutCDB(proutRegister, 0), proutData(0, 0)))

	// The bound is configurable.
	cfg := testConfig()
	cfg.MaxRegistrations = 2
	lu, _ = readyLU(t, cfg)
	wantGood(t, run(lu, nexA, proutCDB(proutRegister, 0), proutData(0, 1)))
	wantGood(t, run(lu, nexB, proutCDB(proutRegister, 0), proutData(0, 2)))
	wantSense(t, run(lu, nex(3), proutCDB(proutRegister, 0), proutData(0, 3)), SenseIllegalRequest, 0x55, 0x04)
}
