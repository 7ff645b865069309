package scsi

import (
	"bytes"
	"context"
	"encoding/binary"
)

// decodeRW decodes the LBA, the transfer length and the flags byte of the
// READ/WRITE/VERIFY/PRE-FETCH/SYNCHRONIZE CACHE/WRITE SAME CDB layouts. lenField
// is the CDB offset of the transfer length (for sense field pointers).
// The caller has checked the CDB length.
func decodeRW(cdb []byte) (lba uint64, n uint32, flags byte, lenField int) {
	switch cdb[0] >> 5 {
	case 0: // 6-byte
		lba = uint64(cdb[1]&0x1f)<<16 | uint64(cdb[2])<<8 | uint64(cdb[3])
		n = uint32(cdb[4])
		if n == 0 && (cdb[0] == opRead6 || cdb[0] == opWrite6) {
			n = 256
		}
		return lba, n, 0, 4
	case 1, 2: // 10-byte
		return uint64(binary.BigEndian.Uint32(cdb[2:6])), uint32(binary.BigEndian.Uint16(cdb[7:9])), cdb[1], 7
	case 5: // 12-byte
		return uint64(binary.BigEndian.Uint32(cdb[2:6])), binary.BigEndian.Uint32(cdb[6:10]), cdb[1], 6
	default: // 16-byte
		return binary.BigEndian.Uint64(cdb[2:10]), binary.BigEndian.Uint32(cdb[10:14]), cdb[1], 10
	}
}

// inRange reports whether blocks [lba, lba+n) are inside the LU.
func (lu *LU) inRange(lba uint64, n uint64) bool {
	nb := lu.numBlocks()
	return lba <= nb && n <= nb-lba
}

// checkTransfer validates a data-transferring command's length against
// the MAXIMUM TRANSFER LENGTH and the 32-bit iSCSI transfer size.
func (lu *LU) checkTransfer(n uint32) (uint64, bool) {
	if lu.cfg.MaxTransferBlocks != 0 && n > lu.cfg.MaxTransferBlocks {
		return 0, false
	}
	b := uint64(n) << lu.shift
	if b > 0xffffffff {
		return 0, false
	}
	return b, true
}

func (lu *LU) read(ctx context.Context, cmd *Command) Result {
	lba, n, flags, lf := decodeRW(cmd.CDB)
	if flags&0xe0 != 0 { // RDPROTECT: no protection information
		return invalidCDB(1)
	}
	if !lu.inRange(lba, uint64(n)) {
		return lbaOutOfRange()
	}
	size, ok := lu.checkTransfer(n)
	if !ok {
		return invalidCDB(lf)
	}
	if n == 0 {
		return good()
	}
	readLen := size
	if readLen > bigReadThreshold && readLen > uint64(cmd.ExpectedLen) {
		// The transport sends at most ExpectedLen bytes: do not
		// allocate (and read) what nobody will receive.
		readLen = uint64(cmd.ExpectedLen) &^ uint64(lu.bs-1)
	}
	if readLen == 0 {
		return Result{Status: StatusGood, TransferLen: uint32(size)}
	}
	buf := lu.bufs.get(int(readLen))
	off := int64(lba << lu.shift)
	if err := lu.be.ReadAt(ctx, buf, off); err != nil {
		lu.bufs.put(buf)
		return lu.backendError(ctx, "read", off, err, false)
	}
	return Result{Status: StatusGood, DataIn: buf, TransferLen: uint32(size), release: func() { lu.bufs.put(buf) }}
}

func isWriteVerify(op byte) bool {
	return op == opWriteVerify10 || op == opWriteVerify12 || op == opWriteVerify16
}

