// Package qos limits one image's I/O with token buckets: operations per
// second and bytes per second, in total and for reads and writes
// separately, each with a burst. An I/O over the limit is delayed, never
// failed or dropped; the wait ends early only when the I/O's context
// does.
//
// The package has one job and no I/O of its own. Buckets is the pure
// state machine (limits, clock readings and I/O in; the time each I/O may
// run out), tested with tables and a seeded property test. Limiter wraps
// it for concurrent callers: a mutex held only to compute a reservation,
// never while waiting, and a queue per direction, so that a write never
// overtakes an earlier write (nor a read an earlier read) even across a
// change of limits. An image without limits pays one atomic load per
// I/O and allocates nothing.
package qos

import (
	"errors"
	"fmt"
)

// Op is the direction of an I/O.
type Op uint8

// Directions.
const (
	Read Op = iota
	Write
)

func (o Op) String() string {
	if o == Write {
		return "write"
	}
	return "read"
}

// Rate is one bucket: Limit per second (0: unlimited) and Burst, what an
// idle image may use at once before the limit holds it (0: one second's
// worth, Limit). A single I/O larger than the burst still runs, once the
// bucket is full, and its excess is paid by the I/O after it.
type Rate struct {
	Limit int64
	Burst int64
}

// Limits are an image's limits; the zero value limits nothing.
type Limits struct {
	IOPS, ReadIOPS, WriteIOPS Rate // operations per second
	BPS, ReadBPS, WriteBPS    Rate // bytes per second
}

// Zero reports whether nothing is limited.
func (l Limits) Zero() bool {
	for _, r := range l.rates() {
		if r.Limit != 0 {
			return false
		}
	}
	return true
}

// rates lists the buckets in a fixed order (bucket indices).
func (l Limits) rates() [numBuckets]Rate {
	return [numBuckets]Rate{l.IOPS, l.ReadIOPS, l.WriteIOPS, l.BPS, l.ReadBPS, l.WriteBPS}
}

// Bucket indices.
const (
	totalIOPS = iota
	readIOPS
	writeIOPS
	totalBPS
	readBPS
	writeBPS
	numBuckets
)

var bucketNames = [numBuckets]string{"iops", "read iops", "write iops", "bandwidth", "read bandwidth", "write bandwidth"}

// ErrInvalid is wrapped by Validate's errors.
var ErrInvalid = errors.New("invalid QoS limits")

// Validate checks that limits and bursts are not negative and that no
// burst is given without its limit.
func (l Limits) Validate() error {
	for i, r := range l.rates() {
		switch {
		case r.Limit < 0 || r.Burst < 0:
			return fmt.Errorf("%w: %s: negative limit or burst (%d, %d)", ErrInvalid, bucketNames[i], r.Limit, r.Burst)
		case r.Limit == 0 && r.Burst != 0:
			return fmt.Errorf("%w: %s: a burst (%d) without a limit", ErrInvalid, bucketNames[i], r.Burst)
		case r.Limit > MaxLimit || r.Burst > MaxLimit:
			return fmt.Errorf("%w: %s: above %d", ErrInvalid, bucketNames[i], int64(MaxLimit))
		}
	}
	return nil
}

// MaxLimit bounds limits and bursts (1 PiB/s; far beyond any device),
// so that the arithmetic stays exact enough in float64.
const MaxLimit = 1 << 50
