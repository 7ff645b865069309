package served

import (
	"context"
	"errors"
	"sync"
)

// ErrFenced: the image is fenced already (one revert at a time).
var ErrFenced = errors.New("the image's I/O is fenced by another operation")

// Fence keeps the owner's I/O off an image while an operation rewrites it
// as a whole (a revert to a snapshot): I/O that arrives waits (it is
// delayed, not failed, and gives up with its context), and closing waits
// for the I/O inside to finish. The zero Fence is open.
//
// A fence, not Volume.Exclusively: the operation itself writes through
// the volume (replicated, preserving blocks into the image's other
// snapshots), which takes the block locks Exclusively would hold.
type Fence struct {
	mu      sync.Mutex
	inside  int
	closed  chan struct{} // non-nil while closed; closed when opened again
	drained chan struct{} // closed when inside drops to 0 while closing
}

// Enter lets one I/O in, waiting while the fence is closed.
func (f *Fence) Enter(ctx context.Context) error {
	for {
		f.mu.Lock()
		c := f.closed
		if c == nil {
			f.inside++
			f.mu.Unlock()
			return nil
		}
		f.mu.Unlock()
		select {
		case <-c:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Leave counts out an I/O Enter let in.
func (f *Fence) Leave() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.inside--
	if f.inside == 0 && f.drained != nil {
		close(f.drained)
		f.drained = nil
	}
}

// Close stops new I/O and waits for the I/O inside to finish; open lets
// I/O in again. While the context waits, the fence stays closed: it is
// opened again when the wait gives up.
func (f *Fence) Close(ctx context.Context) (open func(), err error) {
	f.mu.Lock()
	if f.closed != nil {
		f.mu.Unlock()
		return nil, ErrFenced
	}
	f.closed = make(chan struct{})
	var wait chan struct{}
	if f.inside > 0 {
		wait = make(chan struct{})
		f.drained = wait
	}
	f.mu.Unlock()
	var once sync.Once
	open = func() {
		once.Do(func() {
			f.mu.Lock()
			close(f.closed)
			f.closed, f.drained = nil, nil
			f.mu.Unlock()
		})
	}
	if wait != nil {
		select {
		case <-wait:
		case <-ctx.Done():
			open()
			return nil, ctx.Err()
		}
	}
	return open, nil
}

// Closed says whether the fence is closed now.
func (f *Fence) Closed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.closed != nil
}
