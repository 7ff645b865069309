package scsi

import (
	"context"
	"encoding/binary"
)

// resvClass says how a command is treated when another nexus holds a
// reservation.
type resvClass uint8

const (
	// classAlways commands are never in conflict (INQUIRY, REPORT
	// LUNS, ...).
	classAlways resvClass = iota
	// classOther commands neither read nor write the medium (TEST UNIT
	// READY, READ CAPACITY, MODE SENSE, ...): they conflict only with
	// a SPC-2 reservation.
	classOther
	// classRead commands read the medium.
	classRead
	// classWrite commands change the medium or the LU state.
	classWrite
	// classPR are PERSISTENT RESERVE IN/OUT: they conflict only with
	// a SPC-2 reservation.
	classPR
	// classRelease is RELEASE(6)/(10): never in conflict with a SPC-2
	// reservation (releasing another's is a no-op).
	classRelease
)

// opInfo describes one supported command (or service action).
type opInfo struct {
	op     byte
	sa     uint16
	hasSA  bool
	cdbLen int
	// usage is the CDB USAGE DATA of REPORT SUPPORTED OPERATION CODES:
	// the bits the device server looks at. Any other bit set in the CDB
	// is refused with INVALID FIELD IN CDB.
	usage []byte
	class resvClass
	run   func(lu *LU, ctx context.Context, cmd *Command) Result
}

// ctl is the control byte usage mask: NACA and (obsolete) LINK are
// examined (and refused) by the device server.
const ctl byte = 0x05

