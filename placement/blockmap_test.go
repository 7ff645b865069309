package placement

import (
	"errors"
	"math/rand/v2"
	"testing"
)

func TestBlockMapSetGetCount(t *testing.T) {
	m := NewBlockMap(10, InSync)
	m.Set(3, OutOfSync)
	m.SetRange(5, 3, Syncing)
	want := []SyncState{0, 0, 0, 2, 0, 1, 1, 1, 0, 0}
	for i, s := range want {
		if got := m.Get(int64(i)); got != s {
			t.Fatalf("block %d: got %v want %v", i, got, s)
		}
	}
	if m.Count(InSync) != 6 || m.Count(Syncing) != 3 || m.Count(OutOfSync) != 1 {
		t.Fatalf("counts %d %d %d", m.Count(InSync), m.Count(Syncing), m.Count(OutOfSync))
	}
	if all := NewBlockMap(7, OutOfSync); all.Count(OutOfSync) != 7 {
		t.Fatalf("NewBlockMap(OutOfSync) count = %d", all.Count(OutOfSync))
	}
}

func roundTrip(t *testing.T, m *BlockMap) []int {
	t.Helper()
	out := NewBlockMap(m.Len(), OutOfSync)
	var sizes []int
	for c := range NumChunks(m.Len()) {
		data := m.EncodeChunk(c)
		sizes = append(sizes, len(data))
		if err := out.DecodeChunk(c, data); err != nil {
			t.Fatalf("chunk %d: %v", c, err)
		}
	}
	if !out.Equal(m) {
		t.Fatal("decoded map differs from the original")
	}
	return sizes
}

func TestChunkRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int64{1, 3, 4, 5, ChunkBlocks - 1, ChunkBlocks, ChunkBlocks + 3, 2*ChunkBlocks + 17} {
		m := NewBlockMap(n, InSync)
		roundTrip(t, m)
		for range 50 {
			m.Set(r.Int64N(n), SyncState(r.IntN(3)))
		}
		roundTrip(t, m)
	}
}

// A 16 TiB image with 4 MiB blocks must fit Consul's 512 KiB value limit
// per chunk even in the worst case (states alternating every block).
func TestChunkSizeBound(t *testing.T) {
	const blocks = (16 << 40) / (4 << 20)
	m := NewBlockMap(blocks, InSync)
	if NumChunks(blocks) != 4 {
		t.Fatalf("16 TiB / 4 MiB needs %d chunks, want 4", NumChunks(blocks))
	}
	for _, s := range roundTrip(t, m) {
		if s > 16 {
			t.Fatalf("an all-in-sync chunk takes %d bytes", s)
		}
	}
	for i := int64(0); i < ChunkBlocks*2; i += 2 {
		m.Set(i, OutOfSync)
	}
	for c, s := range roundTrip(t, m) {
		if s > 512<<10 {
			t.Fatalf("chunk %d is %d bytes, over 512 KiB", c, s)
		}
	}
}

func TestDecodeChunkRejectsGarbage(t *testing.T) {
	m := NewBlockMap(100, InSync)
	good := m.EncodeChunk(0)
	bad := [][]byte{
		nil,
		[]byte("XXXX\x01\x00\x64"),
		append([]byte("UKBM\x09"), good[5:]...),
		append(append([]byte(nil), good[:6]...), 0x65, 0, 0x64), // block count 101
		append(append([]byte(nil), good[:7]...), 3, 100),        // state 3
		append(append([]byte(nil), good[:7]...), 0, 50),         // runs too short
		append(append([]byte(nil), good[:7]...), 0, 200),        // run too long
	}
	for i, b := range bad {
		if err := m.DecodeChunk(0, b); !errors.Is(err, ErrMalformed) {
			t.Errorf("case %d: got %v, want ErrMalformed", i, err)
		}
	}
}

func FuzzDecodeChunk(f *testing.F) {
	m := NewBlockMap(77, InSync)
	m.Set(5, OutOfSync)
	f.Add(m.EncodeChunk(0))
	f.Fuzz(func(t *testing.T, data []byte) {
		out := NewBlockMap(77, InSync)
		if err := out.DecodeChunk(0, data); err == nil {
			// Whatever decoded must encode and decode to the same map.
			again := NewBlockMap(77, OutOfSync)
			if err := again.DecodeChunk(0, out.EncodeChunk(0)); err != nil || !again.Equal(out) {
				t.Fatalf("re-encoding a decoded chunk failed: %v", err)
			}
		}
	})
}
