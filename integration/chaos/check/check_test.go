package check

import (
	"cmp"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"
)

// Builders for hand-written histories; times are in milliseconds.

func ms(n int) time.Duration { return time.Duration(n) * time.Millisecond }

func w(id int, key string, v uint64, s, e int) Op {
	return Op{ID: id, Client: fmt.Sprintf("c%d", id), Kind: Write, Key: key, Value: v, Start: ms(s), End: ms(e)}
}

// wx is a write that did not return OK: it may land at any time after s, or never.
func wx(id int, key string, v uint64, s int, res Result) Op {
	o := w(id, key, v, s, s+1)
	o.Result = res
	return o
}

func r(id int, key string, v uint64, s, e int) Op {
	return Op{ID: id, Client: fmt.Sprintf("c%d", id), Kind: Read, Key: key, Value: v, Start: ms(s), End: ms(e)}
}

func final(o Op) Op { o.Client = FinalClient; return o }

func unknown(o Op) Op { o.Unknown, o.Value = true, 0; return o }

func failed(o Op, res Result) Op { o.Result = res; return o }

// want is a violation as the tests pin it: its kind and its read.
type want struct {
	kind string
	read int
}

func TestCheck(t *testing.T) {
	const k = "vm1/17"
	for _, tc := range []struct {
		name   string
		ops    []Op
		want   []want
		detail []string // substrings of the first violation's Detail
	}{
		{name: "sequential write then read",
			ops: []Op{w(1, k, 1, 0, 10), r(2, k, 1, 20, 30)}},
		{name: "zeros before the first write",
			ops: []Op{r(1, k, 0, 0, 5), w(2, k, 1, 10, 20), r(3, k, 1, 25, 30)}},
		{name: "concurrent read returns the old value",
			ops: []Op{w(1, k, 1, 0, 10), w(2, k, 2, 20, 100), r(3, k, 1, 30, 40)}},
		{name: "concurrent read returns the new value",
			ops: []Op{w(1, k, 1, 0, 10), w(2, k, 2, 20, 100), r(3, k, 2, 30, 40)}},
		{name: "concurrent reads new then old",
			ops:    []Op{w(1, k, 1, 0, 10), w(2, k, 2, 20, 100), r(3, k, 2, 30, 40), r(4, k, 1, 50, 60)},
			want:   []want{{StaleRead, 4}},
			detail: []string{"read #4", "returned 0x1", "0x2 was returned by read #3", "0x1 is older", "write #1", "zones: 0x1 forward [10ms,50ms], 0x2 backward [30ms,40ms]"}},
		{name: "stale read",
			ops:    []Op{w(1, k, 1, 0, 10), w(2, k, 2, 20, 30), r(3, k, 1, 40, 50)},
			want:   []want{{StaleRead, 3}},
			detail: []string{"read #3 by c3 [40ms,50ms] returned 0x1", "0x2 was acknowledged by write #2 by c2 [20ms,30ms] at 30ms"}},
		{name: "stale read between reads of the newer value",
			ops:  []Op{w(1, k, 1, 0, 10), r(2, k, 1, 15, 20), w(3, k, 2, 25, 30), r(4, k, 2, 35, 40), r(5, k, 1, 45, 50)},
			want: []want{{StaleRead, 5}}},
		{name: "one report per pair of values",
			ops:  []Op{w(1, k, 1, 0, 10), w(2, k, 2, 20, 30), r(3, k, 1, 40, 50), r(4, k, 1, 60, 70)},
			want: []want{{StaleRead, 4}}},
		{name: "zero after write",
			ops:    []Op{w(1, k, 1, 0, 10), r(2, k, 0, 20, 30)},
			want:   []want{{ZeroAfterWrite, 2}},
			detail: []string{"returned 0x0", "0x1 was acknowledged by write #1", "zeros are the initial content"}},
		{name: "zero after the value was read",
			ops:  []Op{wx(1, k, 1, 0, Timeout), r(2, k, 1, 10, 20), r(3, k, 0, 30, 40)},
			want: []want{{ZeroAfterWrite, 3}}},
		{name: "zero during the write",
			ops: []Op{w(1, k, 1, 0, 100), r(2, k, 0, 10, 20)}},
		{name: "never written",
			ops:    []Op{w(1, k, 1, 0, 10), r(2, k, 7, 20, 30)},
			want:   []want{{NeverWritten, 2}},
			detail: []string{"0x7", "no write of vm1/17"}},
		{name: "read before write",
			ops:    []Op{r(1, k, 5, 0, 10), w(2, k, 5, 20, 30)},
			want:   []want{{ReadBeforeWrite, 1}},
			detail: []string{"ended at 10ms", "before write #2", "started at 20ms"}},
		{name: "read overlapping its write",
			ops: []Op{r(1, k, 5, 0, 20), w(2, k, 5, 20, 30)}},
		{name: "unknown value",
			ops:  []Op{w(1, k, 1, 0, 10), unknown(r(2, k, 0, 20, 30))},
			want: []want{{UnknownValue, 2}}},
		{name: "reads that did not return are ignored",
			ops: []Op{w(1, k, 1, 0, 10), failed(r(2, k, 0, 20, 30), Timeout), failed(r(3, k, 99, 20, 30), Failed),
				failed(unknown(r(4, k, 0, 20, 30)), Timeout)}},
		{name: "timed-out write read later",
			ops: []Op{w(1, k, 1, 0, 10), wx(2, k, 2, 20, Timeout), r(3, k, 2, 100, 110), r(4, k, 2, 120, 130)}},
		{name: "failed write read later",
			ops: []Op{w(1, k, 1, 0, 10), wx(2, k, 2, 20, Failed), r(3, k, 1, 30, 40), r(4, k, 2, 100, 110)}},
		{name: "indeterminate write never read",
			ops: []Op{w(1, k, 1, 0, 10), wx(2, k, 2, 20, Timeout), r(3, k, 1, 30, 40), r(4, k, 1, 100, 110)}},
		{name: "indeterminate write read before it started",
			ops:  []Op{w(1, k, 1, 0, 10), r(2, k, 2, 20, 30), wx(3, k, 2, 40, Timeout)},
			want: []want{{ReadBeforeWrite, 2}}},
		{name: "flip back after an indeterminate write was read",
			ops:  []Op{w(1, k, 1, 0, 10), wx(2, k, 2, 20, Timeout), r(3, k, 2, 30, 40), r(4, k, 1, 50, 60)},
			want: []want{{StaleRead, 4}}},
		{name: "final read older than the last acknowledged write",
			ops:    []Op{w(1, k, 1, 0, 10), w(2, k, 2, 20, 30), final(r(3, k, 1, 100, 110))},
			want:   []want{{LostWrite, 3}},
			detail: []string{"final read #3", "0x2 was acknowledged by write #2"}},
		{name: "final read of zeros after a write",
			ops:  []Op{w(1, k, 1, 0, 10), final(r(2, k, 0, 100, 110))},
			want: []want{{LostWrite, 2}}},
		{name: "final read of an indeterminate write after the last acknowledged one",
			ops: []Op{w(1, k, 1, 0, 10), w(2, k, 2, 20, 30), wx(3, k, 3, 40, Timeout), final(r(4, k, 3, 100, 110))}},
		{name: "final read of an indeterminate write that may have landed late",
			ops: []Op{wx(1, k, 1, 0, Timeout), w(2, k, 2, 20, 30), final(r(3, k, 1, 100, 110))}},
		{name: "final read of the last acknowledged write",
			ops: []Op{w(1, k, 1, 0, 10), w(2, k, 2, 20, 30), r(3, k, 2, 40, 50), final(r(4, k, 2, 100, 110))}},
		{name: "equal times are concurrent",
			ops: []Op{w(1, k, 1, 0, 10), w(2, k, 2, 10, 20), r(3, k, 1, 20, 30)}},
		{name: "two keys are independent",
			ops: []Op{w(1, "a", 1, 0, 10), r(2, "b", 0, 20, 30), r(3, "a", 1, 20, 30), w(4, "b", 2, 40, 50), r(5, "a", 1, 60, 70)}},
		{name: "a value of another key",
			ops:    []Op{w(1, "a", 1, 0, 10), r(2, "b", 1, 20, 30)},
			want:   []want{{NeverWritten, 2}},
			detail: []string{"write #1 by c1 [0s,10ms] put it in a"}},
		{name: "violations sorted by earliest start",
			ops: []Op{w(1, "b", 1, 50, 60), r(2, "b", 0, 70, 80), w(3, "a", 2, 0, 10), r(4, "a", 0, 20, 30),
				unknown(r(5, "c", 0, 5, 6))},
			want: []want{{ZeroAfterWrite, 4}, {UnknownValue, 5}, {ZeroAfterWrite, 2}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := slices.Clone(tc.ops)
			vs := Check(tc.ops)
			if !slices.Equal(in, tc.ops) {
				t.Fatal("Check modified its input")
			}
			var got []want
			for _, v := range vs {
				got = append(got, want{v.Kind, v.Ops[0].ID})
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("got %v, want %v\n%s", got, tc.want, describe(vs))
			}
			for _, s := range tc.detail {
				if !strings.Contains(vs[0].Detail, s) {
					t.Errorf("detail %q lacks %q", vs[0].Detail, s)
				}
			}
			// The order of the history must not matter.
			rev := slices.Clone(tc.ops)
			slices.Reverse(rev)
			got = got[:0]
			for _, v := range Check(rev) {
				got = append(got, want{v.Kind, v.Ops[0].ID})
			}
			if len(got) == 0 {
				got = nil
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("reversed history: got %v, want %v", got, tc.want)
			}
		})
	}
}

