// Package iscsi is ukai's iSCSI target layer (RFC 7143, ErrorRecoveryLevel 0,
// one connection per session). It speaks the protocol on a listener bound
// exactly where it is told, and hands SCSI commands to a scsi.LU.
package iscsi

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// Initiator opcodes.
const (
	opNopOut    = 0x00
	opSCSICmd   = 0x01
	opTMFReq    = 0x02
	opLoginReq  = 0x03
	opTextReq   = 0x04
	opDataOut   = 0x05
	opLogoutReq = 0x06
	opSNACK     = 0x10
)

// Target opcodes.
const (
	opNopIn      = 0x20
	opSCSIResp   = 0x21
	opTMFResp    = 0x22
	opLoginResp  = 0x23
	opTextResp   = 0x24
	opDataIn     = 0x25
	opLogoutResp = 0x26
	opR2T        = 0x31
	opAsync      = 0x32
	opReject     = 0x3f
)

// Reject reasons (RFC 7143 11.17.1).
const (
	rejectDataDigest      = 0x02
	rejectSNACK           = 0x03
	rejectProtocolError   = 0x04
	rejectNotSupported    = 0x05
	rejectImmediate       = 0x06
	rejectTaskInProgress  = 0x07
	rejectInvalidDataAck  = 0x08
	rejectInvalidPDUField = 0x09
	rejectLongOp          = 0x0a
	rejectWaitingLogout   = 0x0c
)

const (
	bhsLen = 48
	// maxAHSLen is the largest AHS the 1-byte TotalAHSLength can express.
	maxAHSLen = 255 * 4
	// reservedTag is the all-ones Initiator/Target Transfer Tag.
	reservedTag = 0xffffffff
	// loginMaxData bounds data segments before MaxRecvDataSegmentLength is
	// negotiated (RFC 7143 13.12: 8192 during login).
	loginMaxData = 8192
)

// Header flag bits.
const (
	flagFinal     = 0x80
	flagImmediate = 0x40 // in byte 0
	flagRead      = 0x40 // SCSI Command
	flagWrite     = 0x20 // SCSI Command
	flagContinue  = 0x40 // Login/Text
	flagTransit   = 0x80 // Login
	flagAck       = 0x40 // Data-In
	flagOverflow  = 0x04 // SCSI Response / Data-In O
	flagUnderflow = 0x02 // SCSI Response / Data-In U
	flagStatus    = 0x01 // Data-In S
)

var crc32cTable = crc32.MakeTable(crc32.Castagnoli)

// bhs is a Basic Header Segment.
type bhs [bhsLen]byte

func (h *bhs) opcode() byte       { return h[0] & 0x3f }
func (h *bhs) immediate() bool    { return h[0]&flagImmediate != 0 }
func (h *bhs) flags() byte        { return h[1] }
func (h *bhs) final() bool        { return h[1]&flagFinal != 0 }
func (h *bhs) totalAHSLen() int   { return int(h[4]) * 4 }
func (h *bhs) dataLen() int       { return int(h[5])<<16 | int(h[6])<<8 | int(h[7]) }
func (h *bhs) u32(off int) uint32 { return binary.BigEndian.Uint32(h[off:]) }
func (h *bhs) u16(off int) uint16 { return binary.BigEndian.Uint16(h[off:]) }
func (h *bhs) itt() uint32        { return h.u32(16) }
func (h *bhs) lunRaw() [8]byte    { return [8]byte(h[8:16]) }

func (h *bhs) setU32(off int, v uint32) { binary.BigEndian.PutUint32(h[off:], v) }
func (h *bhs) setU16(off int, v uint16) { binary.BigEndian.PutUint16(h[off:], v) }
func (h *bhs) setDataLen(n int) {
	h[5], h[6], h[7] = byte(n>>16), byte(n>>8), byte(n)
}

// Field offsets shared by most PDUs.
const (
	offITT      = 16
	offTTT      = 20
	offCmdSN    = 24 // initiator PDUs
	offExpStat  = 28 // initiator PDUs
	offStatSN   = 24 // target PDUs
	offExpCmdSN = 28 // target PDUs
	offMaxCmdSN = 32 // target PDUs
	offDataSN   = 36
	offBufOff   = 40
	offResidual = 44
	offEDTL     = 20 // SCSI Command
)

// pdu is one decoded PDU: header, additional header segments and data.
type pdu struct {
	h    bhs
	ahs  []byte
	data []byte
}

