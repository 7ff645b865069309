package scsi

import (
	"math/bits"
	"sync"
)

// bufPool recycles data-in buffers by power-of-two size class, so that
// large reads do not allocate (and zero, and later collect) a fresh buffer
// each time: a profile of 1 MiB sequential reads spent ~20% of the CPU in
// memclr, madvise and GC for those buffers.
type bufPool struct {
	classes [bufClasses]sync.Pool
}

const (
	minBufShift = 12 // 4 KiB
	bufClasses  = 15 // up to 64 MiB
)

func bufClass(n int) int {
	if n <= 1<<minBufShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufShift
}

// get returns a buffer of length n. Its contents are undefined: callers
// overwrite all of it.
func (p *bufPool) get(n int) []byte {
	c := bufClass(n)
	if c >= bufClasses {
		return make([]byte, n)
	}
	if b, ok := p.classes[c].Get().(*[]byte); ok {
		return (*b)[:n]
	}
	return make([]byte, n, 1<<(c+minBufShift))
}

// put returns b to the pool.
func (p *bufPool) put(b []byte) {
	c := bufClass(cap(b))
	if c >= bufClasses || cap(b) != 1<<(c+minBufShift) {
		return
	}
	b = b[:0]
	p.classes[c].Put(&b)
}
