package lun

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// recorder is a Copy over a FileCopy that records every piece it gets.
type recorder struct {
	*FileCopy
	mu     sync.Mutex
	pieces [][2]int64
}

func (r *recorder) WriteAt(ctx context.Context, p []byte, off int64, d bool) error {
	r.mu.Lock()
	r.pieces = append(r.pieces, [2]int64{off, int64(len(p))})
	r.mu.Unlock()
	return r.FileCopy.WriteAt(ctx, p, off, d)
}

func TestVolumeSplitsAtBlockBoundaries(t *testing.T) {
	const bs, size = 64 << 10, 64<<10*5 + 4096 // last block partial
	fc, err := CreateFile(filepath.Join(t.TempDir(), "img"), size)
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{FileCopy: fc}
	v, err := NewVolume(size, bs, rec)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	ctx := context.Background()
	model := make([]byte, size)
	r := rand.New(rand.NewPCG(3, 4))
	for range 200 {
		off := r.Int64N(size/512) * 512
		n := min(r.Int64N(3*bs/512+1)*512, size-off)
		buf := make([]byte, n)
		for i := range buf {
			buf[i] = byte(r.Uint32())
		}
		rec.pieces = nil
		if err := v.WriteAt(ctx, buf, off, r.IntN(4) == 0); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], buf)
		for _, p := range rec.pieces {
			if p[0]/bs != (p[0]+p[1]-1)/bs {
				t.Fatalf("piece %v crosses a block boundary", p)
			}
		}
		got := make([]byte, n)
		if err := v.ReadAt(ctx, got, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, buf) {
			t.Fatalf("read back differs at %d+%d", off, n)
		}
	}
	all := make([]byte, size)
	if err := v.ReadAt(ctx, all, 0); err != nil || !bytes.Equal(all, model) {
		t.Fatalf("whole image differs from the model: %v", err)
	}
	if err := v.WriteAt(ctx, make([]byte, 1024), size-512, false); err == nil {
		t.Fatal("a write past the end succeeded")
	}
}

func TestUnmapReleasesSpace(t *testing.T) {
	const size = 8 << 20
	path := filepath.Join(t.TempDir(), "img")
	fc, err := CreateFile(path, size)
	if err != nil {
		t.Fatal(err)
	}
	defer fc.Close()
	if a, _ := fc.Allocated(); a != 0 {
		t.Fatalf("a new image file occupies %d bytes: not sparse", a)
	}
	ctx := context.Background()
	data := bytes.Repeat([]byte{0xab}, size)
	if err := fc.WriteAt(ctx, data, 0, true); err != nil {
		t.Fatal(err)
	}
	before, _ := fc.Allocated()
	if err := fc.Unmap(ctx, 1<<20, 4<<20); err != nil {
		t.Fatal(err)
	}
	after, _ := fc.Allocated()
	if before-after < 4<<20 {
		t.Fatalf("unmap of 4 MiB freed %d bytes (before %d, after %d)", before-after, before, after)
	}
	got := make([]byte, 4<<20)
	if err := fc.ReadAt(ctx, got, 1<<20); err != nil || !bytes.Equal(got, make([]byte, 4<<20)) {
		t.Fatalf("unmapped range does not read as zeros: %v", err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatal(err)
	}
}
