package lun

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// Volume is the LUN backend of one image: it implements scsi.Backend by
// splitting every request at block boundaries and running each piece
// against the block's copy. A request is complete when all its pieces are.
type Volume struct {
	size      int64
	blockSize int64
	copy      Copy
}

// NewVolume returns the backend of an image of size bytes in blocks of
// blockSize over one local copy.
func NewVolume(size, blockSize int64, c Copy) (*Volume, error) {
	if blockSize <= 0 || blockSize&(blockSize-1) != 0 {
		return nil, fmt.Errorf("block size %d is not a power of two", blockSize)
	}
	return &Volume{size: size, blockSize: blockSize, copy: c}, nil
}

// piece is the part of a request inside one block.
type piece struct {
	block int64 // block index
	off   int64 // byte offset in the image
	lo    int64 // start of the piece within the request buffer
	n     int64
}

// split cuts [off, off+n) at block boundaries.
func (v *Volume) split(off, n int64) ([]piece, error) {
	if off < 0 || n < 0 || off+n > v.size {
		return nil, fmt.Errorf("range %d+%d outside the image (size %d)", off, n, v.size)
	}
	ps := make([]piece, 0, n/v.blockSize+2)
	for done := int64(0); done < n; {
		o := off + done
		b := o / v.blockSize
		l := min(n-done, (b+1)*v.blockSize-o)
		ps = append(ps, piece{block: b, off: o, lo: done, n: l})
		done += l
	}
	return ps, nil
}

// each runs fn on every piece, in parallel when there are several, and
// returns the first error.
func each(ps []piece, fn func(piece) error) error {
	if len(ps) == 1 {
		return fn(ps[0])
	}
	errs := make([]error, len(ps))
	var wg sync.WaitGroup
	for i, p := range ps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = fn(p)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// ReadAt implements scsi.Backend.
func (v *Volume) ReadAt(ctx context.Context, p []byte, off int64) error {
	ps, err := v.split(off, int64(len(p)))
	if err != nil {
		return err
	}
	return each(ps, func(pc piece) error {
		return v.copy.ReadAt(ctx, p[pc.lo:pc.lo+pc.n], pc.off)
	})
}

// WriteAt implements scsi.Backend.
func (v *Volume) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	ps, err := v.split(off, int64(len(p)))
	if err != nil {
		return err
	}
	if err := each(ps, func(pc piece) error {
		return v.copy.WriteAt(ctx, p[pc.lo:pc.lo+pc.n], pc.off, false)
	}); err != nil {
		return err
	}
	if fua {
		return v.copy.Sync(ctx)
	}
	return nil
}

// Flush implements scsi.Backend.
func (v *Volume) Flush(ctx context.Context) error { return v.copy.Sync(ctx) }

// Unmap implements scsi.Backend.
func (v *Volume) Unmap(ctx context.Context, off, n int64) error {
	if _, err := v.split(off, n); err != nil {
		return err
	}
	return v.copy.Unmap(ctx, off, n)
}

// Close closes the copy.
func (v *Volume) Close() error { return v.copy.Close() }