func describe(vs []Violation) string {
	var b strings.Builder
	for _, v := range vs {
		fmt.Fprintf(&b, "%s %s: %s\n", v.Kind, v.Key, v.Detail)
		for _, o := range v.Ops {
			fmt.Fprintf(&b, "    %s\n", o)
		}
	}
	return b.String()
}

func TestViolationOps(t *testing.T) {
	vs := Check([]Op{w(1, "k", 1, 0, 10), r(2, "k", 1, 12, 14), w(3, "k", 2, 20, 30), r(4, "k", 1, 40, 50)})
	if len(vs) != 1 {
		t.Fatalf("got %d violations, want 1:\n%s", len(vs), describe(vs))
	}
	var ids []int
	for _, o := range vs[0].Ops {
		ids = append(ids, o.ID)
	}
	// The read, the write of its value, then the write it missed.
	if want := []int{4, 1, 3}; !slices.Equal(ids, want) {
		t.Errorf("ops %v, want %v", ids, want)
	}
}

func TestMaxViolations(t *testing.T) {
	var ops []Op
	for i := range 3 * MaxViolations {
		key := fmt.Sprintf("vm1/%d", i)
		// Later keys start earlier, so that the order is by time, not key.
		t0 := 10000 - 10*i
		ops = append(ops, w(2*i, key, uint64(i+1), t0, t0+1), r(2*i+1, key, 0, t0+2, t0+3))
	}
	vs := Check(ops)
	if len(vs) != MaxViolations {
		t.Fatalf("got %d violations, want %d", len(vs), MaxViolations)
	}
	if !slices.IsSortedFunc(vs, func(a, b Violation) int { return cmp.Compare(a.Ops[0].Start, b.Ops[0].Start) }) {
		t.Error("violations are not sorted by start")
	}
	if got, want := vs[0].Key, fmt.Sprintf("vm1/%d", 3*MaxViolations-1); got != want {
		t.Errorf("first violation on %s, want the earliest, %s", got, want)
	}
}

