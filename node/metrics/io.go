package metrics

import (
	"context"
	"errors"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ukai-storage/ukai/target/scsi"
)

// The operations an image's I/O is counted by.
const (
	opRead = iota
	opWrite
	opFlush
	opUnmap
	nOps
)

var opNames = [nOps]string{"read", "write", "flush", "unmap"}

// ImageIO is one image's I/O counters on this node. Every update is an
// atomic add (and, for reads and writes, a histogram observation, also
// atomic): no lock on the I/O path.
type ImageIO struct {
	name  string
	ops   [nOps]atomic.Int64
	nanos [nOps]atomic.Int64
	bytes [2]atomic.Int64 // read, write
	errs  [nOps][16]atomic.Int64
	lat   [2]prometheus.Histogram
}

func newImageIO(name string) *ImageIO {
	io := &ImageIO{name: name}
	for i, op := range []string{"read", "write"} {
		io.lat[i] = prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:        "ukai_image_" + op + "_latency_seconds",
			Help:        "Latency of the image's " + op + " commands through this node, from the backend call to its answer.",
			Buckets:     LatencyBuckets,
			ConstLabels: prometheus.Labels{"image": name},
		})
	}
	return io
}

func (io *ImageIO) done(op int, n int, start time.Time, err error) {
	d := time.Since(start)
	io.ops[op].Add(1)
	io.nanos[op].Add(int64(d))
	if op <= opWrite {
		io.bytes[op].Add(int64(n))
		io.lat[op].Observe(d.Seconds())
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		key := byte(scsi.SenseMediumError) // what the LU answers for a plain error
		if se, ok := scsi.AsSense(err); ok {
			key = se.Key
		}
		io.errs[op][key&0xf].Add(1)
	}
}

func (io *ImageIO) counters() IOCounters {
	c := IOCounters{
		Image:   io.name,
		ReadOps: io.ops[opRead].Load(), WriteOps: io.ops[opWrite].Load(),
		ReadBytes: io.bytes[opRead].Load(), WriteBytes: io.bytes[opWrite].Load(),
		ReadNanos: io.nanos[opRead].Load(), WriteNanos: io.nanos[opWrite].Load(),
		FlushOps: io.ops[opFlush].Load(), UnmapOps: io.ops[opUnmap].Load(),
	}
	for op := range nOps {
		for k := range 16 {
			c.Errors += io.errs[op][k].Load()
		}
	}
	return c
}

func (io *ImageIO) collect(ch chan<- prometheus.Metric, counter func(*prometheus.Desc, float64, ...string)) {
	counter(descReadOps, float64(io.ops[opRead].Load()), io.name)
	counter(descWriteOps, float64(io.ops[opWrite].Load()), io.name)
	counter(descFlushOps, float64(io.ops[opFlush].Load()), io.name)
	counter(descUnmapOps, float64(io.ops[opUnmap].Load()), io.name)
	counter(descReadBytes, float64(io.bytes[opRead].Load()), io.name)
	counter(descWriteBytes, float64(io.bytes[opWrite].Load()), io.name)
	for op := range nOps {
		for k := range 16 {
			if n := io.errs[op][k].Load(); n > 0 {
				counter(descErrors, float64(n), io.name, opNames[op], senseKeyName(byte(k)))
			}
		}
	}
	io.lat[0].Collect(ch)
	io.lat[1].Collect(ch)
}

// senseKeyName is the SPC name of a sense key, as a label value.
func senseKeyName(k byte) string {
	switch k {
	case scsi.SenseNotReady:
		return "not_ready"
	case scsi.SenseMediumError:
		return "medium_error"
	case scsi.SenseHardwareError:
		return "hardware_error"
	case scsi.SenseIllegalRequest:
		return "illegal_request"
	case scsi.SenseUnitAttention:
		return "unit_attention"
	case scsi.SenseDataProtect:
		return "data_protect"
	case scsi.SenseAbortedCommand:
		return "aborted_command"
	case scsi.SenseMiscompare:
		return "miscompare"
	}
	return "key_" + strconv.Itoa(int(k))
}

// Backend counts the I/O of image through b. While I/O counting is off
// (SetIO) each command costs one atomic load more; with a nil Metrics, b
// is returned itself.
func (m *Metrics) Backend(image string, b scsi.Backend) scsi.Backend {
	if m == nil {
		return b
	}
	return &backend{m: m, name: image, next: b}
}

// backend is a scsi.Backend that counts. Its counters are created on the
// first command, so an image that sees no I/O here has no series here.
type backend struct {
	m    *Metrics
	name string
	io   atomic.Pointer[ImageIO]
	next scsi.Backend
}

func (b *backend) counters() *ImageIO {
	if io := b.io.Load(); io != nil {
		return io
	}
	io := b.m.image(b.name)
	b.io.Store(io)
	return io
}

func (b *backend) ReadAt(ctx context.Context, p []byte, off int64) error {
	if !b.m.io.Load() {
		return b.next.ReadAt(ctx, p, off)
	}
	start := time.Now()
	err := b.next.ReadAt(ctx, p, off)
	b.counters().done(opRead, len(p), start, err)
	return err
}

func (b *backend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if !b.m.io.Load() {
		return b.next.WriteAt(ctx, p, off, fua)
	}
	start := time.Now()
	err := b.next.WriteAt(ctx, p, off, fua)
	b.counters().done(opWrite, len(p), start, err)
	return err
}

func (b *backend) Flush(ctx context.Context) error {
	if !b.m.io.Load() {
		return b.next.Flush(ctx)
	}
	start := time.Now()
	err := b.next.Flush(ctx)
	b.counters().done(opFlush, 0, start, err)
	return err
}

func (b *backend) Unmap(ctx context.Context, off, length int64) error {
	if !b.m.io.Load() {
		return b.next.Unmap(ctx, off, length)
	}
	start := time.Now()
	err := b.next.Unmap(ctx, off, length)
	b.counters().done(opUnmap, 0, start, err)
	return err
}
