package qos

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

var t0 = time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC)

func ms(n float64) time.Duration { return time.Duration(n * float64(time.Millisecond)) }

// TestReserve runs sequences of I/O through buckets: each step arrives at
// an offset from t0 and must be given its run time.
func TestReserve(t *testing.T) {
	type step struct {
		arrive time.Duration
		op     Op
		bytes  int64
		want   time.Duration // run time, from t0
	}
	cases := []struct {
		name  string
		lim   Limits
		steps []step
	}{
		{"no limits", Limits{}, []step{{0, Write, 1 << 20, 0}, {0, Read, 1 << 20, 0}, {ms(1), Write, 4096, ms(1)}}},
		{"iops: one second's burst, then the rate", Limits{IOPS: Rate{Limit: 2}}, []step{
			{0, Read, 4096, 0}, {0, Write, 4096, 0}, {0, Read, 4096, ms(500)}, {0, Read, 4096, ms(1000)},
		}},
		{"iops burst 1", Limits{IOPS: Rate{Limit: 10, Burst: 1}}, []step{
			{0, Read, 512, 0}, {0, Read, 512, ms(100)}, {0, Write, 512, ms(200)},
		}},
		{"an idle bucket fills again, not beyond its burst", Limits{IOPS: Rate{Limit: 10, Burst: 2}}, []step{
			{0, Read, 512, 0}, {0, Read, 512, 0}, {0, Read, 512, ms(100)},
			{ms(5000), Read, 512, ms(5000)}, {ms(5000), Read, 512, ms(5000)}, {ms(5000), Read, 512, ms(5100)},
		}},
		{"a write limit leaves reads alone", Limits{WriteIOPS: Rate{Limit: 1, Burst: 1}}, []step{
			{0, Write, 512, 0}, {0, Write, 512, ms(1000)}, {0, Read, 512, 0}, {0, Read, 512, 0}, {0, Write, 512, ms(2000)},
		}},
		{"read and write limits are separate buckets", Limits{ReadIOPS: Rate{Limit: 1, Burst: 1}, WriteIOPS: Rate{Limit: 2, Burst: 1}}, []step{
			{0, Read, 512, 0}, {0, Write, 512, 0}, {0, Read, 512, ms(1000)}, {0, Write, 512, ms(500)},
		}},
		{"bandwidth: an I/O larger than the burst runs on a full bucket, the next one pays", Limits{BPS: Rate{Limit: 1 << 20}}, []step{
			{0, Write, 4 << 20, 0}, {0, Write, 1 << 20, ms(4000)}, {0, Read, 512 << 10, ms(4500)},
		}},
		{"an UNMAP moves no data: only operation buckets", Limits{BPS: Rate{Limit: 1 << 20, Burst: 1 << 20}, IOPS: Rate{Limit: 1000}}, []step{
			{0, Write, 1 << 20, 0}, {0, Write, 0, 0}, {0, Write, 0, 0},
		}},
		{"the tighter of operations and bandwidth", Limits{IOPS: Rate{Limit: 100, Burst: 1}, WriteBPS: Rate{Limit: 64 << 10, Burst: 64 << 10}}, []step{
			{0, Write, 64 << 10, 0}, {0, Write, 64 << 10, ms(1000)}, {0, Read, 64 << 10, ms(1010)}, {0, Write, 4096, ms(1062.5)},
		}},
		{"total and direction: both hold", Limits{IOPS: Rate{Limit: 4, Burst: 1}, ReadIOPS: Rate{Limit: 1, Burst: 1}}, []step{
			{0, Read, 512, 0}, {0, Write, 512, ms(250)}, {0, Read, 512, ms(1000)}, {0, Write, 512, ms(1250)},
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var b Buckets
			b.Set(t0, c.lim)
			for i, s := range c.steps {
				r := b.Reserve(t0.Add(s.arrive), s.op, s.bytes)
				if got := r.At.Sub(t0); got != s.want {
					t.Fatalf("step %d (%s of %d at %v): runs at %v, want %v", i, s.op, s.bytes, s.arrive, got, s.want)
				}
			}
		})
	}
}

