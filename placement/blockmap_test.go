package placement

import (
	"encoding/binary"
	"errors"
	"fmt"
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

// A chunk number outside the map is refused before any block is touched,
// whatever the chunk claims to cover (a chunk number from a key is not
// trusted), and never panics.
func TestDecodeChunkOutsideMap(t *testing.T) {
	for _, tc := range []struct {
		n int64
		c int
	}{
		{0, 1}, {0, 999999}, {3, 1}, {3, 999999}, {ChunkBlocks, 1}, {ChunkBlocks + 1, 2},
		{3, -1}, {3, 1 << 43}, {3, 1<<62 + 5}, {0, 1 << 43},
	} {
		m := NewBlockMap(tc.n, InSync)
		// A chunk saying it covers whatever the chunk number would need.
		for _, cnt := range []int64{1, ChunkBlocks, -int64(tc.c) * ChunkBlocks, tc.n - int64(tc.c)*ChunkBlocks} {
			data := append([]byte("UKBM\x01\x01"), binary.AppendUvarint(nil, uint64(cnt))...)
			data = append(data, byte(OutOfSync))
			data = binary.AppendUvarint(data, uint64(cnt))
			err := func() (err error) {
				defer func() {
					if r := recover(); r != nil {
						err = fmt.Errorf("panic: %v", r)
					}
				}()
				return m.DecodeChunk(tc.c, data)
			}()
			if !errors.Is(err, ErrMalformed) {
				t.Errorf("map of %d blocks, chunk %d claiming %d blocks: %v, want ErrMalformed", tc.n, tc.c, cnt, err)
			}
		}
		if m.Count(InSync) != tc.n {
			t.Errorf("map of %d blocks changed by refused chunks", tc.n)
		}
	}
}

// FuzzDecodeChunkAt decodes any chunk as any chunk number into a map of
// any length: it never panics, and succeeds only for a chunk of the map.
func FuzzDecodeChunkAt(f *testing.F) {
	m := NewBlockMap(ChunkBlocks+5, InSync)
	m.Set(ChunkBlocks+1, OutOfSync)
	f.Add(m.EncodeChunk(1), 1, uint32(ChunkBlocks+5))
	f.Add(m.EncodeChunk(1), 999999, uint32(7))
	f.Add(NewBlockMap(0, InSync).EncodeChunk(0), 3, uint32(0))
	f.Fuzz(func(t *testing.T, data []byte, c int, n uint32) {
		blocks := int64(n % (2*ChunkBlocks + 9))
		out := NewBlockMap(blocks, InSync)
		err := out.DecodeChunk(c, data)
		if err == nil && (c < 0 || c > 0 && c >= NumChunks(blocks)) {
			t.Fatalf("chunk %d decoded into a map of %d blocks (%d chunks)", c, blocks, NumChunks(blocks))
		}
	})
}

func TestCountAndUnprotectedMatchBlockByBlock(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 9))
	for trial := range 300 {
		n := int64(rng.IntN(70))
		maps := make([]*BlockMap, 1+rng.IntN(3))
		for i := range maps {
			maps[i] = NewBlockMap(n, InSync)
			for b := range n {
				if rng.IntN(3) > 0 && trial%5 != 0 {
					maps[i].Set(b, SyncState(rng.IntN(3)))
				}
			}
		}
		for _, m := range maps {
			for _, s := range []SyncState{InSync, Syncing, OutOfSync} {
				var want int64
				for b := range n {
					if m.Get(b) == s {
						want++
					}
				}
				if got := m.Count(s); got != want {
					t.Fatalf("trial %d: Count(%v) = %d, block by block %d", trial, s, got, want)
				}
			}
		}
		var want int64
		for b := range n {
			ok := false
			for _, m := range maps {
				ok = ok || m.Get(b) == InSync
			}
			if !ok {
				want++
			}
		}
		if got := Unprotected(n, maps); got != want {
			t.Fatalf("trial %d (%d blocks, %d maps): Unprotected = %d, block by block %d", trial, n, len(maps), got, want)
		}
	}
	if got := Unprotected(12, nil); got != 12 {
		t.Fatalf("Unprotected(12, nil) = %d, want 12 (no live copy)", got)
	}
}