// write implements WRITE(6/10/12/16) and WRITE AND VERIFY(10/12/16).
// When the initiator sent less than the CDB transfer length only the
// whole blocks it sent are written (as tgtd does; the transport reports
// the residual overflow).
func (lu *LU) write(ctx context.Context, cmd *Command) Result {
	op := cmd.CDB[0]
	lba, n, flags, lf := decodeRW(cmd.CDB)
	if flags&0xe0 != 0 { // WRPROTECT
		return invalidCDB(1)
	}
	wv := isWriteVerify(op)
	if wv && (flags>>1)&0x03 > 1 { // BYTCHK 10b/11b are reserved here
		return invalidCDB(1)
	}
	if lu.cfg.ReadOnly {
		return writeProtected()
	}
	if !lu.inRange(lba, uint64(n)) {
		return lbaOutOfRange()
	}
	size, ok := lu.checkTransfer(n)
	if !ok {
		return invalidCDB(lf)
	}
	if n == 0 {
		return good()
	}
	data := cmd.DataOut
	if uint64(len(data)) > size {
		data = data[:size]
	}
	data = data[:len(data)&^int(lu.bs-1)]
	if len(data) > 0 {
		fua := flags&0x08 != 0 || !lu.cfg.WriteCache || wv
		off := int64(lba << lu.shift)
		h := lu.caw.writeLock(lba, lba+uint64(len(data))>>lu.shift)
		err := lu.be.WriteAt(ctx, data, off, fua)
		lu.caw.writeUnlock(h)
		if err != nil {
			return lu.backendError(ctx, "write", off, err, true)
		}
	}
	return Result{Status: StatusGood, TransferLen: uint32(size)}
}

// verify implements VERIFY(10/12/16): BYTCHK 0 checks the blocks are
// readable, 1 compares them with the data-out, 3 compares each with the
// single data-out block.
func (lu *LU) verify(ctx context.Context, cmd *Command) Result {
	lba, n, flags, lf := decodeRW(cmd.CDB)
	if flags&0xe0 != 0 { // VRPROTECT
		return invalidCDB(1)
	}
	bytchk := (flags >> 1) & 0x03
	if bytchk == 2 {
		return invalidCDB(1)
	}
	if !lu.inRange(lba, uint64(n)) {
		return lbaOutOfRange()
	}
	var xfer uint64
	switch bytchk {
	case 1:
		size, ok := lu.checkTransfer(n)
		if !ok {
			return invalidCDB(lf)
		}
		xfer = size
	case 3:
		xfer = uint64(lu.bs)
	}
	if n == 0 {
		return good()
	}
	total := uint64(n) << lu.shift
	chunk := total
	if chunk > writeChunk {
		chunk = writeChunk
	}
	buf := make([]byte, chunk)
	data := cmd.DataOut
	if bytchk != 0 && uint64(len(data)) < xfer {
		// The initiator sent less than the CDB asks for.
		return invalidCDB(lf)
	}
	base := int64(lba << lu.shift)
	for done := uint64(0); done < total; {
		c := min(chunk, total-done)
		off := base + int64(done)
		if err := lu.be.ReadAt(ctx, buf[:c], off); err != nil {
			return lu.backendError(ctx, "verify", off, err, false)
		}
		switch bytchk {
		case 1:
			if i := firstDiff(buf[:c], data[done:done+c]); i >= 0 {
				return miscompare(done + uint64(i))
			}
		case 3:
			for b := uint64(0); b < c; b += uint64(lu.bs) {
				if i := firstDiff(buf[b:b+uint64(lu.bs)], data[:lu.bs]); i >= 0 {
					return miscompare(done + b + uint64(i))
				}
			}
		}
		done += c
	}
	return Result{Status: StatusGood, TransferLen: uint32(xfer)}
}

