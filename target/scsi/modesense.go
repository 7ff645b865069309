package scsi

import (
	"bytes"
	"encoding/binary"
)

// Mode page codes.
const (
	pageCaching     = 0x08
	pageControl     = 0x0a
	pageInfoExcept  = 0x1c
	pageAll         = 0x3f
	pcCurrent       = 0
	pcChangeable    = 1
	pcDefault       = 2
	pcSaved         = 3
	subpageNone     = 0x00
	subpageAll      = 0xff
	blockDescLen    = 8
	longBlockDescLn = 16
)

// modePage returns page code in its current/default form, or with
// changeable set the changeable-bits mask (nothing is changeable).
func (lu *LU) modePage(code byte, changeable bool) []byte {
	switch code {
	case pageCaching:
		p := make([]byte, 20)
		p[0], p[1] = pageCaching, 0x12
		if !changeable && lu.cfg.WriteCache {
			p[2] |= 0x04 // WCE
		}
		return p
	case pageControl:
		p := make([]byte, 12)
		p[0], p[1] = pageControl, 0x0a
		if !changeable {
			p[3] = 0x10                                 // queue algorithm modifier 1: unrestricted reordering
			binary.BigEndian.PutUint16(p[8:10], 0xffff) // busy timeout: unlimited
		}
		return p
	case pageInfoExcept:
		p := make([]byte, 12)
		p[0], p[1] = pageInfoExcept, 0x0a
		if !changeable {
			p[2] = 0x08 // DEXCPT: informational exceptions disabled
		}
		return p
	}
	return nil
}

// modeSense implements MODE SENSE(6) and (10).
func (lu *LU) modeSense(cmd *Command) Result {
	cdb := cmd.CDB
	ten := cdb[0] == opModeSense10
	dbd := cdb[1]&0x08 != 0
	llbaa := ten && cdb[1]&0x10 != 0
	pc := cdb[2] >> 6
	page := cdb[2] & 0x3f
	subpage := cdb[3]
	var alloc uint32
	if ten {
		alloc = uint32(binary.BigEndian.Uint16(cdb[7:9]))
	} else {
		alloc = uint32(cdb[4])
	}
	if pc == pcSaved {
		return sense(SenseIllegalRequest, ascSavingNotSupported)
	}
	if subpage != subpageNone && !(page == pageAll && subpage == subpageAll) {
		return invalidCDB(3)
	}
	var pages []byte
	changeable := pc == pcChangeable
	if page == pageAll {
		for _, c := range []byte{pageCaching, pageControl, pageInfoExcept} {
			pages = append(pages, lu.modePage(c, changeable)...)
		}
	} else {
		pages = lu.modePage(page, changeable)
		if pages == nil {
			return invalidCDB(2)
		}
	}
	var bd []byte
	if !dbd {
		nb := lu.numBlocks()
		if llbaa {
			bd = make([]byte, longBlockDescLn)
			binary.BigEndian.PutUint64(bd[0:8], nb)
			binary.BigEndian.PutUint32(bd[12:16], uint32(lu.bs))
		} else {
			bd = make([]byte, blockDescLen)
			if nb > 0xffffffff {
				nb = 0xffffffff
			}
			binary.BigEndian.PutUint32(bd[0:4], uint32(nb))
			binary.BigEndian.PutUint32(bd[4:8], uint32(lu.bs)) // byte 4 reserved, 5-7 length
		}
	}
	var dsp byte = 0x10 // DPOFUA
	if lu.cfg.ReadOnly {
		dsp |= 0x80 // WP
	}
	var d []byte
	if ten {
		d = make([]byte, 8, 8+len(bd)+len(pages))
		d[3] = dsp
		if llbaa {
			d[4] = 0x01 // LONGLBA
		}
		binary.BigEndian.PutUint16(d[6:8], uint16(len(bd)))
		d = append(append(d, bd...), pages...)
		binary.BigEndian.PutUint16(d[0:2], uint16(len(d)-2))
	} else {
		d = make([]byte, 4, 4+len(bd)+len(pages))
		d[2] = dsp
		d[3] = byte(len(bd))
		d = append(append(d, bd...), pages...)
		d[0] = byte(len(d) - 1)
	}
	return dataIn(d, alloc)
}

// modeSelect implements MODE SELECT(6) and (10): pages identical to the
// current ones are accepted, any change is refused (nothing is
// changeable).
func (lu *LU) modeSelect(cmd *Command) Result {
	cdb := cmd.CDB
	ten := cdb[0] == opModeSelect10
	if cdb[1]&0x01 != 0 { // SP: saving pages is not supported
		return invalidCDB(1)
	}
	var plen int
	if ten {
		plen = int(binary.BigEndian.Uint16(cdb[7:9]))
	} else {
		plen = int(cdb[4])
	}
	if plen == 0 {
		return good()
	}
	data := cmd.DataOut
	if len(data) > plen {
		data = data[:plen]
	}
	hdr := 4
	if ten {
		hdr = 8
	}
	if len(data) < hdr {
		return paramListLengthError()
	}
	var bdl int
	if ten {
		bdl = int(binary.BigEndian.Uint16(data[6:8]))
	} else {
		bdl = int(data[3])
	}
	if hdr+bdl > len(data) {
		return paramListLengthError()
	}
	// A block descriptor may only restate the block length.
	if bdl != 0 {
		if bdl != blockDescLen && !(ten && data[4]&0x01 != 0 && bdl == longBlockDescLn) {
			return invalidParam(hdr - 2)
		}
		bd := data[hdr : hdr+bdl]
		var blen uint32
		if bdl == blockDescLen {
			blen = uint32(bd[5])<<16 | uint32(bd[6])<<8 | uint32(bd[7])
		} else {
			blen = binary.BigEndian.Uint32(bd[12:16])
		}
		if blen != uint32(lu.bs) {
			return invalidParam(hdr + bdl - 1)
		}
	}
	for off := hdr + bdl; off < len(data); {
		if len(data)-off < 2 {
			return paramListLengthError()
		}
		code := data[off] & 0x3f
		if data[off]&0x40 != 0 { // SPF: subpages are not supported
			return invalidParam(off)
		}
		plen := int(data[off+1]) + 2
		if off+plen > len(data) {
			return paramListLengthError()
		}
		cur := lu.modePage(code, false)
		if cur == nil || len(cur) != plen {
			return invalidParam(off)
		}
		got := data[off : off+plen]
		// PS (bit 7 of byte 0) is reserved in MODE SELECT data.
		if got[0]&0x80 != 0 {
			return invalidParam(off)
		}
		if !bytes.Equal(got[2:], cur[2:]) {
			for i := 2; i < plen; i++ {
				if got[i] != cur[i] {
					return invalidParam(off + i)
				}
			}
		}
		off += plen
	}
	return good()
}
