package scsi

import (
	"encoding/binary"
	"sort"
	"strings"
)

// PERSISTENT RESERVE IN service actions.
const (
	prinReadKeys           = 0x00
	prinReadReservation    = 0x01
	prinReportCapabilities = 0x02
	prinReadFullStatus     = 0x03
)

// PERSISTENT RESERVE OUT service actions.
const (
	proutRegister       = 0x00
	proutReserve        = 0x01
	proutRelease        = 0x02
	proutClear          = 0x03
	proutPreempt        = 0x04
	proutPreemptAbort   = 0x05
	proutRegisterIgnore = 0x06
)

// Persistent reservation types.
const (
	prWriteExclusive      = 0x1
	prExclusiveAccess     = 0x3
	prWriteExclusiveRO    = 0x5
	prExclusiveAccessRO   = 0x6
	prWriteExclusiveAllRg = 0x7
	prExclusiveAccessAlRg = 0x8
)

// resvState is the reservation state of the LU (guarded by LU.mu).
// Persistent reservations are kept in memory only (no APTPL): they
// survive I_T nexus loss but not the process.
type resvState struct {
	// SPC-2 RESERVE(6)/(10).
	spc2Held   bool
	spc2Holder NexusID

	// Persistent reservations.
	gen     uint32
	keys    map[NexusID]uint64 // registrations, at most Config.MaxRegistrations
	prHeld  bool
	prType  byte
	prOwner NexusID // meaningless for the all-registrants types
}

func allRegistrants(t byte) bool { return t == prWriteExclusiveAllRg || t == prExclusiveAccessAlRg }

func registrantsOnly(t byte) bool {
	return t == prWriteExclusiveRO || t == prExclusiveAccessRO || allRegistrants(t)
}

func validPRType(t byte) bool {
	switch t {
	case prWriteExclusive, prExclusiveAccess, prWriteExclusiveRO, prExclusiveAccessRO, prWriteExclusiveAllRg, prExclusiveAccessAlRg:
		return true
	}
	return false
}

// updateReservedLocked refreshes the lock-free "a reservation exists"
// flag the hot path reads.
func (lu *LU) updateReservedLocked() {
	lu.reserved.Store(lu.res.spc2Held || lu.res.prHeld)
}

// isPRHolder reports whether n holds the persistent reservation.
func (r *resvState) isPRHolder(n NexusID) bool {
	if !r.prHeld {
		return false
	}
	if allRegistrants(r.prType) {
		_, ok := r.keys[n]
		return ok
	}
	return r.prOwner == n
}

// checkReservation decides whether cmd from nexus n conflicts with the
// reservations in place.
func (lu *LU) checkReservation(n NexusID, info *opInfo) (Result, bool) {
	if info.class == classAlways {
		return Result{}, false
	}
	lu.mu.Lock()
	defer lu.mu.Unlock()
	r := &lu.res
	if r.spc2Held {
		if r.spc2Holder == n || info.class == classRelease {
			return Result{}, false
		}
		return reservationConflict(), true
	}
	if !r.prHeld || r.isPRHolder(n) {
		return Result{}, false
	}
	switch info.class {
	case classPR, classOther:
		return Result{}, false
	case classRelease:
		// RESERVE/RELEASE(6/10) with a persistent reservation in place.
		return reservationConflict(), true
	}
	_, registered := r.keys[n]
	switch r.prType {
	case prWriteExclusive:
		if info.class == classWrite {
			return reservationConflict(), true
		}
	case prExclusiveAccess:
		return reservationConflict(), true
	case prWriteExclusiveRO, prWriteExclusiveAllRg:
		if !registered && info.class == classWrite {
			return reservationConflict(), true
		}
	case prExclusiveAccessRO, prExclusiveAccessAlRg:
		if !registered {
			return reservationConflict(), true
		}
	}
	return Result{}, false
}

