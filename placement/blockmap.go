// Package placement holds the pure logic of where image blocks live: the
// per-location block map of sync states and its encoding. It does no I/O.
package placement

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
)

// SyncState is the state of one block of one location of an image.
type SyncState uint8

// The three sync states. The numeric values are part of the metadata format
// and of the CLI's JSON output (`sync_status`).
const (
	InSync    SyncState = 0
	Syncing   SyncState = 1
	OutOfSync SyncState = 2
)

func (s SyncState) String() string {
	switch s {
	case InSync:
		return "in_sync"
	case Syncing:
		return "syncing"
	case OutOfSync:
		return "out_of_sync"
	}
	return fmt.Sprintf("SyncState(%d)", uint8(s))
}

// Valid reports whether s is one of the defined states.
func (s SyncState) Valid() bool { return s <= OutOfSync }

// BlockMap is the sync state of every block of one location of an image,
// packed two bits per block. The zero value is an empty map.
type BlockMap struct {
	n    int64
	bits []byte
}

// NewBlockMap returns a map of n blocks, all in state s.
func NewBlockMap(n int64, s SyncState) *BlockMap {
	m := &BlockMap{n: n, bits: make([]byte, (n+3)/4)}
	if s != InSync {
		m.SetRange(0, n, s)
	}
	return m
}

// Len is the number of blocks.
func (m *BlockMap) Len() int64 { return m.n }

// Get returns the state of block i. It panics when i is out of range, like
// a slice index.
func (m *BlockMap) Get(i int64) SyncState {
	if i < 0 || i >= m.n {
		panic(fmt.Sprintf("placement: block %d out of range [0,%d)", i, m.n))
	}
	return SyncState(m.bits[i/4]>>((i%4)*2)) & 3
}

// Set sets the state of block i.
func (m *BlockMap) Set(i int64, s SyncState) {
	if i < 0 || i >= m.n {
		panic(fmt.Sprintf("placement: block %d out of range [0,%d)", i, m.n))
	}
	shift := uint((i % 4) * 2)
	m.bits[i/4] = m.bits[i/4]&^(3<<shift) | byte(s&3)<<shift
}

// SetRange sets blocks [start, start+count) to s.
func (m *BlockMap) SetRange(start, count int64, s SyncState) {
	for i := start; i < start+count; i++ {
		m.Set(i, s)
	}
}

// Count returns how many blocks are in state s. It works a byte (four
// blocks) at a time: metrics count every owned image's maps on each
// scrape, and a 1 TiB image of 4 MiB blocks has 262,144 of them.
func (m *BlockMap) Count(s SyncState) int64 {
	var c int64
	for _, b := range m.bits {
		hi, lo := (b>>1)&0x55, b&0x55
		switch s {
		case OutOfSync:
			c += int64(bits.OnesCount8(hi &^ lo))
		case Syncing:
			c += int64(bits.OnesCount8(lo &^ hi))
		case InSync:
			c += int64(bits.OnesCount8(^(hi | lo) & 0x55))
		default:
			c += int64(bits.OnesCount8(hi & lo))
		}
	}
	if s == InSync {
		c -= int64(len(m.bits))*4 - m.n // the padding of the last byte reads as in sync
	}
	return c
}

// AllInSync says whether every block is in sync.
func (m *BlockMap) AllInSync() bool {
	for _, b := range m.bits {
		if b != 0 {
			return false
		}
	}
	return true
}

// Unprotected counts the blocks of an image of n blocks in sync in none of
// maps (nil maps are skipped): with maps the copies on live nodes, the
// blocks whose data cannot be read now. Without a map it is n.
func Unprotected(n int64, maps []*BlockMap) int64 {
	var live []*BlockMap
	for _, m := range maps {
		if m == nil {
			continue
		}
		if m.AllInSync() {
			return 0
		}
		live = append(live, m)
	}
	if len(live) == 0 {
		return n
	}
	var c int64
	for i := range live[0].bits {
		var insync byte
		for _, m := range live {
			if i >= len(m.bits) {
				continue
			}
			b := m.bits[i]
			insync |= ^(b | b>>1) & 0x55
		}
		miss := ^insync & 0x55
		if last := int64(i+1) * 4; last > n { // padding is not a block
			miss &= byte(0x55) >> (2 * uint(last-n))
		}
		c += int64(bits.OnesCount8(miss))
	}
	return c
}

// Clone returns a deep copy.
func (m *BlockMap) Clone() *BlockMap {
	return &BlockMap{n: m.n, bits: append([]byte(nil), m.bits...)}
}

// Equal reports whether two maps have the same length and states.
func (m *BlockMap) Equal(o *BlockMap) bool {
	if m.n != o.n {
		return false
	}
	for i := int64(0); i < m.n; i++ {
		if m.Get(i) != o.Get(i) {
			return false
		}
	}
	return true
}

// ChunkBlocks is how many blocks one stored chunk of a block map covers.
// A chunk is at most ChunkBlocks/4 bytes (256 KiB) plus a small header in
// the raw encoding, so it fits Consul's 512 KiB value limit; a 16 TiB image
// with 4 MiB blocks (4 Mi blocks) needs 4 chunks per location.
const ChunkBlocks = 1 << 20

// NumChunks is how many chunks a map of n blocks is stored in.
func NumChunks(n int64) int { return int((n + ChunkBlocks - 1) / ChunkBlocks) }

