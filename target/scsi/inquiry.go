package scsi

import (
	"encoding/binary"
	"encoding/hex"
)

// Version descriptors (SPC-4 table 51).
const (
	verSAM5  = 0x00a0
	verSPC4  = 0x0460
	verSBC3  = 0x04c0
	verISCSI = 0x0960
)

// VPD page codes.
const (
	vpdSupported       = 0x00
	vpdSerial          = 0x80
	vpdDeviceID        = 0x83
	vpdBlockLimits     = 0xb0
	vpdBlockDevChar    = 0xb1
	vpdLogicalBlockPrv = 0xb2
)

// putASCII copies s into b padded with spaces.
func putASCII(b []byte, s string) {
	n := copy(b, s)
	for i := n; i < len(b); i++ {
		b[i] = ' '
	}
}

// inquiry implements INQUIRY. present is false for a LUN that does not
// exist: the standard data then carries peripheral qualifier 011b.
func (lu *LU) inquiry(cmd *Command, present bool) Result {
	cdb := cmd.CDB
	if len(cdb) < 6 {
		return invalidCDB(len(cdb))
	}
	if cdb[1]&^0x01 != 0 {
		return invalidCDB(1)
	}
	evpd := cdb[1]&0x01 != 0
	page := cdb[2]
	alloc := uint32(binary.BigEndian.Uint16(cdb[3:5]))
	if !present {
		if evpd {
			return invalidCDB(1)
		}
		if page != 0 {
			return invalidCDB(2)
		}
		d := lu.standardInquiry()
		d[0] = 0x7f // qualifier 011b, device type 1Fh: no LU here
		return dataIn(d, alloc)
	}
	if !evpd {
		if page != 0 {
			return invalidCDB(2)
		}
		return dataIn(lu.standardInquiry(), alloc)
	}
	var d []byte
	switch page {
	case vpdSupported:
		pages := []byte{vpdSupported, vpdSerial, vpdDeviceID, vpdBlockLimits, vpdBlockDevChar, vpdLogicalBlockPrv}
		d = vpdHeader(page, len(pages))
		copy(d[4:], pages)
	case vpdSerial:
		d = vpdHeader(page, len(lu.cfg.Serial))
		copy(d[4:], lu.cfg.Serial)
	case vpdDeviceID:
		d = lu.deviceIDPage()
	case vpdBlockLimits:
		d = lu.blockLimitsPage()
	case vpdBlockDevChar:
		d = vpdHeader(page, 0x3c)
		binary.BigEndian.PutUint16(d[4:6], 0x0001) // non-rotating medium
	case vpdLogicalBlockPrv:
		d = vpdHeader(page, 4)
		if lu.cfg.ThinProvisioning {
			d[5] = 0x80 | 0x40 | 0x20 | 0x04 // LBPU, LBPWS, LBPWS10, LBPRZ
			d[6] = 0x02                      // thin provisioned
		}
	default:
		return invalidCDB(2)
	}
	return dataIn(d, alloc)
}

func vpdHeader(page byte, n int) []byte {
	d := make([]byte, 4+n)
	d[1] = page
	binary.BigEndian.PutUint16(d[2:4], uint16(n))
	return d
}

func (lu *LU) standardInquiry() []byte {
	d := make([]byte, 96)
	d[0] = 0x00 // connected, direct access block device
	d[2] = 0x06 // SPC-4
	d[3] = 0x12 // HISUP, response data format 2
	d[4] = byte(len(d) - 5)
	if lu.cfg.ALUA != nil {
		d[5] = tpgsImplicit
		d[6] = 0x10 // MULTIP: more than one port
	}
	d[7] = 0x02 // CMDQUE
	putASCII(d[8:16], lu.cfg.Vendor)
	putASCII(d[16:32], lu.cfg.Product)
	putASCII(d[32:36], lu.cfg.Revision)
	for i, v := range []uint16{verSAM5, verSPC4, verSBC3, verISCSI} {
		binary.BigEndian.PutUint16(d[58+2*i:], v)
	}
	return d
}