// reserveSPC2 implements RESERVE(6) and RESERVE(10).
func (lu *LU) reserveSPC2(cmd *Command) Result {
	lu.mu.Lock()
	defer lu.mu.Unlock()
	r := &lu.res
	if r.prHeld || len(r.keys) > 0 {
		return reservationConflict()
	}
	if r.spc2Held && r.spc2Holder != cmd.Nexus {
		return reservationConflict()
	}
	r.spc2Held, r.spc2Holder = true, cmd.Nexus
	lu.updateReservedLocked()
	return good()
}

// releaseSPC2 implements RELEASE(6) and RELEASE(10): releasing a
// reservation one does not hold is a no-op.
func (lu *LU) releaseSPC2(cmd *Command) Result {
	lu.mu.Lock()
	defer lu.mu.Unlock()
	r := &lu.res
	if r.prHeld || len(r.keys) > 0 {
		return reservationConflict()
	}
	if r.spc2Held && r.spc2Holder == cmd.Nexus {
		r.spc2Held = false
		lu.updateReservedLocked()
	}
	return good()
}

// persistentReserveIn implements PERSISTENT RESERVE IN: READ KEYS, READ
// RESERVATION, REPORT CAPABILITIES.
func (lu *LU) persistentReserveIn(cmd *Command) Result {
	cdb := cmd.CDB
	alloc := uint32(binary.BigEndian.Uint16(cdb[7:9]))
	lu.mu.Lock()
	defer lu.mu.Unlock()
	r := &lu.res
	var d []byte
	switch cdb[1] & 0x1f {
	case prinReadKeys:
		ids := r.sortedRegistrants()
		d = make([]byte, 8+8*len(ids))
		binary.BigEndian.PutUint32(d[0:4], r.gen)
		binary.BigEndian.PutUint32(d[4:8], uint32(8*len(ids)))
		for i, id := range ids {
			binary.BigEndian.PutUint64(d[8+8*i:], r.keys[id])
		}
	case prinReadReservation:
		if !r.prHeld {
			d = make([]byte, 8)
			binary.BigEndian.PutUint32(d[0:4], r.gen)
			break
		}
		d = make([]byte, 24)
		binary.BigEndian.PutUint32(d[0:4], r.gen)
		binary.BigEndian.PutUint32(d[4:8], 16)
		if !allRegistrants(r.prType) {
			binary.BigEndian.PutUint64(d[8:16], r.keys[r.prOwner])
		}
		d[21] = r.prType // scope 0: logical unit
	case prinReportCapabilities:
		d = make([]byte, 8)
		binary.BigEndian.PutUint16(d[0:2], 8)
		d[2] = 0x10 // CRH: RESERVE/RELEASE(6/10) conflict with PRs
		d[3] = 0x80 // TMV: the type mask is valid
		// WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX; EX_AC_AR.
		d[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02
		d[5] = 0x01
	case prinReadFullStatus:
		d = make([]byte, 8)
		binary.BigEndian.PutUint32(d[0:4], r.gen)
		for _, id := range r.sortedRegistrants() {
			d = append(d, r.fullStatusDescriptor(id)...)
		}
		binary.BigEndian.PutUint32(d[4:8], uint32(len(d)-8))
	default:
		return invalidCDB(1)
	}
	return dataIn(d, alloc)
}

// fullStatusDescriptor is one READ FULL STATUS descriptor (SPC-4
// 6.16.5): the key, whether the nexus holds the reservation, and its
// TransportID.
func (r *resvState) fullStatusDescriptor(id NexusID) []byte {
	tid := transportID(id)
	d := make([]byte, 24, 24+len(tid))
	binary.BigEndian.PutUint64(d[0:8], r.keys[id])
	if r.prHeld && (allRegistrants(r.prType) || r.prOwner == id) {
		d[12] = 0x01 // R_HOLDER
		d[13] = r.prType
	}
	binary.BigEndian.PutUint16(d[18:20], relativePort(id))
	binary.BigEndian.PutUint32(d[20:24], uint32(len(tid)))
	return append(d, tid...)
}

// transportID is the iSCSI TransportID (SPC-4 7.6.4.6, format 01b:
// initiator port name with ISID) of a nexus "<initiator>,i,0x<isid>,<target>".
func transportID(id NexusID) []byte {
	name := string(id)
	if i := strings.Index(name, ",i,0x"); i >= 0 && len(name) >= i+5+12 {
		name = name[:i+5+12]
	}
	n := (len(name) + 1 + 3) &^ 3 // NUL-terminated, padded to 4
	d := make([]byte, 4+n)
	d[0] = 0x40 | 0x05 // format 01b, protocol iSCSI
	binary.BigEndian.PutUint16(d[2:4], uint16(n))
	copy(d[4:], name)
	return d
}

func (r *resvState) sortedRegistrants() []NexusID {
	ids := make([]NexusID, 0, len(r.keys))
	for id := range r.keys {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	return ids
}

// uaLocked queues a unit attention for nexus n if it is known.
func (lu *LU) uaLocked(n NexusID, ascq uint16) {
	if st, ok := (*lu.nexuses.Load())[n]; ok {
		st.addUA(uaCode(ascq))
	}
}

// persistentReserveOut implements PERSISTENT RESERVE OUT: REGISTER,
// REGISTER AND IGNORE EXISTING KEY, RESERVE, RELEASE, CLEAR, PREEMPT
// (and PREEMPT AND ABORT, without aborting tasks). Scope is LU only;
// APTPL, SPEC_I_PT and ALL_TG_PT are not supported. A new registration
// past Config.MaxRegistrations answers ILLEGAL REQUEST, INSUFFICIENT
// REGISTRATION RESOURCES (SPC-4 5.15.7).
func (lu *LU) persistentReserveOut(cmd *Command) Result {
	cdb := cmd.CDB
	sa := cdb[1] & 0x1f
	scope, typ := cdb[2]>>4, cdb[2]&0x0f
	plen := binary.BigEndian.Uint32(cdb[5:9])
	if plen != 24 {
		return paramListLengthError()
	}
	if len(cmd.DataOut) < 24 {
		return paramListLengthError()
	}
	p := cmd.DataOut[:24]
	key := binary.BigEndian.Uint64(p[0:8])
	sakey := binary.BigEndian.Uint64(p[8:16])
	if p[20]&0x08 != 0 { // SPEC_I_PT
		return invalidParam(20)
	}
	if p[20]&0x04 != 0 { // ALL_TG_PT
		return invalidParam(20)
	}
	if p[20]&0x01 != 0 { // APTPL
		return invalidParam(20)
	}
	n := cmd.Nexus
	lu.mu.Lock()
	defer lu.mu.Unlock()
	defer lu.updateReservedLocked()
	r := &lu.res
	if r.spc2Held && r.spc2Holder != n {
		return reservationConflict()
	}
	if r.keys == nil {
		r.keys = map[NexusID]uint64{}
	}
	cur, registered := r.keys[n]

	switch sa {
	case proutRegister, proutRegisterIgnore:
		if sa == proutRegister {
			if !registered && key != 0 || registered && key != cur {
				return reservationConflict()
			}
		}
		if !registered {
			if sakey != 0 {
				if len(r.keys) >= lu.cfg.MaxRegistrations {
					return sense(SenseIllegalRequest, ascInsufficientRegs)
				}
				r.keys[n] = sakey
				r.gen++
			}
			return good()
		}
		if sakey != 0 {
			r.keys[n] = sakey
			r.gen++
			return good()
		}
		lu.unregisterLocked(n)
		r.gen++
		return good()
	}

	// The other service actions need a registered nexus with its key.
	if !registered || key != cur {
		return reservationConflict()
	}
	switch sa {
	case proutReserve:
		if scope != 0 {
			return invalidCDB(2)
		}
		if !validPRType(typ) {
			return invalidCDB(2)
		}
		if r.prHeld {
			if !r.isPRHolder(n) {
				return reservationConflict()
			}
			if r.prType != typ {
				return reservationConflict()
			}
			return good()
		}
		r.prHeld, r.prType, r.prOwner = true, typ, n
		return good()
	case proutRelease:
		if !r.prHeld || !r.isPRHolder(n) {
			return good()
		}
		if scope != 0 || r.prType != typ {
			return sense(SenseIllegalRequest, ascInvalidReleasePR)
		}
		if registrantsOnly(r.prType) {
			for id := range r.keys {
				if id != n {
					lu.uaLocked(id, ascReservationsReleased)
				}
			}
		}
		r.prHeld = false
		return good()
	case proutClear:
		for id := range r.keys {
			if id != n {
				lu.uaLocked(id, ascReservationsPreempted)
			}
		}
		clear(r.keys)
		r.prHeld = false
		r.gen++
		return good()
	case proutPreempt, proutPreemptAbort:
		if r.prHeld && allRegistrants(r.prType) && sakey == 0 {
			// Preempt every other registrant and take the
			// reservation.
			if scope != 0 || !validPRType(typ) {
				return invalidCDB(2)
			}
			for id := range r.keys {
				if id != n {
					delete(r.keys, id)
					lu.uaLocked(id, ascRegistrationsPreempt)
				}
			}
			r.prType, r.prOwner = typ, n
			r.gen++
			return good()
		}
		if sakey == 0 {
			return invalidParam(8)
		}
		holderKey := r.prHeld && !allRegistrants(r.prType) && r.keys[r.prOwner] == sakey
		if holderKey && (scope != 0 || !validPRType(typ)) {
			return invalidCDB(2)
		}
		removed := false
		for id, k := range r.keys {
			if k == sakey && id != n {
				delete(r.keys, id)
				lu.uaLocked(id, ascRegistrationsPreempt)
				removed = true
			}
		}
		if holderKey {
			r.prType, r.prOwner = typ, n
			removed = true
		} else if r.prHeld && allRegistrants(r.prType) && len(r.keys) == 0 {
			r.prHeld = false
		}
		if !removed {
			return reservationConflict()
		}
		r.gen++
		return good()
	}
	return invalidCDB(1)
}

// unregisterLocked removes n's registration, releasing the reservation
// it holds (an all-registrants reservation lasts while registrants remain).
func (lu *LU) unregisterLocked(n NexusID) {
	r := &lu.res
	delete(r.keys, n)
	if !r.prHeld {
		return
	}
	if allRegistrants(r.prType) {
		if len(r.keys) == 0 {
			r.prHeld = false
		}
		return
	}
	if r.prOwner == n {
		if registrantsOnly(r.prType) {
			for id := range r.keys {
				lu.uaLocked(id, ascReservationsReleased)
			}
		}
		r.prHeld = false
	}
}

// DropReservations forgets every reservation and registration (SPC-2 and
// persistent): the LU stops (or starts) being where they are kept, and
// what it holds is no longer the device's state. Every nexus that had a
// registration or a reservation gets RESERVATIONS RELEASED.
func (lu *LU) DropReservations() {
	lu.mu.Lock()
	defer lu.mu.Unlock()
	had := map[NexusID]bool{}
	for n := range lu.res.keys {
		had[n] = true
	}
	if lu.res.spc2Held {
		had[lu.res.spc2Holder] = true
	}
	if len(had) == 0 && !lu.res.prHeld {
		return
	}
	lu.res.spc2Held = false
	lu.res.keys = nil
	lu.res.prHeld = false
	lu.res.gen++
	lu.updateReservedLocked()
	for n := range had {
		lu.uaLocked(n, ascReservationsReleased)
	}
}
