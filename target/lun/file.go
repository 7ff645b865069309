// Package lun is the LUN backend: it splits an image's I/O into its blocks
// and sends each piece to the copies that hold the block. Today a volume has
// one copy, the node's local file; the seam (Copy) is where peer copies plug
// in.
package lun

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/ukai-storage/ukai/target/blockdev"
)

// Copy is one copy of an image (blockdev.Copy: the data transport
// implements it for remote copies without importing this package).
type Copy = blockdev.Copy

// FileCopy is a copy kept in a sparse file on the node's file system.
type FileCopy struct {
	f    *os.File
	size atomic.Int64
	zsum atomic.Pointer[zeroSum] // Checksum of a hole
}

// Grow extends the file to size bytes (the new part reads as zeros); a
// file already that long or longer is left as it is.
func (c *FileCopy) Grow(size int64) error {
	st, err := c.f.Stat()
	if err != nil {
		return fmt.Errorf("grow image file: %w", err)
	}
	if st.Size() < size {
		if err := c.f.Truncate(size); err != nil {
			return fmt.Errorf("grow image file %s: %w", c.f.Name(), err)
		}
		if err := c.f.Sync(); err != nil {
			return fmt.Errorf("grow image file %s: %w", c.f.Name(), err)
		}
	}
	for {
		cur := c.size.Load()
		if cur >= size || c.size.CompareAndSwap(cur, size) {
			return nil
		}
	}
}

// Size is the file's size as the copy knows it.
func (c *FileCopy) Size() int64 { return c.size.Load() }

// ErrTooLarge: the file system cannot hold a file of the size asked.
var ErrTooLarge = errors.New("larger than this node's file system allows")

// CreateFile creates a sparse file of size bytes at path; it fails if the
// file exists.
func CreateFile(path string, size int64) (*FileCopy, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create image file: %w", err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		os.Remove(path)
		if errors.Is(err, syscall.EFBIG) {
			return nil, fmt.Errorf("%w: %d bytes", ErrTooLarge, size)
		}
		return nil, fmt.Errorf("size image file %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("sync image file %s: %w", path, err)
	}
	c := &FileCopy{f: f}
	c.size.Store(size)
	return c, nil
}

// OpenFile opens an existing image file and checks its size.
func OpenFile(path string, size int64) (*FileCopy, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open image file: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat image file: %w", err)
	}
	if st.Size() < size {
		// (Longer is fine: the image was being grown when the node
		// stopped; the record decides.)
		f.Close()
		return nil, fmt.Errorf("image file %s is %d bytes, the image record says %d", path, st.Size(), size)
	}
	c := &FileCopy{f: f}
	c.size.Store(size)
	return c, nil
}

// ReadAt implements Copy. Holes read as zeros.
func (c *FileCopy) ReadAt(_ context.Context, p []byte, off int64) error {
	n, err := c.f.ReadAt(p, off)
	if err == io.EOF && n == len(p) {
		err = nil
	}
	if err != nil {
		return fmt.Errorf("read %s at %d: %w", c.f.Name(), off, err)
	}
	return nil
}

// writeChunk bounds one pwrite. Linux (ext4 with large folios, 6.16 and
// later) gives the page cache folios as large as the write that created
// them, up to 2 MiB, and every later small write into a large folio walks
// all of its buffer heads: measured here (kernel 6.18, ext4), a random 4
// KiB pwrite into data written in 4 MiB pieces took 11-13 us, into data
// written in 64 KiB pieces 3.4-3.6 us, while rewriting sequentially in
// 64 KiB pieces still ran at 8.6-9.6 GB/s. VMs write images in large
// pieces (installs, copies, syncs) and then randomly in small ones.
const writeChunk = 64 << 10

// WriteAt implements Copy.
func (c *FileCopy) WriteAt(ctx context.Context, p []byte, off int64, durable bool) error {
	if size := c.size.Load(); off+int64(len(p)) > size {
		return fmt.Errorf("write %s: %d bytes at %d beyond size %d", c.f.Name(), len(p), off, size)
	}
	if dropWrite(len(p)) {
		return nil
	}
	// One pwrite per writeChunk at most (see there).
	for done := 0; done < len(p); done += writeChunk {
		end := min(done+writeChunk, len(p))
		if _, err := c.f.WriteAt(p[done:end], off+int64(done)); err != nil {
			return fmt.Errorf("write %s at %d: %w", c.f.Name(), off+int64(done), err)
		}
	}
	if durable {
		return c.Sync(ctx)
	}
	return nil
}

// Sync implements Copy with fdatasync.
func (c *FileCopy) Sync(context.Context) error {
	if err := unix.Fdatasync(int(c.f.Fd())); err != nil {
		return fmt.Errorf("fdatasync %s: %w", c.f.Name(), err)
	}
	return nil
}

// Unmap implements Copy by punching a hole.
func (c *FileCopy) Unmap(_ context.Context, off, n int64) error {
	err := unix.Fallocate(int(c.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if errors.Is(err, unix.EOPNOTSUPP) {
		// No hole punching here: write zeros so reads stay correct.
		zero := make([]byte, min(n, 1<<20))
		for done := int64(0); done < n; done += int64(len(zero)) {
			chunk := zero[:min(int64(len(zero)), n-done)]
			if _, err := c.f.WriteAt(chunk, off+done); err != nil {
				return fmt.Errorf("zero %s at %d: %w", c.f.Name(), off+done, err)
			}
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("punch hole in %s at %d+%d: %w", c.f.Name(), off, n, err)
	}
	return nil
}

// Allocated returns the bytes the file really occupies on disk.
func (c *FileCopy) Allocated() (int64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(c.f.Fd()), &st); err != nil {
		return 0, fmt.Errorf("stat %s: %w", c.f.Name(), err)
	}
	return st.Blocks * 512, nil
}

// Close syncs and closes the file.
func (c *FileCopy) Close() error {
	serr := c.f.Sync()
	cerr := c.f.Close()
	return errors.Join(serr, cerr)
}

// Hole reports whether [off, off+n) holds no data in the file (a hole, or
// beyond its end): it reads as zeros without being read. An error or a
// file system without SEEK_DATA answers false.
func (c *FileCopy) Hole(off, n int64) bool {
	next, err := unix.Seek(int(c.f.Fd()), off, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) {
		return true // no data at or after off
	}
	return err == nil && next >= off+n
}