func (p *pdu) String() string {
	return fmt.Sprintf("pdu(op=%#x itt=%#x len=%d)", p.h.opcode(), p.h.itt(), p.h.dataLen())
}

// padLen is the number of pad bytes after a data segment of n bytes.
func padLen(n int) int { return (4 - n&3) & 3 }

// errDigest reports a header or data digest mismatch.
var errDigest = errors.New("digest mismatch")

// errTooLarge reports a data segment beyond the negotiated limit.
var errTooLarge = errors.New("data segment too large")

// pduReader decodes PDUs from a stream, never allocating beyond maxData for
// a data segment nor beyond maxAHSLen for AHS.
type pduReader struct {
	r          *bufio.Reader
	hdrDigest  bool
	dataDigest bool
	maxData    int
	ahsBuf     [maxAHSLen]byte
	scratch    []byte
	n          uint64 // bytes read
}

func newPDUReader(r io.Reader, maxData int) *pduReader {
	br, ok := r.(*bufio.Reader)
	if !ok {
		br = bufio.NewReaderSize(r, 64<<10)
	}
	return &pduReader{r: br, maxData: maxData}
}

// readHeader reads the BHS, the AHS (into p.ahs, valid until the next call)
// and the header digest, but not the data segment.
func (pr *pduReader) readHeader(p *pdu) error {
	if _, err := io.ReadFull(pr.r, p.h[:]); err != nil {
		return err
	}
	pr.n += bhsLen
	ahsLen := p.h.totalAHSLen()
	p.ahs = pr.ahsBuf[:ahsLen]
	if ahsLen > 0 {
		if _, err := io.ReadFull(pr.r, p.ahs); err != nil {
			return fmt.Errorf("read AHS: %w", noEOF(err))
		}
		pr.n += uint64(ahsLen)
	}
	if pr.hdrDigest {
		var d [4]byte
		if _, err := io.ReadFull(pr.r, d[:]); err != nil {
			return fmt.Errorf("read header digest: %w", noEOF(err))
		}
		pr.n += 4
		crc := crc32.Update(0, crc32cTable, p.h[:])
		crc = crc32.Update(crc, crc32cTable, p.ahs)
		if binary.LittleEndian.Uint32(d[:]) != crc {
			return fmt.Errorf("header: %w", errDigest)
		}
	}
	if n := p.h.dataLen(); n > pr.maxData {
		return fmt.Errorf("%w: %d > %d (opcode %#x)", errTooLarge, n, pr.maxData, p.h.opcode())
	}
	return nil
}

// readData reads the data segment announced by h into dst, which must be
// exactly h.dataLen() long, then the padding and the data digest.
func (pr *pduReader) readData(h *bhs, dst []byte) error {
	n := h.dataLen()
	if len(dst) != n {
		return fmt.Errorf("readData: buffer %d for segment %d", len(dst), n)
	}
	if n == 0 {
		return nil
	}
	if _, err := io.ReadFull(pr.r, dst); err != nil {
		return fmt.Errorf("read data: %w", noEOF(err))
	}
	var tail [7]byte
	pad := padLen(n)
	tl := pad
	if pr.dataDigest {
		tl += 4
	}
	if tl > 0 {
		if _, err := io.ReadFull(pr.r, tail[:tl]); err != nil {
			return fmt.Errorf("read data pad: %w", noEOF(err))
		}
	}
	pr.n += uint64(n + tl)
	if pr.dataDigest {
		crc := crc32.Update(0, crc32cTable, dst)
		crc = crc32.Update(crc, crc32cTable, tail[:pad])
		if binary.LittleEndian.Uint32(tail[pad:pad+4]) != crc {
			return fmt.Errorf("data: %w", errDigest)
		}
	}
	return nil
}

// discardData reads and drops the data segment announced by h.
func (pr *pduReader) discardData(h *bhs) error {
	_, err := pr.readScratch(h)
	return err
}

// readScratch reads the data segment into the reader's scratch buffer,
// valid until the next read.
func (pr *pduReader) readScratch(h *bhs) ([]byte, error) {
	n := h.dataLen()
	if n == 0 {
		return nil, nil
	}
	if cap(pr.scratch) < n {
		pr.scratch = make([]byte, n)
	}
	return pr.scratch[:n], pr.readData(h, pr.scratch[:n])
}