// deviceIDPage builds VPD 0x83: an NAA 6 designator and a T10 vendor ID
// designator, both associated with the logical unit (the same on every
// path), and with ALUA the relative target port and target port group of
// the port the command came through (alua.go).
func (lu *LU) deviceIDPage() []byte {
	naa := make([]byte, 4+16)
	naa[0] = 0x01 // code set binary
	naa[1] = 0x03 // association LU, designator type NAA
	naa[3] = 16
	copy(naa[4:], lu.cfg.DeviceID[:])
	naa[4] = 0x60 | naa[4]&0x0f

	t10id := make([]byte, 8+32)
	putASCII(t10id[:8], lu.cfg.Vendor)
	hex.Encode(t10id[8:], lu.cfg.DeviceID[:])
	t10 := make([]byte, 4+len(t10id))
	t10[0] = 0x02 // code set ASCII
	t10[1] = 0x01 // association LU, designator type T10 vendor ID
	t10[3] = byte(len(t10id))
	copy(t10[4:], t10id)

	port := lu.portDesignators()
	d := vpdHeader(vpdDeviceID, len(naa)+len(t10)+len(port))
	copy(d[4:], naa)
	copy(d[4+len(naa):], t10)
	copy(d[4+len(naa)+len(t10):], port)
	return d
}

// maxCompareAndWrite is the VPD B0 MAXIMUM COMPARE AND WRITE LENGTH.
func (lu *LU) maxCompareAndWrite() uint32 {
	m := uint32(255)
	if lu.cfg.MaxTransferBlocks != 0 && lu.cfg.MaxTransferBlocks < m {
		m = lu.cfg.MaxTransferBlocks
	}
	return m
}

func (lu *LU) maxUnmapBlocks() uint32 {
	if lu.cfg.MaxUnmapBlocks == 0 {
		return 0xffffffff
	}
	return lu.cfg.MaxUnmapBlocks
}

func (lu *LU) blockLimitsPage() []byte {
	d := vpdHeader(vpdBlockLimits, 0x3c)
	d[4] = 0x01 // WSNZ: WRITE SAME with 0 blocks is refused
	d[5] = byte(lu.maxCompareAndWrite())
	otg := lu.cfg.OptimalTransferBlocks
	if otg > 0xffff {
		otg = 0
	}
	binary.BigEndian.PutUint16(d[6:8], uint16(otg))
	binary.BigEndian.PutUint32(d[8:12], lu.cfg.MaxTransferBlocks)
	if lu.cfg.ThinProvisioning {
		binary.BigEndian.PutUint32(d[20:24], lu.maxUnmapBlocks())
		binary.BigEndian.PutUint32(d[24:28], maxUnmapDescriptors)
		binary.BigEndian.PutUint32(d[28:32], lu.cfg.OptimalTransferBlocks)
	}
	binary.BigEndian.PutUint64(d[36:44], uint64(lu.cfg.MaxWriteSameBlocks))
	return d
}

// reportLUNs implements REPORT LUNS: LUN 0 only.
func (lu *LU) reportLUNs(cmd *Command) Result {
	cdb := cmd.CDB
	if len(cdb) < 12 {
		return invalidCDB(len(cdb))
	}
	if cdb[2] > 2 {
		return invalidCDB(2)
	}
	alloc := binary.BigEndian.Uint32(cdb[6:10])
	if alloc < 16 {
		return invalidCDB(6)
	}
	d := make([]byte, 16)
	binary.BigEndian.PutUint32(d[0:4], 8)
	return dataIn(d, alloc)
}

// requestSense implements REQUEST SENSE: a pending unit attention is
// reported (and cleared) when st is given, else NO SENSE.
func (lu *LU) requestSense(cmd *Command, st *nexusState, takeUA bool) Result {
	cdb := cmd.CDB
	if len(cdb) < 6 {
		return invalidCDB(len(cdb))
	}
	if cdb[1]&^0x01 != 0 {
		return invalidCDB(1)
	}
	if cdb[1]&0x01 != 0 {
		// Descriptor format sense data is not supported.
		return invalidCDB(1)
	}
	alloc := uint32(cdb[4])
	c := senseCode{key: SenseNoSense, ascq: ascNoAdditional}
	if cmd.LUN != 0 {
		c = senseCode{key: SenseIllegalRequest, ascq: ascLUNotSupported}
	} else if takeUA && st != nil {
		if ua, ok := st.popUA(); ok {
			c = ua
		}
	}
	return dataIn(c.bytes(), alloc)
}