// TestSetLive changes limits between I/O: a bucket that stays keeps its
// debt, a raised limit repays it faster, a new bucket starts full, a
// removed one no longer delays.
func TestSetLive(t *testing.T) {
	var b Buckets
	b.Set(t0, Limits{WriteIOPS: Rate{Limit: 1, Burst: 1}})
	for range 3 {
		b.Reserve(t0, Write, 512) // runs at 0, 1 s, 2 s: the bucket owes 2 s
	}
	if got := b.Reserve(t0, Write, 512).At.Sub(t0); got != 3*time.Second {
		t.Fatalf("fourth write at %v, want 3s", got)
	}
	// Raised tenfold: the debt (3 writes beyond the burst) is repaid at
	// the new rate.
	b.Set(t0, Limits{WriteIOPS: Rate{Limit: 10, Burst: 1}})
	if got := b.Reserve(t0, Write, 512).At.Sub(t0); got != ms(400) {
		t.Fatalf("after raising: runs at %v, want 400ms", got)
	}
	// A new read limit starts full.
	b.Set(t0, Limits{WriteIOPS: Rate{Limit: 10, Burst: 1}, ReadIOPS: Rate{Limit: 1, Burst: 2}})
	if a, c := b.Reserve(t0, Read, 512).At, b.Reserve(t0, Read, 512).At; !a.Equal(t0) || !c.Equal(t0) {
		t.Fatalf("a new bucket is not full: reads at %v, %v", a.Sub(t0), c.Sub(t0))
	}
	// The same limits again change nothing.
	b.Set(t0, b.Limits())
	if got := b.Reserve(t0, Write, 512).At.Sub(t0); got != ms(500) {
		t.Fatalf("after setting the same limits: runs at %v, want 500ms", got)
	}
	// Removed: no delay, and the burst of a later limit is whole again.
	b.Set(t0, Limits{})
	if got := b.Reserve(t0, Write, 512).At; !got.Equal(t0) {
		t.Fatalf("after removing: runs at %v", got.Sub(t0))
	}
	b.Set(t0, Limits{WriteIOPS: Rate{Limit: 1, Burst: 1}})
	if got := b.Reserve(t0, Write, 512).At; !got.Equal(t0) {
		t.Fatalf("a limit set again starts full: runs at %v", got.Sub(t0))
	}
	// Lowered: the burst shrinks with it, tokens beyond it are lost.
	b.Set(t0.Add(10*time.Second), Limits{WriteIOPS: Rate{Limit: 100}})
	b.Set(t0.Add(10*time.Second), Limits{WriteIOPS: Rate{Limit: 1, Burst: 1}})
	b.Reserve(t0.Add(10*time.Second), Write, 512)
	if got := b.Reserve(t0.Add(10*time.Second), Write, 512).At.Sub(t0); got != 11*time.Second {
		t.Fatalf("after lowering: runs at %v, want 11s", got)
	}
}

// TestCancel: the last reservation gives its tokens back; an earlier one
// cannot (a later I/O was timed after it) and keeps them spent.
func TestCancel(t *testing.T) {
	var b Buckets
	b.Set(t0, Limits{IOPS: Rate{Limit: 1, Burst: 1}})
	b.Reserve(t0, Read, 512)
	r := b.Reserve(t0, Read, 512)
	b.Cancel(r)
	if got := b.Reserve(t0, Read, 512).At.Sub(t0); got != time.Second {
		t.Fatalf("after cancelling the last: runs at %v, want 1s", got)
	}
	r1 := b.Reserve(t0, Read, 512) // at 2 s
	b.Reserve(t0, Read, 512)       // at 3 s
	b.Cancel(r1)
	if got := b.Reserve(t0, Read, 512).At.Sub(t0); got != 4*time.Second {
		t.Fatalf("after cancelling one before the last: runs at %v, want 4s", got)
	}
}