func (lu *LU) opTable() []opInfo {
	rw10 := func(op, b1 byte) []byte { return []byte{op, b1, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, ctl} }
	rw12 := func(op, b1 byte) []byte {
		return []byte{op, b1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, ctl}
	}
	rw16 := func(op, b1 byte) []byte {
		return []byte{op, b1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, ctl}
	}
	read := func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.read(ctx, cmd) }
	write := func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.write(ctx, cmd) }
	verify := func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.verify(ctx, cmd) }
	prefetch := func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.prefetch(cmd) }
	syncCache := func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.syncCache(ctx, cmd) }
	writeSame := func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.writeSame(ctx, cmd) }
	modeSense := func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.modeSense(cmd) }
	modeSelect := func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.modeSelect(cmd) }
	reserve := func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.reserveSPC2(cmd) }
	release := func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.releaseSPC2(cmd) }
	noop := func(lu *LU, ctx context.Context, cmd *Command) Result { return good() }

	t := []opInfo{
		{op: opTestUnitReady, cdbLen: 6, usage: []byte{opTestUnitReady, 0, 0, 0, 0, ctl}, class: classOther, run: noop},
		{op: opRequestSense, cdbLen: 6, usage: []byte{opRequestSense, 0x01, 0, 0, 0xff, ctl}, class: classAlways,
			run: func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.requestSense(cmd, nil, false) }},
		{op: opRead6, cdbLen: 6, usage: []byte{opRead6, 0x1f, 0xff, 0xff, 0xff, ctl}, class: classRead, run: read},
		{op: opWrite6, cdbLen: 6, usage: []byte{opWrite6, 0x1f, 0xff, 0xff, 0xff, ctl}, class: classWrite, run: write},
		{op: opInquiry, cdbLen: 6, usage: []byte{opInquiry, 0x01, 0xff, 0xff, 0xff, ctl}, class: classAlways,
			run: func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.inquiry(cmd, true) }},
		{op: opModeSelect6, cdbLen: 6, usage: []byte{opModeSelect6, 0x11, 0, 0, 0xff, ctl}, class: classWrite, run: modeSelect},
		{op: opReserve6, cdbLen: 6, usage: []byte{opReserve6, 0, 0, 0, 0, ctl}, class: classWrite, run: reserve},
		{op: opRelease6, cdbLen: 6, usage: []byte{opRelease6, 0, 0, 0, 0, ctl}, class: classRelease, run: release},
		{op: opModeSense6, cdbLen: 6, usage: []byte{opModeSense6, 0x08, 0xff, 0xff, 0xff, ctl}, class: classOther, run: modeSense},
		{op: opStartStopUnit, cdbLen: 6, usage: []byte{opStartStopUnit, 0x01, 0, 0x0f, 0xf7, ctl}, class: classWrite,
			run: func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.startStopUnit(cmd) }},
		{op: opPreventAllow, cdbLen: 6, usage: []byte{opPreventAllow, 0, 0, 0, 0x03, ctl}, class: classOther, run: noop},
		{op: opReadCapacity10, cdbLen: 10, usage: []byte{opReadCapacity10, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x01, ctl}, class: classOther,
			run: func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.readCapacity10(cmd) }},
		{op: opRead10, cdbLen: 10, usage: rw10(opRead10, 0xfe), class: classRead, run: read},
		{op: opWrite10, cdbLen: 10, usage: rw10(opWrite10, 0xfa), class: classWrite, run: write},
		{op: opWriteVerify10, cdbLen: 10, usage: rw10(opWriteVerify10, 0xf6), class: classWrite, run: write},
		{op: opVerify10, cdbLen: 10, usage: rw10(opVerify10, 0xf6), class: classRead, run: verify},
		{op: opPrefetch10, cdbLen: 10, usage: rw10(opPrefetch10, 0x02), class: classRead, run: prefetch},
		{op: opSyncCache10, cdbLen: 10, usage: rw10(opSyncCache10, 0x06), class: classWrite, run: syncCache},
		{op: opWriteSame10, cdbLen: 10, usage: rw10(opWriteSame10, 0xfe), class: classWrite, run: writeSame},
		{op: opUnmap, cdbLen: 10, usage: []byte{opUnmap, 0x01, 0, 0, 0, 0, 0x1f, 0xff, 0xff, ctl}, class: classWrite,
			run: func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.unmap(ctx, cmd) }},
		{op: opModeSelect10, cdbLen: 10, usage: []byte{opModeSelect10, 0x11, 0, 0, 0, 0, 0, 0xff, 0xff, ctl}, class: classWrite, run: modeSelect},
		{op: opReserve10, cdbLen: 10, usage: []byte{opReserve10, 0, 0, 0, 0, 0, 0, 0, 0, ctl}, class: classWrite, run: reserve},
		{op: opRelease10, cdbLen: 10, usage: []byte{opRelease10, 0, 0, 0, 0, 0, 0, 0, 0, ctl}, class: classRelease, run: release},
		{op: opModeSense10, cdbLen: 10, usage: []byte{opModeSense10, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, ctl}, class: classOther, run: modeSense},
		{op: opRead16, cdbLen: 16, usage: rw16(opRead16, 0xfe), class: classRead, run: read},
		{op: opCompareAndWrite, cdbLen: 16, usage: []byte{opCompareAndWrite, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0xff, 0x1f, ctl}, class: classWrite,
			run: func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.compareAndWrite(ctx, cmd) }},
		{op: opWrite16, cdbLen: 16, usage: rw16(opWrite16, 0xfa), class: classWrite, run: write},
		{op: opWriteVerify16, cdbLen: 16, usage: rw16(opWriteVerify16, 0xf6), class: classWrite, run: write},
		{op: opVerify16, cdbLen: 16, usage: rw16(opVerify16, 0xf6), class: classRead, run: verify},
		{op: opPrefetch16, cdbLen: 16, usage: rw16(opPrefetch16, 0x02), class: classRead, run: prefetch},
		{op: opSyncCache16, cdbLen: 16, usage: rw16(opSyncCache16, 0x06), class: classWrite, run: syncCache},
		{op: opWriteSame16, cdbLen: 16, usage: rw16(opWriteSame16, 0xff), class: classWrite, run: writeSame},
		{op: opServiceActionIn16, sa: saReadCapacity16, hasSA: true, cdbLen: 16,
			usage: []byte{opServiceActionIn16, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, ctl}, class: classOther,
			run: func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.readCapacity16(cmd) }},
		{op: opServiceActionIn16, sa: saGetLBAStatus, hasSA: true, cdbLen: 16,
			usage: []byte{opServiceActionIn16, 0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, ctl}, class: classRead,
			run: func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.getLBAStatus(cmd) }},
		{op: opReportLUNs, cdbLen: 12, usage: []byte{opReportLUNs, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, ctl}, class: classAlways,
			run: func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.reportLUNs(cmd) }},
		{op: opMaintenanceIn, sa: saReportSupported, hasSA: true, cdbLen: 12,
			usage: []byte{opMaintenanceIn, 0x1f, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, ctl}, class: classAlways,
			run: func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.reportSupportedOpcodes(cmd) }},
		{op: opRead12, cdbLen: 12, usage: rw12(opRead12, 0xfe), class: classRead, run: read},
		{op: opWrite12, cdbLen: 12, usage: rw12(opWrite12, 0xfa), class: classWrite, run: write},
		{op: opWriteVerify12, cdbLen: 12, usage: rw12(opWriteVerify12, 0xf6), class: classWrite, run: write},
		{op: opVerify12, cdbLen: 12, usage: rw12(opVerify12, 0xf6), class: classRead, run: verify},
	}
	prIn := []byte{opPRIn, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, ctl}
	for _, sa := range []uint16{prinReadKeys, prinReadReservation, prinReportCapabilities, prinReadFullStatus} {
		t = append(t, opInfo{op: opPRIn, sa: sa, hasSA: true, cdbLen: 10, usage: prIn, class: classPR,
			run: func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.persistentReserveIn(cmd) }})
	}
	prOut := []byte{opPROut, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, ctl}
	for _, sa := range []uint16{proutRegister, proutReserve, proutRelease, proutClear, proutPreempt, proutPreemptAbort, proutRegisterIgnore} {
		t = append(t, opInfo{op: opPROut, sa: sa, hasSA: true, cdbLen: 10, usage: prOut, class: classPR,
			run: func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.persistentReserveOut(cmd) }})
	}
	if lu.cfg.ALUA != nil {
		t = append(t, opInfo{op: opMaintenanceIn, sa: saReportTargetPortGroups, hasSA: true, cdbLen: 12,
			usage: []byte{opMaintenanceIn, 0xff, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, ctl}, class: classAlways,
			run: func(lu *LU, ctx context.Context, cmd *Command) Result { return lu.reportTargetPortGroups(cmd) }})
	}
	if !lu.cfg.ThinProvisioning {
		// UNMAP is only offered with thin provisioning (VPD B2 LBPU).
		out := t[:0]
		for _, o := range t {
			if o.op != opUnmap {
				out = append(out, o)
			}
		}
		t = out
	}
	// Sort by opcode then service action (insertion sort: small table).
	for i := 1; i < len(t); i++ {
		for j := i; j > 0 && (t[j].op < t[j-1].op || t[j].op == t[j-1].op && t[j].sa < t[j-1].sa); j-- {
			t[j], t[j-1] = t[j-1], t[j]
		}
	}
	return t
}

