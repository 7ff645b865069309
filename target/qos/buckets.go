package qos

import "time"

// Buckets is the limiter's state machine: the token buckets of one image
// and the rule that decides when an I/O may run. It does no I/O, reads no
// clock and is not safe for concurrent use (Limiter serializes it).
//
// Each bucket is kept as the time it is full again (tat, a theoretical
// arrival time as in GCRA): its tokens at time x are
// burst - rate·(tat - x) before tat, burst after. An I/O runs at the
// first time every bucket it draws on holds its cost (at most the burst:
// a larger I/O waits for a full bucket), and then every one of them is
// charged at that same time; a bucket can go into debt by the part of an
// I/O larger than its burst, which the next I/O pays. So over any
// interval of length T a bucket lets through at most burst + rate·T plus
// one oversize I/O's excess, and the times handed out for I/O of one
// direction never decrease.
type Buckets struct {
	lim Limits
	b   [numBuckets]bucket
}

type bucket struct {
	rate, burst float64 // per second; rate 0: unlimited
	tat         time.Time
}

// Reservation is the time an I/O may run and what it took, for Cancel.
type Reservation struct {
	At    time.Time
	n     int
	taken [4]struct {
		i          int
		prev, next time.Time
	}
}

// Limits returns the limits in force.
func (s *Buckets) Limits() Limits { return s.lim }

// Set changes the limits at now. A bucket that stays limited keeps its
// tokens (at most the new burst; a debt stays a debt); a new one starts
// full; a removed one is forgotten.
func (s *Buckets) Set(now time.Time, lim Limits) {
	if lim == s.lim {
		return
	}
	for i, r := range lim.rates() {
		b := &s.b[i]
		if r.Limit <= 0 {
			*b = bucket{}
			continue
		}
		burst := float64(r.Burst)
		if r.Burst <= 0 {
			burst = float64(r.Limit)
		}
		rate := float64(r.Limit)
		if b.rate == 0 {
			*b = bucket{rate: rate, burst: burst}
			continue
		}
		tokens := min(b.tokens(now), burst)
		*b = bucket{rate: rate, burst: burst, tat: now.Add(seconds((burst - tokens) / rate))}
	}
	s.lim = lim
}

// tokens is what the bucket holds at now (negative: a debt).
func (b *bucket) tokens(now time.Time) float64 {
	if !b.tat.After(now) {
		return b.burst
	}
	return b.burst - b.rate*b.tat.Sub(now).Seconds()
}

// earliest is the first time the bucket holds cost (at most its burst).
func (b *bucket) earliest(cost float64) time.Time {
	return b.tat.Add(-seconds((b.burst - min(cost, b.burst)) / b.rate))
}

func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

// Reserve decides when an I/O of op and size bytes arriving at now may
// run, and charges its buckets as of then. An UNMAP (no data moved)
// passes bytes 0 and draws only on the operation buckets.
func (s *Buckets) Reserve(now time.Time, op Op, bytes int64) Reservation {
	idx := [4]int{totalIOPS, readIOPS, totalBPS, readBPS}
	if op == Write {
		idx[1], idx[3] = writeIOPS, writeBPS
	}
	use := idx[:]
	if bytes <= 0 {
		use = idx[:2]
	}
	r := Reservation{At: now}
	for _, i := range use {
		if b := &s.b[i]; b.rate > 0 {
			if e := b.earliest(cost(i, bytes)); e.After(r.At) {
				r.At = e
			}
		}
	}
	for _, i := range use {
		b := &s.b[i]
		if b.rate == 0 {
			continue
		}
		prev := b.tat
		if b.tat.Before(r.At) {
			b.tat = r.At
		}
		b.tat = b.tat.Add(seconds(cost(i, bytes) / b.rate))
		t := &r.taken[r.n]
		t.i, t.prev, t.next = i, prev, b.tat
		r.n++
	}
	return r
}

func cost(i int, bytes int64) float64 {
	if i >= totalBPS {
		return float64(bytes)
	}
	return 1
}

// Cancel gives back what an I/O that will not run took, from each bucket
// nothing drew on since (it is the last one charged there); otherwise the
// tokens stay spent, which only errs on the slow side.
func (s *Buckets) Cancel(r Reservation) {
	for _, t := range r.taken[:r.n] {
		if b := &s.b[t.i]; b.rate > 0 && b.tat.Equal(t.next) {
			b.tat = t.prev
		}
	}
}
