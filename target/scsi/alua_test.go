package scsi

import (
	"encoding/binary"
	"sync"
	"testing"
)

// fakeALUA is a scripted port group source.
type fakeALUA struct {
	local  uint16
	mu     sync.Mutex
	groups []PortGroup
}

func (f *fakeALUA) LocalGroup() uint16 { return f.local }
func (f *fakeALUA) PortGroups() []PortGroup {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]PortGroup(nil), f.groups...)
}
func (f *fakeALUA) set(g ...PortGroup) { f.mu.Lock(); f.groups = g; f.mu.Unlock() }

func rtpgCDB(format byte, alloc uint32) []byte {
	c := make([]byte, 12)
	c[0], c[1] = opMaintenanceIn, format<<5|saReportTargetPortGroups
	binary.BigEndian.PutUint32(c[6:10], alloc)
	return c
}

// rtpgGroups decodes a REPORT TARGET PORT GROUPS answer: group id -> state,
// and checks each group's single port carries the group's id.
func rtpgGroups(t *testing.T, d []byte, extended bool) map[uint16]AccessState {
	t.Helper()
	if len(d) < 4 || int(binary.BigEndian.Uint32(d[0:4]))+4 != len(d) {
		t.Fatalf("RETURN DATA LENGTH does not match %d bytes: % x", len(d), d)
	}
	off := 4
	if extended {
		if d[4] != 0x10 || d[5] == 0 {
			t.Fatalf("extended header % x: want format type 1 and an implicit transition time", d[4:8])
		}
		off = 8
	}
	out := map[uint16]AccessState{}
	for off < len(d) {
		g := d[off:]
		if len(g) < 8 {
			t.Fatalf("truncated descriptor % x", g)
		}
		id := binary.BigEndian.Uint16(g[2:4])
		if g[1]&0x01 == 0 || g[1]&0x02 == 0 {
			t.Fatalf("group %d: supported states %#x lack AO_SUP/AN_SUP", id, g[1])
		}
		n := int(g[7])
		if n != 1 || len(g) < 8+4*n || binary.BigEndian.Uint16(g[10:12]) != id {
			t.Fatalf("group %d: ports % x, want one port with relative id %d", id, g[4:min(len(g), 12)], id)
		}
		if _, dup := out[id]; dup {
			t.Fatalf("group %d reported twice", id)
		}
		out[id] = AccessState(g[0] & 0x0f)
		off += 8 + 4*n
	}
	return out
}

func TestALUA(t *testing.T) {
	src := &fakeALUA{local: 7}
	src.set(PortGroup{ID: 3, State: ActiveOptimized}, PortGroup{ID: 7, State: ActiveNonOptimized})
	cfg := testConfig()
	cfg.ALUA = src
	lu, _ := readyLU(t, cfg)

	// INQUIRY: TPGS implicit.
	r := run(lu, nexA, []byte{opInquiry, 0, 0, 0, 96, 0}, nil)
	wantGood(t, r)
	if r.DataIn[5]&0x30 != 0x10 || r.DataIn[6]&0x10 == 0 {
		t.Fatalf("TPGS %#x MULTIP %#x, want implicit (01b) and multiple ports", r.DataIn[5]>>4&3, r.DataIn[6]>>4&1)
	}

	// VPD 0x83: the LU designators first (what every path shares), then
	// this port's relative port and group, as Linux's scsi_vpd_tpg_id
	// reads them.
	r = run(lu, nexA, []byte{opInquiry, 1, vpdDeviceID, 0x10, 0, 0}, nil)
	wantGood(t, r)
	d := r.DataIn
	rel, grp := -1, -1
	lus := 0
	for off := 4; off < len(d); off += 4 + int(d[off+3]) {
		p := d[off:]
		assoc, typ := p[1]>>4&3, p[1]&0xf
		switch {
		case assoc == 0:
			lus++
		case assoc == 1 && typ == 4:
			rel = int(binary.BigEndian.Uint16(p[6:8]))
		case assoc == 1 && typ == 5:
			grp = int(binary.BigEndian.Uint16(p[6:8]))
		}
	}
	if lus != 2 || rel != 7 || grp != 7 {
		t.Fatalf("VPD 0x83: %d LU designators, relative port %d, group %d; want 2, 7, 7", lus, rel, grp)
	}
	noALUA, _ := readyLU(t, testConfig())
	r2 := run(noALUA, nexA, []byte{opInquiry, 1, vpdDeviceID, 0x10, 0, 0}, nil)
	if len(r2.DataIn)+16 != len(d) || string(r2.DataIn[4:]) != string(d[4:len(r2.DataIn)]) {
		t.Fatalf("the LU designators differ from a single-port LU's:\n% x\n% x", r2.DataIn, d)
	}

	// REPORT TARGET PORT GROUPS, both formats.
	for _, f := range []byte{0, 1} {
		r = run(lu, nexA, rtpgCDB(f, 1024), nil)
		wantGood(t, r)
		got := rtpgGroups(t, r.DataIn, f == 1)
		if len(got) != 2 || got[3] != ActiveOptimized || got[7] != ActiveNonOptimized {
			t.Fatalf("format %d: groups %v", f, got)
		}
	}
	wantSense(t, run(lu, nexA, rtpgCDB(2, 1024), nil), SenseIllegalRequest, 0x24, 0)
	// Truncated to the allocation length, the length field still whole.
	r = run(lu, nexA, rtpgCDB(0, 8), nil)
	wantGood(t, r)
	if len(r.DataIn) != 8 || binary.BigEndian.Uint32(r.DataIn[0:4]) != 24 {
		t.Fatalf("alloc 8: % x", r.DataIn)
	}

	// Ownership moves to this node: a unit attention on every nexus, once,
	// then the new states.
	src.set(PortGroup{ID: 3, State: ActiveNonOptimized}, PortGroup{ID: 7, State: ActiveOptimized})
	lu.AccessStateChanged()
	for _, n := range []NexusID{nexA, nexB} {
		wantSense(t, run(lu, n, rtpgCDB(1, 1024), nil), SenseUnitAttention, 0x2a, 0x06)
		r = run(lu, n, rtpgCDB(1, 1024), nil)
		wantGood(t, r)
		if got := rtpgGroups(t, r.DataIn, true); got[7] != ActiveOptimized || got[3] != ActiveNonOptimized {
			t.Fatalf("after the move: %v", got)
		}
	}

	// A source that forgets the local group still reports it.
	src.set(PortGroup{ID: 3, State: ActiveOptimized})
	r = run(lu, nexA, rtpgCDB(0, 1024), nil)
	wantGood(t, r)
	if got := rtpgGroups(t, r.DataIn, false); len(got) != 2 || got[7] != ActiveNonOptimized {
		t.Fatalf("local group missing from the source: %v", got)
	}

	// Without ALUA: no TPGS, no REPORT TARGET PORT GROUPS, no unit
	// attention.
	r = run(noALUA, nexA, []byte{opInquiry, 0, 0, 0, 96, 0}, nil)
	if r.DataIn[5]&0x30 != 0 || r.DataIn[6]&0x10 != 0 {
		t.Fatalf("TPGS or MULTIP set without ALUA")
	}
	wantSense(t, run(noALUA, nexA, rtpgCDB(0, 1024), nil), SenseIllegalRequest, 0x24, 0)
	noALUA.AccessStateChanged()
	wantGood(t, run(noALUA, nexA, cdbTUR(), nil))

	if _, err := NewLU(Config{Size: testSize, ALUA: &fakeALUA{}}, newMemBackend(testSize), nil); err == nil {
		t.Fatal("local group 0 accepted")
	}
}