func TestOpString(t *testing.T) {
	for _, tc := range []struct {
		op   Op
		want string
	}{
		{Op{ID: 12, Client: "c3", Kind: Write, Key: "vm1/17", Value: 42, Start: 1203 * time.Millisecond, End: 1250 * time.Millisecond},
			"#12 c3 write vm1/17=0x2a [1.203s,1.25s] ok"},
		{Op{ID: 1, Client: "c1", Kind: Write, Key: "k", Value: 1, Start: time.Second, End: 7 * time.Second, Result: Timeout},
			"#1 c1 write k=0x1 [1s,?] timeout"},
		{Op{ID: 2, Client: "final", Kind: Read, Key: "k", Start: time.Second, End: 2 * time.Second},
			"#2 final read k=0x0 [1s,2s] ok"},
		{Op{ID: 3, Client: "c1", Kind: Read, Key: "k", Unknown: true, Start: time.Second, End: 2 * time.Second},
			"#3 c1 read k=? [1s,2s] ok"},
		{Op{ID: 4, Client: "c1", Kind: Read, Key: "k", Value: 9, Start: time.Second, End: 2 * time.Second, Result: Failed},
			"#4 c1 read k [1s,?] failed"},
	} {
		if got := tc.op.String(); got != tc.want {
			t.Errorf("got %q, want %q", got, tc.want)
		}
	}
}

