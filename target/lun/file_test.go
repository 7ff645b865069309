package lun

import (
	"bytes"
	"context"
	"crypto/sha256"
	"os"
	"path/filepath"
	"testing"
)

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

func TestFileCopyGrows(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "g.img")
	c, err := CreateFile(path, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.WriteAt(ctx, []byte{1}, 1<<20, false); err == nil {
		t.Fatal("write beyond the end accepted")
	}
	if err := c.Grow(2 << 20); err != nil || c.Size() != 2<<20 {
		t.Fatalf("grow: %v, size %d", err, c.Size())
	}
	if err := c.WriteAt(ctx, []byte{7}, 2<<20-1, false); err != nil {
		t.Fatal(err)
	}
	if err := c.Grow(1 << 20); err != nil || c.Size() != 2<<20 {
		t.Fatalf("grow to less must change nothing: %v, size %d", err, c.Size())
	}
	// A file longer than the record (a grow cut short) opens; shorter not.
	if _, err := OpenFile(path, 1<<20); err != nil {
		t.Fatalf("open a longer file: %v", err)
	}
	if _, err := OpenFile(path, 3<<20); err == nil {
		t.Fatal("a file shorter than the record opened")
	}
}

func TestFileCopyHole(t *testing.T) {
	c, err := CreateFile(filepath.Join(t.TempDir(), "h.img"), 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.WriteAt(context.Background(), bytes.Repeat([]byte{1}, 4096), 1<<20, true); err != nil {
		t.Fatal(err)
	}
	if !c.Hole(0, 1<<20) || c.Hole(0, 2<<20) || c.Hole(1<<20, 4096) || !c.Hole(3<<20, 1<<20) {
		t.Fatalf("holes: [0,1M) %v, [0,2M) %v, [1M,+4K) %v, [3M,4M) %v", c.Hole(0, 1<<20), c.Hole(0, 2<<20), c.Hole(1<<20, 4096), c.Hole(3<<20, 1<<20))
	}
}

// TestFileCopyLargeWrites: writes longer than writeChunk, split into
// several pwrites, land whole, at any offset and up to the end of the
// file; a write past the end writes nothing.
func TestFileCopyLargeWrites(t *testing.T) {
	const size = 4 << 20
	fc, err := CreateFile(filepath.Join(t.TempDir(), "img"), size)
	if err != nil {
		t.Fatal(err)
	}
	defer fc.Close()
	ctx := context.Background()
	want := make([]byte, size)
	for i, w := range []struct {
		off int64
		n   int
	}{{0, writeChunk + 512}, {512, 3*writeChunk + 1000}, {size - 2*writeChunk - 4096, 2*writeChunk + 4096}, {1 << 20, 1 << 20}} {
		p := bytes.Repeat([]byte{byte(i + 1)}, w.n)
		for k := range p {
			p[k] ^= byte(k * 7)
		}
		if err := fc.WriteAt(ctx, p, w.off, false); err != nil {
			t.Fatal(err)
		}
		copy(want[w.off:], p)
	}
	if err := fc.WriteAt(ctx, make([]byte, 2*writeChunk), size-writeChunk, false); err == nil {
		t.Fatal("a write past the end succeeded")
	}
	got := make([]byte, size)
	if err := fc.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read back differs: %v", err)
	}
}

// BenchmarkSmallWriteAfterLargeWrites: random 4 KiB writes into data
// first written in 4 MiB pieces, through FileCopy (pwrites of at most
// writeChunk) and through the plain file (one pwrite per piece): on
// kernels that give the page cache large folios, the second pays for
// walking them (see writeChunk).
func BenchmarkSmallWriteAfterLargeWrites(b *testing.B) {
	const size = 256 << 20
	for _, mode := range []string{"FileCopy", "one-pwrite"} {
		b.Run(mode, func(b *testing.B) {
			fc, err := CreateFile(filepath.Join(b.TempDir(), "img"), size)
			if err != nil {
				b.Fatal(err)
			}
			defer fc.Close()
			ctx := context.Background()
			piece := bytes.Repeat([]byte{1}, 4<<20)
			for off := int64(0); off < size; off += int64(len(piece)) {
				if mode == "FileCopy" {
					err = fc.WriteAt(ctx, piece, off, false)
				} else {
					_, err = fc.f.WriteAt(piece, off)
				}
				if err != nil {
					b.Fatal(err)
				}
			}
			p := make([]byte, 4096)
			b.SetBytes(4096)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := fc.WriteAt(ctx, p, int64(i*7919%(size/4096))*4096, false); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestChecksumHoles: the checksum of a range is the SHA-256 of what it
// reads, whether the range is a hole (answered without reading), data,
// or partly both; a hole's sum is remembered per length, never reused for
// another length.
func TestChecksumHoles(t *testing.T) {
	const size = 8 << 20
	fc, err := CreateFile(filepath.Join(t.TempDir(), "img"), size)
	if err != nil {
		t.Fatal(err)
	}
	defer fc.Close()
	ctx := context.Background()
	data := bytes.Repeat([]byte("ukai"), 256<<10) // 1 MiB
	if err := fc.WriteAt(ctx, data, 5<<20, true); err != nil {
		t.Fatal(err)
	}
	if !fc.Hole(0, 4<<20) || fc.Hole(4<<20, 4<<20) {
		t.Skip("file system without SEEK_DATA holes: the fast path is not taken")
	}
	for _, r := range []struct{ off, n int64 }{
		{0, 4 << 20}, {4 << 20, 4 << 20}, {0, 1 << 20}, {0, 4 << 20}, {5 << 20, 1 << 20}, {4<<20 + 512, 1000}, {6 << 20, 2 << 20}, {6 << 20, 3 << 20},
	} {
		got, err := fc.Checksum(ctx, r.off, r.n)
		if r.off+r.n > size {
			if err == nil {
				t.Errorf("checksum of [%d, +%d), past the end: %x, want an error", r.off, r.n, got)
			}
			continue
		}
		if err != nil {
			t.Fatalf("checksum of [%d, +%d): %v", r.off, r.n, err)
		}
		buf := make([]byte, r.n)
		if err := fc.ReadAt(ctx, buf, r.off); err != nil {
			t.Fatal(err)
		}
		if want := sha256.Sum256(buf); got != want {
			t.Errorf("checksum of [%d, +%d) = %x, want %x", r.off, r.n, got, want)
		}
	}
}