// Encodings of a chunk.
const (
	encRaw  = 0 // 2 bits per block, packed like BlockMap
	encRuns = 1 // (state byte, uvarint run length)*
)

const chunkMagic = "UKBM"
const chunkVersion = 1

// ErrMalformed is wrapped by every decoding error.
var ErrMalformed = errors.New("malformed block map chunk")

// EncodeChunk encodes chunk c of m: magic, version, encoding, uvarint block
// count, then either run-length pairs or the packed bits, whichever is
// smaller. A map whose blocks are all in sync encodes in a few bytes.
func (m *BlockMap) EncodeChunk(c int) []byte {
	start := int64(c) * ChunkBlocks
	end := min(start+ChunkBlocks, m.n)
	hdr := append([]byte(chunkMagic), chunkVersion, 0)
	hdr = binary.AppendUvarint(hdr, uint64(end-start))

	runs := append([]byte(nil), hdr...)
	runs[5] = encRuns
	rawSize := int((end - start + 3) / 4)
	for i := start; i < end; {
		s := m.Get(i)
		j := i + 1
		for j < end && m.Get(j) == s {
			j++
		}
		runs = append(runs, byte(s))
		runs = binary.AppendUvarint(runs, uint64(j-i))
		if len(runs) > len(hdr)+rawSize {
			break
		}
		i = j
	}
	if len(runs) <= len(hdr)+rawSize {
		return runs
	}
	raw := hdr
	raw[5] = encRaw
	if start%4 == 0 {
		return append(raw, m.bits[start/4:start/4+int64(rawSize)]...)
	}
	sub := NewBlockMap(end-start, InSync)
	for i := start; i < end; i++ {
		sub.Set(i-start, m.Get(i))
	}
	return append(raw, sub.bits...)
}

// DecodeChunk decodes data as chunk c into m, which must have the length
// the chunk claims to cover. It never panics on bad input.
func (m *BlockMap) DecodeChunk(c int, data []byte) error {
	if len(data) < 6 || string(data[:4]) != chunkMagic {
		return fmt.Errorf("%w: bad magic", ErrMalformed)
	}
	if data[4] != chunkVersion {
		return fmt.Errorf("%w: unknown version %d", ErrMalformed, data[4])
	}
	enc := data[5]
	cnt, k := binary.Uvarint(data[6:])
	if k <= 0 {
		return fmt.Errorf("%w: bad block count", ErrMalformed)
	}
	// The chunk number is checked against the map before it is used: it
	// comes from a key, and a map is never sized or indexed by one.
	if c < 0 || c > 0 && c >= NumChunks(m.n) {
		return fmt.Errorf("%w: chunk %d outside a map of %d blocks (%d chunks)", ErrMalformed, c, m.n, NumChunks(m.n))
	}
	start := int64(c) * ChunkBlocks
	if cnt != uint64(min(start+ChunkBlocks, m.n)-start) {
		return fmt.Errorf("%w: chunk %d covers %d blocks, image map expects %d", ErrMalformed, c, cnt, min(start+ChunkBlocks, m.n)-start)
	}
	p := data[6+k:]
	switch enc {
	case encRaw:
		if uint64(len(p)) != (cnt+3)/4 {
			return fmt.Errorf("%w: raw payload is %d bytes, want %d", ErrMalformed, len(p), (cnt+3)/4)
		}
		sub := &BlockMap{n: int64(cnt), bits: p}
		for i := int64(0); i < int64(cnt); i++ {
			s := sub.Get(i)
			if !s.Valid() {
				return fmt.Errorf("%w: block %d has state %d", ErrMalformed, start+i, s)
			}
			m.Set(start+i, s)
		}
	case encRuns:
		i := start
		for len(p) > 0 {
			s := SyncState(p[0])
			if !s.Valid() {
				return fmt.Errorf("%w: run at block %d has state %d", ErrMalformed, i, s)
			}
			l, k := binary.Uvarint(p[1:])
			if k <= 0 || l == 0 || l > uint64(start+int64(cnt)-i) {
				return fmt.Errorf("%w: bad run length at block %d", ErrMalformed, i)
			}
			m.SetRange(i, int64(l), s)
			i += int64(l)
			p = p[1+k:]
		}
		if i != start+int64(cnt) {
			return fmt.Errorf("%w: runs cover %d blocks, want %d", ErrMalformed, i-start, cnt)
		}
	default:
		return fmt.Errorf("%w: unknown encoding %d", ErrMalformed, enc)
	}
	return nil
}

// Resized returns a copy of m with n blocks: blocks beyond m's length are
// in state fill, blocks beyond n are dropped.
func (m *BlockMap) Resized(n int64, fill SyncState) *BlockMap {
	out := NewBlockMap(n, fill)
	for i := int64(0); i < min(n, m.n); i++ {
		out.Set(i, m.Get(i))
	}
	return out
}

// ChunkLen returns how many blocks an encoded chunk covers, as its header
// says (the chunk is not otherwise checked).
func ChunkLen(data []byte) (int64, error) {
	if len(data) < 6 || string(data[:4]) != chunkMagic {
		return 0, fmt.Errorf("%w: bad magic", ErrMalformed)
	}
	cnt, k := binary.Uvarint(data[6:])
	if k <= 0 || cnt > ChunkBlocks {
		return 0, fmt.Errorf("%w: bad block count", ErrMalformed)
	}
	return int64(cnt), nil
}