func TestSummary(t *testing.T) {
	ops := []Op{w(1, "a", 1, 0, 10), wx(2, "a", 2, 5, Timeout), wx(3, "b", 3, 5, Failed),
		r(4, "b", 0, 20, 30), unknown(r(5, "c", 0, 20, 30)), failed(r(6, "c", 0, 20, 30), Timeout)}
	got := Summary(ops)
	want := Stats{Ops: 6, Reads: 3, Writes: 3, OK: 3, Failed: 1, Timeout: 2, Unknown: 1, Keys: 3}
	if got != want {
		t.Errorf("got %+v, want %+v", got, want)
	}
	if s := got.String(); !strings.Contains(s, "6 ops") || !strings.Contains(s, "3 keys") {
		t.Errorf("String() = %q", s)
	}
}

// simulate runs a true register per key, nClients clients each issuing nOps
// sequential operations, and returns the recorded, linearizable history
// (shuffled across keys), ending with one final read per key. Each op takes
// effect at a point inside [Start, End]; a write that does not return OK
// takes effect at a point after Start, possibly after the client gave up,
// or never.
func simulate(rng *rand.Rand, nKeys, nClients, nOps int) []Op {
	var ops []Op
	var next uint64
	for k := range nKeys {
		key := fmt.Sprintf("vm%d/%d", k%3, k)
		type event struct {
			i       int
			at      time.Duration
			applies bool
		}
		var evs []event
		for c := range nClients {
			t := time.Duration(rng.IntN(20))
			for range nOps {
				start := t + time.Duration(rng.IntN(10))
				d := time.Duration(rng.IntN(30))
				op := Op{ID: len(ops) + 1, Client: fmt.Sprintf("c%d", c), Key: key, Start: start, End: start + d}
				at := start + time.Duration(rng.Int64N(int64(d)+1))
				applies := true
				if rng.IntN(2) == 0 {
					next++
					op.Kind, op.Value = Write, next
					switch rng.IntN(10) {
					case 0:
						op.Result = Failed
					case 1:
						op.Result = Timeout
					}
					if op.Result != OK {
						applies = rng.IntN(2) == 0
						at = start + time.Duration(rng.Int64N(3*int64(d)+1))
					}
				} else {
					op.Kind = Read
					if rng.IntN(10) == 0 {
						// Observed nothing; the garbage must be ignored.
						op.Result, op.Value = Timeout, rng.Uint64()
					}
				}
				evs = append(evs, event{len(ops), at, applies})
				ops = append(ops, op)
				t = op.End
			}
		}
		slices.SortStableFunc(evs, func(a, b event) int { return cmp.Compare(a.at, b.at) })
		var reg uint64
		var last time.Duration
		for _, e := range evs {
			o := &ops[e.i]
			switch {
			case o.Kind == Write && e.applies:
				reg = o.Value
			case o.Kind == Read && o.Result == OK:
				o.Value = reg
			}
			last = max(last, e.at, o.End)
		}
		start := last + 1 + time.Duration(rng.IntN(5))
		ops = append(ops, Op{ID: len(ops) + 1, Client: FinalClient, Kind: Read, Key: key, Value: reg,
			Start: start, End: start + time.Duration(rng.IntN(5))})
	}
	rng.Shuffle(len(ops), func(i, j int) { ops[i], ops[j] = ops[j], ops[i] })
	return ops
}

// staleValues returns, for the OK read at i, the values it must not return:
// 0 once some write was acknowledged before the read began, and any value
// whose acknowledged write was followed, in real time, by another
// acknowledged write completing before the read began.
func staleValues(ops []Op, i int) []uint64 {
	rd := ops[i]
	var out []uint64
	zero := false
	for _, w2 := range ops {
		if w2.Key != rd.Key || w2.Kind != Write || w2.Result != OK || w2.End >= rd.Start {
			continue
		}
		zero = true
		for _, w1 := range ops {
			if w1.Key == rd.Key && w1.Kind == Write && w1.Result == OK && w1.End < w2.Start && !slices.Contains(out, w1.Value) {
				out = append(out, w1.Value)
			}
		}
	}
	if zero {
		out = append(out, 0)
	}
	return out
}

