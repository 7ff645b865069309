package scsi

import (
	"context"
	"encoding/binary"
	"errors"
)

// Additional sense codes (ASC/ASCQ pairs) used by the device server.
const (
	ascNoAdditional          = 0x0000
	ascNotReadyManual        = 0x0403
	ascNotReadyTransition    = 0x040a // ASYMMETRIC ACCESS STATE TRANSITION
	ascWriteError            = 0x0c00
	ascUnrecoveredRead       = 0x1100
	ascParamListLength       = 0x1a00
	ascMiscompare            = 0x1d00
	ascInvalidOpcode         = 0x2000
	ascLBAOutOfRange         = 0x2100
	ascInvalidFieldInCDB     = 0x2400
	ascLUNotSupported        = 0x2500
	ascInvalidFieldInParam   = 0x2600
	ascInvalidReleasePR      = 0x2604
	ascWriteProtected        = 0x2700
	ascPowerOnReset          = 0x2900
	ascBusDeviceReset        = 0x2903
	ascParametersChanged     = 0x2a00
	ascReservationsPreempted = 0x2a03
	ascReservationsReleased  = 0x2a04
	ascRegistrationsPreempt  = 0x2a05
	ascCapacityChanged       = 0x2a09
	ascSavingNotSupported    = 0x3900
	ascInsufficientResources = 0x5503
	ascInsufficientRegs      = 0x5504 // INSUFFICIENT REGISTRATION RESOURCES
)

// senseCode is a sense key with its ASC/ASCQ.
type senseCode struct {
	key     byte
	ascq    uint16 // ASC << 8 | ASCQ
	info    uint64 // INFORMATION field, when infoSet
	infoSet bool
	sks     [3]byte // sense key specific bytes, when sks[0]&0x80 != 0
}

// fixedSenseLen is the length of the fixed-format sense data we build.
const fixedSenseLen = 18

// bytes renders c as fixed-format sense data (SPC-4 4.5.3).
func (c senseCode) bytes() []byte {
	b := make([]byte, fixedSenseLen)
	c.put(b)
	return b
}

func (c senseCode) put(b []byte) {
	b[0] = 0x70
	b[2] = c.key & 0x0f
	if c.infoSet {
		// The INFORMATION field is four bytes; set VALID only when the
		// value fits.
		if c.info <= 0xffffffff {
			b[0] |= 0x80
		}
		binary.BigEndian.PutUint32(b[3:7], uint32(c.info))
	}
	b[7] = fixedSenseLen - 8
	b[12] = byte(c.ascq >> 8)
	b[13] = byte(c.ascq)
	copy(b[15:18], c.sks[:])
}

// checkCondition returns a CHECK CONDITION result for c.
func checkCondition(c senseCode) Result {
	return Result{Status: StatusCheckCondition, Sense: c.bytes()}
}

func sense(key byte, ascq uint16) Result {
	return checkCondition(senseCode{key: key, ascq: ascq})
}

// fieldPointer builds sense key specific field pointer bytes: cd says the
// field is in the CDB (else in the parameter list), bit < 0 means no bit
// pointer.
func fieldPointer(cd bool, field int, bit int) [3]byte {
	var s [3]byte
	s[0] = 0x80
	if cd {
		s[0] |= 0x40
	}
	if bit >= 0 && bit < 8 {
		s[0] |= 0x08 | byte(bit)
	}
	binary.BigEndian.PutUint16(s[1:3], uint16(field))
	return s
}

// invalidCDB is ILLEGAL REQUEST, INVALID FIELD IN CDB pointing at byte
// field of the CDB.
func invalidCDB(field int) Result {
	return checkCondition(senseCode{key: SenseIllegalRequest, ascq: ascInvalidFieldInCDB, sks: fieldPointer(true, field, -1)})
}

// invalidParam is ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST
// pointing at byte field of the parameter list.
func invalidParam(field int) Result {
	return checkCondition(senseCode{key: SenseIllegalRequest, ascq: ascInvalidFieldInParam, sks: fieldPointer(false, field, -1)})
}

func lbaOutOfRange() Result { return sense(SenseIllegalRequest, ascLBAOutOfRange) }

func invalidOpcode() Result {
	return checkCondition(senseCode{key: SenseIllegalRequest, ascq: ascInvalidOpcode, sks: fieldPointer(true, 0, -1)})
}

func paramListLengthError() Result { return sense(SenseIllegalRequest, ascParamListLength) }

func writeProtected() Result { return sense(SenseDataProtect, ascWriteProtected) }

func reservationConflict() Result { return Result{Status: StatusReservationConflict} }

func good() Result { return Result{Status: StatusGood} }

// miscompare is MISCOMPARE, MISCOMPARE DURING VERIFY OPERATION with the
// byte offset of the first difference in INFORMATION.
func miscompare(off uint64) Result {
	return checkCondition(senseCode{key: SenseMiscompare, ascq: ascMiscompare, info: off, infoSet: true})
}

// backendError turns a Backend error into a Result: the command is
// aborted on cancellation, a *SenseError chooses the sense, anything else
// is a MEDIUM ERROR (asc depends on the direction).
func (lu *LU) backendError(ctx context.Context, op string, off int64, err error, write bool) Result {
	// Only the command's own context ending means "abandoned, send
	// nothing": a backend's internal timeout (a store or peer that did
	// not answer) is an error the initiator must hear about.
	if ctx.Err() != nil {
		return Result{Aborted: true}
	}
	if errors.Is(err, ErrRunRemotely) {
		return Result{runRemotely: true}
	}
	if errors.Is(err, ErrRunRemotely) {
		return Result{runRemotely: true}
	}
	if se, ok := AsSense(err); ok {
		lu.log.Warn("scsi: backend error", "op", op, "offset", off, "err", err)
		return checkCondition(senseCode{key: se.Key, ascq: uint16(se.ASC)<<8 | uint16(se.ASCQ)})
	}
	lu.log.Warn("scsi: backend error", "op", op, "offset", off, "err", err)
	if write {
		return sense(SenseMediumError, ascWriteError)
	}
	return sense(SenseMediumError, ascUnrecoveredRead)
}