// TestBucketsProperty runs random limits and random arrivals (both
// directions, sizes up to four bursts, some reservations cancelled) and
// checks, for every case:
//   - no I/O runs before it arrives;
//   - I/O of one direction (and drawing on the same buckets: an UNMAP
//     draws on no bandwidth bucket) runs in the order it arrived;
//   - over any interval between two run times, each bucket let through
//     at most burst + rate·length, plus the excess of one I/O larger than
//     the burst;
//   - no I/O waits longer than it must: at its run time every bucket it
//     draws on holds its cost (at most the burst), and when it waited,
//     one of them did not 1 ms earlier.
func TestBucketsProperty(t *testing.T) {
	rng := rand.New(rand.NewPCG(21, 7))
	for iter := range 400 {
		var lim Limits
		rates := [numBuckets]*Rate{&lim.IOPS, &lim.ReadIOPS, &lim.WriteIOPS, &lim.BPS, &lim.ReadBPS, &lim.WriteBPS}
		for i, r := range rates {
			if rng.IntN(3) != 0 {
				continue
			}
			if i < totalBPS {
				r.Limit = 1 + rng.Int64N(5000)
			} else {
				r.Limit = 4096 + rng.Int64N(200<<20)
			}
			if rng.IntN(2) == 0 {
				r.Burst = 1 + rng.Int64N(2*r.Limit)
			}
		}
		var b Buckets
		b.Set(t0, lim)
		type io struct {
			arrive, at time.Time
			op         Op
			bytes      int64
		}
		var ios []io
		now := t0
		maxBytes := int64(1 << 20)
		for range 300 {
			now = now.Add(time.Duration(rng.Int64N(int64(5 * time.Millisecond))))
			op := Op(rng.IntN(2))
			bytes := 512 * (1 + rng.Int64N(maxBytes/512))
			if rng.IntN(20) == 0 {
				bytes = 0 // unmap
			}
			before := b
			r := b.Reserve(now, op, bytes)
			checkTimely(t, iter, &before, r.At, now, op, bytes)
			if rng.IntN(15) == 0 {
				b.Cancel(r)
				continue
			}
			ios = append(ios, io{now, r.At, op, bytes})
		}
		last := [4]time.Time{}
		for i, x := range ios {
			class := int(x.op) * 2
			if x.bytes == 0 {
				class++
			}
			if x.at.Before(x.arrive) {
				t.Fatalf("case %d: I/O %d runs at %v, before it arrived (%v)", iter, i, x.at.Sub(t0), x.arrive.Sub(t0))
			}
			if x.at.Before(last[class]) {
				t.Fatalf("case %d: %s %d runs at %v, before an earlier %s (%v)", iter, x.op, i, x.at.Sub(t0), x.op, last[class].Sub(t0))
			}
			last[class] = x.at
		}
		for bi, r := range lim.rates() {
			if r.Limit == 0 {
				continue
			}
			burst := float64(r.Limit)
			if r.Burst > 0 {
				burst = float64(r.Burst)
			}
			type ev struct {
				at   time.Time
				cost float64
			}
			var evs []ev
			var maxCost float64
			for _, x := range ios {
				dir := bi == readIOPS || bi == readBPS
				if (bi == readIOPS || bi == writeIOPS || bi == readBPS || bi == writeBPS) && (x.op == Read) != dir {
					continue
				}
				if bi >= totalBPS && x.bytes == 0 {
					continue
				}
				c := cost(bi, x.bytes)
				evs = append(evs, ev{x.at, c})
				maxCost = max(maxCost, c)
			}
			if len(evs) == 0 {
				continue
			}
			slices.SortStableFunc(evs, func(a, b ev) int { return a.at.Compare(b.at) })
			excess := max(0, maxCost-burst)
			rate := float64(r.Limit)
			// Every window [evs[i].at, evs[j].at]: prefix sums.
			sum := make([]float64, len(evs)+1)
			for i, e := range evs {
				sum[i+1] = sum[i] + e.cost
			}
			for i := range evs {
				for j := i; j < len(evs); j++ {
					// Include every event at the window's ends.
					lo, hi := i, j
					for lo > 0 && evs[lo-1].at.Equal(evs[i].at) {
						lo--
					}
					for hi+1 < len(evs) && evs[hi+1].at.Equal(evs[j].at) {
						hi++
					}
					got := sum[hi+1] - sum[lo]
					bound := burst + rate*evs[j].at.Sub(evs[i].at).Seconds() + excess
					if got > bound*(1+1e-9)+1e-6*rate+1 {
						t.Fatalf("case %d, %s bucket (limit %d, burst %.0f): %.0f in [%v, %v], bound %.0f",
							iter, bucketNames[bi], r.Limit, burst, got, evs[i].at.Sub(t0), evs[j].at.Sub(t0), bound)
					}
				}
			}
		}
	}
}

// checkTimely: every bucket an I/O draws on holds its cost at its run
// time; when it waited, one of them lacked it 1 ms before.
func checkTimely(t *testing.T, iter int, b *Buckets, at, arrive time.Time, op Op, bytes int64) {
	t.Helper()
	short := false
	for i := range b.b {
		bk := &b.b[i]
		if bk.rate == 0 || bytes == 0 && i >= totalBPS || (i == readIOPS || i == readBPS) && op != Read || (i == writeIOPS || i == writeBPS) && op != Write {
			continue
		}
		need := min(cost(i, bytes), bk.burst)
		if got := bk.tokens(at); got < need-1e-6*bk.rate-1e-3 {
			t.Fatalf("case %d: %s of %d at %v: the %s bucket holds %.1f at its run time, needs %.1f", iter, op, bytes, at.Sub(t0), bucketNames[i], got, need)
		}
		short = short || bk.tokens(at.Add(-time.Millisecond)) < need
	}
	if at.After(arrive) && !short {
		t.Fatalf("case %d: %s of %d arrived at %v, waited until %v with every bucket full enough 1ms before", iter, op, bytes, arrive.Sub(t0), at.Sub(t0))
	}
}