// firstDiff returns the index of the first differing byte, or -1.
func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	// Narrow down by halves using the fast comparison, then scan.
	lo, hi := 0, len(a)
	for hi-lo > 64 {
		mid := lo + (hi-lo)/2
		if !bytes.Equal(a[lo:mid], b[lo:mid]) {
			hi = mid
		} else {
			lo = mid
		}
	}
	for i := lo; i < hi; i++ {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// prefetch implements PRE-FETCH(10/16). There is no cache to fill: the
// blocks are as available as they will ever be, so CONDITION MET.
func (lu *LU) prefetch(cmd *Command) Result {
	lba, n, _, _ := decodeRW(cmd.CDB)
	if !lu.inRange(lba, uint64(n)) {
		return lbaOutOfRange()
	}
	return Result{Status: StatusConditionMet}
}

// syncCache implements SYNCHRONIZE CACHE(10/16) with Backend.Flush.
func (lu *LU) syncCache(ctx context.Context, cmd *Command) Result {
	lba, n, _, _ := decodeRW(cmd.CDB)
	if !lu.inRange(lba, uint64(n)) {
		return lbaOutOfRange()
	}
	if err := lu.be.Flush(ctx); err != nil {
		return lu.backendError(ctx, "flush", 0, err, true)
	}
	return good()
}

// AllZero reports whether every byte of b is zero (WRITE SAME with
// UNMAP here; elsewhere, data that need not be written to a thin copy).
func AllZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// writeSame implements WRITE SAME(10/16).
func (lu *LU) writeSame(ctx context.Context, cmd *Command) Result {
	cdb := cmd.CDB
	lba, n, flags, lf := decodeRW(cdb)
	if flags&0xe0 != 0 { // WRPROTECT
		return invalidCDB(1)
	}
	if flags&0x10 != 0 { // ANCHOR
		return invalidCDB(1)
	}
	if flags&0x06 != 0 { // PBDATA, LBDATA
		return invalidCDB(1)
	}
	unmapBit := flags&0x08 != 0
	ndob := cdb[0] == opWriteSame16 && flags&0x01 != 0
	if lu.cfg.ReadOnly {
		return writeProtected()
	}
	if !lu.inRange(lba, uint64(n)) {
		return lbaOutOfRange()
	}
	if n == 0 { // WSNZ
		return invalidCDB(lf)
	}
	if lu.cfg.MaxWriteSameBlocks != 0 && n > lu.cfg.MaxWriteSameBlocks {
		return invalidCDB(lf)
	}
	var block []byte
	var xfer uint32
	if ndob {
		block = make([]byte, lu.bs)
	} else {
		if int64(len(cmd.DataOut)) != lu.bs {
			return invalidCDB(lf)
		}
		block = cmd.DataOut
		xfer = uint32(lu.bs)
	}
	off := int64(lba << lu.shift)
	total := int64(n) << lu.shift
	h := lu.caw.writeLock(lba, lba+uint64(n))
	defer lu.caw.writeUnlock(h)
	if unmapBit && lu.cfg.ThinProvisioning && AllZero(block) {
		if err := lu.be.Unmap(ctx, off, total); err != nil {
			return lu.backendError(ctx, "write same unmap", off, err, true)
		}
		return Result{Status: StatusGood, TransferLen: xfer}
	}
	chunk := min(total, writeChunk)
	buf := make([]byte, chunk)
	for i := int64(0); i < chunk; i += lu.bs {
		copy(buf[i:], block)
	}
	fua := !lu.cfg.WriteCache
	for done := int64(0); done < total; {
		c := min(chunk, total-done)
		if err := lu.be.WriteAt(ctx, buf[:c], off+done, fua); err != nil {
			return lu.backendError(ctx, "write same", off+done, err, true)
		}
		done += c
	}
	return Result{Status: StatusGood, TransferLen: xfer}
}

// unmap implements UNMAP.
func (lu *LU) unmap(ctx context.Context, cmd *Command) Result {
	cdb := cmd.CDB
	if cdb[1]&0x01 != 0 { // ANCHOR
		return invalidCDB(1)
	}
	if lu.cfg.ReadOnly {
		return writeProtected()
	}
	plen := uint32(binary.BigEndian.Uint16(cdb[7:9]))
	if plen == 0 {
		return good()
	}
	if plen < 8 {
		return paramListLengthError()
	}
	data := cmd.DataOut
	if uint32(len(data)) > plen {
		data = data[:plen]
	}
	if len(data) < 8 {
		return paramListLengthError()
	}
	bddl := int(binary.BigEndian.Uint16(data[2:4]))
	if bddl > len(data)-8 {
		bddl = len(data) - 8
	}
	nd := bddl / 16
	if nd > maxUnmapDescriptors {
		return invalidParam(2)
	}
	maxBlocks := lu.maxUnmapBlocks()
	for i := 0; i < nd; i++ {
		d := data[8+16*i:]
		lba := binary.BigEndian.Uint64(d[0:8])
		num := binary.BigEndian.Uint32(d[8:12])
		if num > maxBlocks {
			return invalidParam(8 + 16*i + 8)
		}
		if !lu.inRange(lba, uint64(num)) {
			return lbaOutOfRange()
		}
	}
	h := lu.caw.writeLock(0, lu.numBlocks())
	defer lu.caw.writeUnlock(h)
	for i := 0; i < nd; i++ {
		d := data[8+16*i:]
		lba := binary.BigEndian.Uint64(d[0:8])
		num := binary.BigEndian.Uint32(d[8:12])
		if num == 0 {
			continue
		}
		off := int64(lba << lu.shift)
		if err := lu.be.Unmap(ctx, off, int64(num)<<lu.shift); err != nil {
			return lu.backendError(ctx, "unmap", off, err, true)
		}
	}
	return Result{Status: StatusGood, TransferLen: plen}
}

// compareAndWrite implements COMPARE AND WRITE, atomic with respect to
// every other write of the range.
func (lu *LU) compareAndWrite(ctx context.Context, cmd *Command) Result {
	cdb := cmd.CDB
	flags := cdb[1]
	if flags&0xe0 != 0 { // WRPROTECT
		return invalidCDB(1)
	}
	lba := binary.BigEndian.Uint64(cdb[2:10])
	n := uint32(cdb[13])
	if lu.cfg.ReadOnly {
		return writeProtected()
	}
	if n > lu.maxCompareAndWrite() {
		return invalidCDB(13)
	}
	if !lu.inRange(lba, uint64(n)) {
		return lbaOutOfRange()
	}
	size := int64(n) << lu.shift
	if n == 0 && len(cmd.DataOut) == 0 {
		return good()
	}
	if int64(len(cmd.DataOut)) != 2*size {
		// The data-out must hold exactly the verify and write data.
		return invalidCDB(13)
	}
	verifyData, writeData := cmd.DataOut[:size], cmd.DataOut[size:2*size]
	off := int64(lba << lu.shift)
	h := lu.caw.cawLockRange(lba, lba+uint64(n))
	defer lu.caw.cawUnlock(h)
	buf := make([]byte, size)
	if err := lu.be.ReadAt(ctx, buf, off); err != nil {
		return lu.backendError(ctx, "compare and write read", off, err, false)
	}
	if i := firstDiff(buf, verifyData); i >= 0 {
		return miscompare(uint64(i))
	}
	fua := flags&0x08 != 0 || !lu.cfg.WriteCache
	if err := lu.be.WriteAt(ctx, writeData, off, fua); err != nil {
		return lu.backendError(ctx, "compare and write", off, err, true)
	}
	return Result{Status: StatusGood, TransferLen: uint32(2 * size)}
}

func (lu *LU) readCapacity10(cmd *Command) Result {
	cdb := cmd.CDB
	pmi := cdb[8]&0x01 != 0
	if !pmi && binary.BigEndian.Uint32(cdb[2:6]) != 0 {
		return invalidCDB(2)
	}
	last := lu.numBlocks() - 1
	if last > 0xffffffff {
		last = 0xffffffff
	}
	d := make([]byte, 8)
	binary.BigEndian.PutUint32(d[0:4], uint32(last))
	binary.BigEndian.PutUint32(d[4:8], uint32(lu.bs))
	return dataIn(d, 8)
}

func (lu *LU) readCapacity16(cmd *Command) Result {
	alloc := binary.BigEndian.Uint32(cmd.CDB[10:14])
	d := make([]byte, 32)
	binary.BigEndian.PutUint64(d[0:8], lu.numBlocks()-1)
	binary.BigEndian.PutUint32(d[8:12], uint32(lu.bs))
	if lu.cfg.ThinProvisioning {
		d[14] = 0x80 | 0x40 // LBPME, LBPRZ
	}
	return dataIn(d, alloc)
}

// getLBAStatus implements GET LBA STATUS: everything is reported mapped
// (the Backend does not tell).
func (lu *LU) getLBAStatus(cmd *Command) Result {
	cdb := cmd.CDB
	lba := binary.BigEndian.Uint64(cdb[2:10])
	alloc := binary.BigEndian.Uint32(cdb[10:14])
	nb := lu.numBlocks()
	if lba >= nb {
		return lbaOutOfRange()
	}
	d := make([]byte, 24)
	binary.BigEndian.PutUint32(d[0:4], 20)
	binary.BigEndian.PutUint64(d[8:16], lba)
	binary.BigEndian.PutUint32(d[16:20], uint32(min(nb-lba, 0xffffffff)))
	return dataIn(d, alloc)
}