// readPDU reads one whole PDU, its data in a freshly allocated slice.
func (pr *pduReader) readPDU() (*pdu, error) {
	p := new(pdu)
	if err := pr.readHeader(p); err != nil {
		return nil, err
	}
	if len(p.ahs) > 0 {
		p.ahs = append([]byte(nil), p.ahs...)
	}
	if n := p.h.dataLen(); n > 0 {
		p.data = make([]byte, n)
		if err := pr.readData(&p.h, p.data); err != nil {
			return nil, err
		}
	}
	return p, nil
}

func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// marshal encodes p (with digests as asked) into one byte slice. The hot
// path uses the writer's vectored form instead; this is for login and tests.
func (p *pdu) marshal(hdrDigest, dataDigest bool) []byte {
	h := p.h
	if len(p.ahs)%4 != 0 || len(p.ahs) > maxAHSLen {
		panic("iscsi: bad AHS length")
	}
	h[4] = byte(len(p.ahs) / 4)
	h.setDataLen(len(p.data))
	out := make([]byte, 0, bhsLen+len(p.ahs)+8+len(p.data)+8)
	out = append(out, h[:]...)
	out = append(out, p.ahs...)
	if hdrDigest {
		out = binary.LittleEndian.AppendUint32(out, crc32.Checksum(out, crc32cTable))
	}
	if len(p.data) > 0 {
		start := len(out)
		out = append(out, p.data...)
		out = append(out, make([]byte, padLen(len(p.data)))...)
		if dataDigest {
			out = binary.LittleEndian.AppendUint32(out, crc32.Checksum(out[start:], crc32cTable))
		}
	}
	return out
}

// cdb returns the full CDB of a SCSI Command PDU: the 16 bytes of the BHS
// plus an Extended CDB AHS (type 1) if present.
func (p *pdu) cdb() ([]byte, error) {
	base := p.h[32:48]
	ext, err := findAHS(p.ahs, 1)
	if err != nil {
		return nil, err
	}
	if ext == nil {
		return base, nil
	}
	// Extended CDB AHS: 1 reserved byte then the CDB bytes beyond 16.
	if len(ext) < 1 {
		return nil, errors.New("short extended CDB AHS")
	}
	cdb := make([]byte, 0, 16+len(ext)-1)
	cdb = append(cdb, base...)
	return append(cdb, ext[1:]...), nil
}

// findAHS walks the AHS list and returns the payload (after the 3-byte
// length/type header) of the first AHS of type typ.
func findAHS(ahs []byte, typ byte) ([]byte, error) {
	for len(ahs) > 0 {
		if len(ahs) < 4 {
			return nil, errors.New("truncated AHS")
		}
		l := int(binary.BigEndian.Uint16(ahs[0:2]))
		t := ahs[2]
		total := (3 + l + 3) &^ 3
		if l == 0 || total > len(ahs) {
			return nil, fmt.Errorf("bad AHS length %d", l)
		}
		if t == typ {
			return ahs[3 : 3+l], nil
		}
		ahs = ahs[total:]
	}
	return nil, nil
}

// decodeLUN decodes a SAM-5 single-level LUN in peripheral (00b) or flat
// (01b) addressing. Anything else (other methods, multi-level) is returned
// as the raw 64-bit value, which never equals a valid single-level LUN
// of 0 and so addresses no logical unit.
func decodeLUN(raw [8]byte) uint64 {
	if raw[2]|raw[3]|raw[4]|raw[5]|raw[6]|raw[7] == 0 {
		switch raw[0] >> 6 {
		case 0: // peripheral device addressing, bus 0
			if raw[0]&0x3f == 0 {
				return uint64(raw[1])
			}
		case 1: // flat space addressing
			return uint64(raw[0]&0x3f)<<8 | uint64(raw[1])
		}
	}
	v := binary.BigEndian.Uint64(raw[:])
	if v < 1<<14 {
		v |= 1 << 63
	}
	return v
}

// encodeLUN is the inverse of decodeLUN for LUNs below 16384.
func encodeLUN(lun uint64) [8]byte {
	var raw [8]byte
	switch {
	case lun < 256:
		raw[1] = byte(lun)
	case lun < 1<<14:
		raw[0] = 0x40 | byte(lun>>8)
		raw[1] = byte(lun)
	default:
		binary.BigEndian.PutUint64(raw[:], lun)
	}
	return raw
}

// serial number arithmetic (RFC 1982, 32 bits).
func snLess(a, b uint32) bool { return a != b && int32(a-b) < 0 }

// inWindow reports exp <= sn <= max in serial arithmetic.
func inWindow(sn, exp, max uint32) bool {
	d := max - exp
	if int32(d) < 0 { // empty window (max == exp-1)
		return false
	}
	return sn-exp <= d
}