// reportSupportedOpcodes implements REPORT SUPPORTED OPERATION CODES
// (MAINTENANCE IN, service action 0Ch).
func (lu *LU) reportSupportedOpcodes(cmd *Command) Result {
	cdb := cmd.CDB
	rctd := cdb[2]&0x80 != 0
	opt := cdb[2] & 0x07
	reqOp := cdb[3]
	reqSA := binary.BigEndian.Uint16(cdb[4:6])
	alloc := binary.BigEndian.Uint32(cdb[6:10])
	var out []byte
	switch opt {
	case 0:
		dlen := 8
		if rctd {
			dlen += 12
		}
		out = make([]byte, 4, 4+dlen*len(lu.ops))
		for _, o := range lu.ops {
			var d [20]byte
			d[0] = o.op
			binary.BigEndian.PutUint16(d[2:4], o.sa)
			if o.hasSA {
				d[5] |= 0x01 // SERVACTV
			}
			binary.BigEndian.PutUint16(d[6:8], uint16(o.cdbLen))
			if rctd {
				d[5] |= 0x02 // CTDP
				binary.BigEndian.PutUint16(d[8:10], 0x0a)
			}
			out = append(out, d[:dlen]...)
		}
		binary.BigEndian.PutUint32(out[0:4], uint32(len(out)-4))
	case 1, 2, 3:
		cands := lu.opIdx[reqOp]
		var found *opInfo
		switch opt {
		case 1:
			if len(cands) > 0 && cands[0].hasSA {
				return invalidCDB(2)
			}
			if len(cands) > 0 {
				found = &cands[0]
			}
		case 2:
			if len(cands) > 0 && !cands[0].hasSA {
				return invalidCDB(2)
			}
			for i := range cands {
				if cands[i].sa == reqSA {
					found = &cands[i]
				}
			}
		case 3:
			for i := range cands {
				if !cands[i].hasSA || cands[i].sa == reqSA {
					found = &cands[i]
				}
			}
		}
		if found == nil {
			out = make([]byte, 4)
			out[1] = 0x01 // not supported
		} else {
			out = make([]byte, 4, 4+len(found.usage)+12)
			out[1] = 0x03 // supported, conforming to the standard
			binary.BigEndian.PutUint16(out[2:4], uint16(len(found.usage)))
			out = append(out, found.usage...)
			if rctd {
				out[1] |= 0x80
				var td [12]byte
				binary.BigEndian.PutUint16(td[0:2], 0x0a)
				out = append(out, td[:]...)
			}
		}
	default:
		return invalidCDB(2)
	}
	return dataIn(out, alloc)
}

// dataIn returns GOOD with data truncated to the allocation length.
func dataIn(data []byte, alloc uint32) Result {
	if uint32(len(data)) > alloc {
		data = data[:alloc]
	}
	return Result{Status: StatusGood, DataIn: data, TransferLen: alloc}
}

// startStopUnit implements START STOP UNIT. The medium is not removable:
// a load/eject request (LOEJ without a power condition) is refused, the
// rest is accepted and has no effect.
func (lu *LU) startStopUnit(cmd *Command) Result {
	b := cmd.CDB[4]
	if b>>4 == 0 && b&0x02 != 0 {
		return checkCondition(senseCode{key: SenseIllegalRequest, ascq: ascInvalidFieldInCDB, sks: fieldPointer(true, 4, 1)})
	}
	return good()
}
