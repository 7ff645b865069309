package scsi

import "encoding/binary"

// Asymmetric logical unit access (ALUA, SPC-4 5.15). An image is served by
// several nodes at once; each node is one target port group holding one
// target port, so that a multipath initiator sees one device (same VPD
// 0x83 logical-unit designators on every path) with a preferred path: the
// node that owns the image applies its I/O itself (active/optimized), the
// others forward it to the owner (active/non-optimized). The access is
// implicit (TPGS 01b): the target changes the states when ownership moves
// and tells every nexus with an ASYMMETRIC ACCESS STATE CHANGED unit
// attention; SET TARGET PORT GROUPS is not supported.

// AccessState is a target port group's asymmetric access state.
type AccessState byte

// The states REPORT TARGET PORT GROUPS reports (SPC-4 table 164).
const (
	ActiveOptimized    AccessState = 0x0
	ActiveNonOptimized AccessState = 0x1
	Standby            AccessState = 0x2
	Unavailable        AccessState = 0x3
	Transitioning      AccessState = 0xf
)

func (s AccessState) String() string {
	switch s {
	case ActiveOptimized:
		return "active/optimized"
	case ActiveNonOptimized:
		return "active/non-optimized"
	case Standby:
		return "standby"
	case Unavailable:
		return "unavailable"
	case Transitioning:
		return "transitioning"
	}
	return "reserved"
}

// PortGroup is one target port group: a node serving the image. Its one
// target port has the relative target port identifier ID as well.
type PortGroup struct {
	ID    uint16 // 1..65535, unique among the groups of the LU
	State AccessState
}

// ALUA is the source of the port groups of a LU served through several
// nodes. PortGroups is called on every REPORT TARGET PORT GROUPS (an
// initiator's path checker may send one every few seconds): it must
// answer from memory.
type ALUA interface {
	// LocalGroup is the group of the port this LU is reached through
	// (this node's), never 0.
	LocalGroup() uint16
	// PortGroups lists the groups now, the local one included.
	PortGroups() []PortGroup
}

const (
	saReportTargetPortGroups = 0x0a

	ascAccessStateChanged = 0x2a06 // ASYMMETRIC ACCESS STATE CHANGED

	// tpgsImplicit is the TPGS field of the standard INQUIRY data
	// (byte 5 bits 5-4): implicit asymmetric access only.
	tpgsImplicit = 0x10

	// implicitTransitionSecs is the IMPLICIT TRANSITION TIME of the
	// extended header: how long a move of ownership may take, the time
	// a takeover after an owner's crash was measured at (16 s, see
	// docs/ownership.md) with margin.
	implicitTransitionSecs = 30

	protoISCSI = 0x5
)

// AccessStateChanged gives every nexus an ASYMMETRIC ACCESS STATE CHANGED
// unit attention: the initiator asks REPORT TARGET PORT GROUPS again. Call
// it when the states PortGroups reports changed (ownership moved).
func (lu *LU) AccessStateChanged() {
	if lu.cfg.ALUA == nil {
		return
	}
	lu.mu.Lock()
	defer lu.mu.Unlock()
	for _, n := range *lu.nexuses.Load() {
		n.addUA(uaCode(ascAccessStateChanged))
	}
}

// portDesignators are the VPD 0x83 designators associated with the target
// port the command came through: its relative target port identifier and
// its target port group (the form Linux's scsi_vpd_tpg_id reads).
func (lu *LU) portDesignators() []byte {
	if lu.cfg.ALUA == nil {
		return nil
	}
	g := lu.cfg.ALUA.LocalGroup()
	d := make([]byte, 16)
	for i, typ := range []byte{0x4, 0x5} { // relative target port, target port group
		p := d[8*i:]
		p[0] = protoISCSI<<4 | 0x1 // iSCSI, code set binary
		p[1] = 0x80 | 0x10 | typ   // PIV, association target port
		p[3] = 4
		binary.BigEndian.PutUint16(p[6:8], g)
	}
	return d
}

// reportTargetPortGroups implements REPORT TARGET PORT GROUPS (MAINTENANCE
// IN, service action 0Ah), in the length-only or the extended format.
func (lu *LU) reportTargetPortGroups(cmd *Command) Result {
	cdb := cmd.CDB
	format := cdb[1] >> 5
	if format > 1 {
		return invalidCDB(1)
	}
	alloc := binary.BigEndian.Uint32(cdb[6:10])
	groups := lu.cfg.ALUA.PortGroups()
	local := lu.cfg.ALUA.LocalGroup()
	hdr := 4
	if format == 1 {
		hdr = 8
	}
	out := make([]byte, hdr, hdr+12*(len(groups)+1))
	if format == 1 {
		out[4] = 0x10 // format type 001b
		out[5] = implicitTransitionSecs
	}
	seenLocal := false
	for _, g := range groups {
		if g.ID == 0 {
			continue
		}
		seenLocal = seenLocal || g.ID == local
		out = appendGroup(out, g)
	}
	if !seenLocal {
		// The port the command came through is always a group: a source
		// that forgot it would leave the initiator without its own state.
		out = appendGroup(out, PortGroup{ID: local, State: ActiveNonOptimized})
	}
	binary.BigEndian.PutUint32(out[0:4], uint32(len(out)-4))
	return dataIn(out, alloc)
}

func appendGroup(out []byte, g PortGroup) []byte {
	var d [12]byte
	d[0] = byte(g.State) & 0x0f
	d[1] = 0x80 | 0x08 | 0x02 | 0x01 // T_SUP, U_SUP, AN_SUP, AO_SUP
	binary.BigEndian.PutUint16(d[2:4], g.ID)
	d[7] = 1 // one target port
	binary.BigEndian.PutUint16(d[10:12], g.ID)
	return append(out, d[:]...)
}