func TestRandomHistories(t *testing.T) {
	iterations := 500
	if testing.Short() {
		iterations = 100
	}
	mutated := map[string]int{}
	for seed := range uint64(iterations) {
		rng := rand.New(rand.NewPCG(seed, 0x636865636b))
		ops := simulate(rng, 1+rng.IntN(4), 1+rng.IntN(4), 1+rng.IntN(12))
		if vs := Check(ops); len(vs) > 0 {
			t.Fatalf("seed %d: %d violations in a linearizable history:\n%s", seed, len(vs), describe(vs))
		}

		// Make one read return a value overwritten, in real time, before
		// it began: the zones must catch it, with that read to blame.
		type mutation struct {
			i int
			v uint64
		}
		var cands []mutation
		for i, o := range ops {
			if o.Kind == Read && o.Result == OK {
				for _, v := range staleValues(ops, i) {
					cands = append(cands, mutation{i, v})
				}
			}
		}
		if len(cands) == 0 {
			continue
		}
		m := cands[rng.IntN(len(cands))]
		bad := slices.Clone(ops)
		bad[m.i].Value = m.v
		rd := bad[m.i]
		kind := StaleRead
		switch {
		case rd.Client == FinalClient:
			kind = LostWrite
		case m.v == 0:
			kind = ZeroAfterWrite
		}
		mutated[kind]++
		vs := Check(bad)
		found := false
		for _, v := range vs {
			if v.Key != rd.Key {
				t.Errorf("seed %d: violation on %s, but only %s was changed:\n%s", seed, v.Key, rd.Key, describe(vs))
			}
			found = found || v.Kind == kind && v.Ops[0].ID == rd.ID
		}
		if !found {
			t.Fatalf("seed %d: read %s changed to return %#x: want a %s blaming it, got:\n%s", seed, rd, m.v, kind, describe(vs))
		}
	}
	// The mutations must have exercised every kind of breach.
	for _, k := range []string{StaleRead, ZeroAfterWrite, LostWrite} {
		if mutated[k] == 0 {
			t.Errorf("no mutation made a %s (mutations: %v)", k, mutated)
		}
	}
	t.Logf("mutations: %v", mutated)
}

// TestLargeHistory checks a chaos-run-sized linearizable history.
func TestLargeHistory(t *testing.T) {
	if testing.Short() {
		t.Skip("large history")
	}
	rng := rand.New(rand.NewPCG(1, 2))
	ops := simulate(rng, 1000, 5, 20)
	if vs := Check(ops); len(vs) > 0 {
		t.Fatalf("%d violations in a linearizable history:\n%s", len(vs), describe(vs[:1]))
	}
}

// BenchmarkCheck checks 100k ops over 1000 keys.
func BenchmarkCheck(b *testing.B) {
	rng := rand.New(rand.NewPCG(1, 2))
	ops := simulate(rng, 1000, 5, 20)
	b.ReportAllocs()
	for b.Loop() {
		if vs := Check(ops); len(vs) > 0 {
			b.Fatal(vs[0].Detail)
		}
	}
}

func ExampleCheck() {
	s := time.Second
	for _, v := range Check([]Op{
		{ID: 1, Client: "c1", Kind: Write, Key: "vm1/17", Value: 0x2a, Start: 1 * s, End: 2 * s},
		{ID: 2, Client: "c2", Kind: Write, Key: "vm1/17", Value: 0x2b, Start: 3 * s, End: 4 * s},
		{ID: 3, Client: "c3", Kind: Read, Key: "vm1/17", Value: 0x2a, Start: 5 * s, End: 6 * s},
	}) {
		fmt.Printf("%s on %s: %s\n", v.Kind, v.Key, v.Detail)
		for _, o := range v.Ops {
			fmt.Println("   ", o)
		}
	}
	// Output:
	// stale-read on vm1/17: read #3 by c3 [5s,6s] returned 0x2a, but 0x2b was acknowledged by write #2 by c2 [3s,4s] at 4s, before the read began; 0x2a is older: 0x2a was acknowledged by write #1 by c1 [1s,2s] at 2s (zones: 0x2a forward [2s,5s], 0x2b backward [3s,4s])
	//     #3 c3 read vm1/17=0x2a [5s,6s] ok
	//     #1 c1 write vm1/17=0x2a [1s,2s] ok
	//     #2 c2 write vm1/17=0x2b [3s,4s] ok
}
