package scsi

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// memBackend is a sparse in-memory Backend: the space is cut into chunks
// allocated on first write and released by Unmap when a whole chunk is
// deallocated. Unallocated space reads as zeros.
type memBackend struct {
	mu      sync.RWMutex
	size    int64
	chunks  map[int64][]byte
	flushes int
	fuaN    int
	writes  int
	unmaps  int
	// failRead/failWrite make I/O touching [off, off+1) fail with err.
	failOff int64
	failErr error
}

const memChunk = 64 << 10

func newMemBackend(size int64) *memBackend {
	return &memBackend{size: size, chunks: map[int64][]byte{}, failOff: -1}
}

func (m *memBackend) check(ctx context.Context, off, n int64) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if off < 0 || n < 0 || off+n > m.size {
		return fmt.Errorf("mem: [%d,+%d) outside %d", off, n, m.size)
	}
	if m.failErr != nil && m.failOff >= off && m.failOff < off+n {
		return m.failErr
	}
	return nil
}

func (m *memBackend) ReadAt(ctx context.Context, p []byte, off int64) error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if err := m.check(ctx, off, int64(len(p))); err != nil {
		return err
	}
	for len(p) > 0 {
		c, o := off/memChunk*memChunk, off%memChunk
		n := min(int64(len(p)), memChunk-o)
		if ch, ok := m.chunks[c]; ok {
			copy(p[:n], ch[o:])
		} else {
			clear(p[:n])
		}
		p, off = p[n:], off+n
	}
	return nil
}

func (m *memBackend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(ctx, off, int64(len(p))); err != nil {
		return err
	}
	m.writes++
	if fua {
		m.fuaN++
	}
	for len(p) > 0 {
		c, o := off/memChunk*memChunk, off%memChunk
		n := min(int64(len(p)), memChunk-o)
		ch, ok := m.chunks[c]
		if !ok {
			ch = make([]byte, memChunk)
			m.chunks[c] = ch
		}
		copy(ch[o:], p[:n])
		p, off = p[n:], off+n
	}
	return nil
}

func (m *memBackend) Flush(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return err
	}
	m.flushes++
	return nil
}

func (m *memBackend) Unmap(ctx context.Context, off, length int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(ctx, off, length); err != nil {
		return err
	}
	m.unmaps++
	end := off + length
	for off < end {
		c, o := off/memChunk*memChunk, off%memChunk
		n := min(end-off, memChunk-o)
		if ch, ok := m.chunks[c]; ok {
			if n == memChunk {
				delete(m.chunks, c)
			} else {
				clear(ch[o : o+n])
			}
		}
		off += n
	}
	return nil
}

func (m *memBackend) resize(size int64) {
	m.mu.Lock()
	m.size = size
	m.mu.Unlock()
}

var errInjected = errors.New("injected failure")
