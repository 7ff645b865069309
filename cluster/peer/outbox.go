package peer

import (
	"net"
	"sync"
)

// outbox queues the frames one side of a block connection sends (the
// client's requests, the server's answers). Whoever queues a frame while
// nobody is sending sends it at once, with anything queued meanwhile; the
// others wake the connection's writer goroutine, which sends what piled
// up. Either way a batch goes out in one writev (sendBatch).
type outbox[T any] struct {
	// frame appends v's pieces (header, payload) to bufs; it may append
	// nothing to leave v out.
	frame func(v T, bufs net.Buffers) net.Buffers
	// write sends a batch's pieces; an error stops flush.
	write func(bufs net.Buffers) error
	// sent, if set, runs on every batch once write returned.
	sent func(batch []T)

	mu    sync.Mutex
	queue []T
	wake  chan struct{}

	sending sync.Mutex  // held while batches are sent
	spare   []T         // under sending: the queue's next backing array
	bufs    net.Buffers // under sending
}

func newOutbox[T any](frame func(T, net.Buffers) net.Buffers, write func(net.Buffers) error, sent func([]T)) *outbox[T] {
	return &outbox[T]{frame: frame, write: write, sent: sent, wake: make(chan struct{}, 1)}
}

// push queues v and sends it at once if nobody is sending (the error is
// write's); otherwise the writer is woken to send it.
func (o *outbox[T]) push(v T) error {
	o.mu.Lock()
	o.queue = append(o.queue, v)
	o.mu.Unlock()
	if o.sending.TryLock() {
		defer o.sending.Unlock()
		return o.flushLocked()
	}
	select {
	case o.wake <- struct{}{}:
	default:
	}
	return nil
}

// flush sends everything queued; the writer calls it when woken.
func (o *outbox[T]) flush() error {
	o.sending.Lock()
	defer o.sending.Unlock()
	return o.flushLocked()
}

// idle waits until no batch is being sent: a frame a batch took is then
// out, or failed, and its buffers are no longer read.
func (o *outbox[T]) idle() {
	o.sending.Lock()
	o.sending.Unlock()
}

// flushLocked sends batches until the queue is empty; the caller holds
// sending.
func (o *outbox[T]) flushLocked() error {
	for {
		o.mu.Lock()
		batch := o.queue
		if len(batch) == 0 {
			o.mu.Unlock()
			return nil
		}
		o.queue = o.spare[:0]
		o.mu.Unlock()
		bufs := o.bufs[:0]
		for _, v := range batch {
			bufs = o.frame(v, bufs)
		}
		o.bufs = bufs
		var err error
		if len(bufs) > 0 {
			err = o.write(bufs)
		}
		if o.sent != nil {
			o.sent(batch)
		}
		clear(o.bufs[:cap(o.bufs)])
		clear(batch)
		o.spare = batch
		if err != nil {
			return err
		}
	}
}
