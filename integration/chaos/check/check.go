package check

import (
	"cmp"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
)

// Kind is what an operation did.
type Kind uint8

// The two operations on a register.
const (
	Write Kind = iota
	Read
)

func (k Kind) String() string {
	switch k {
	case Write:
		return "write"
	case Read:
		return "read"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Result is how an operation ended.
type Result uint8

// The three outcomes of an operation.
const (
	OK      Result = iota // the target answered success
	Failed                // the target answered an error: a write may still have taken effect
	Timeout               // no answer: indeterminate
)

func (r Result) String() string {
	switch r {
	case OK:
		return "ok"
	case Failed:
		return "failed"
	case Timeout:
		return "timeout"
	}
	return fmt.Sprintf("result(%d)", uint8(r))
}

// Op is one recorded operation on one register (cell).
type Op struct {
	ID      int    // unique, for reports
	Client  string // who issued it; FinalClient marks the reads after healing
	Kind    Kind
	Key     string // the register, e.g. "vm1/17" (image/cell)
	Value   uint64 // write: the value written (non-zero); OK read: the value read, 0 = zeros
	Unknown bool   // read only: the bytes were neither zeros nor a well-formed value
	Start   time.Duration
	End     time.Duration // meaningless unless Result == OK
	Result  Result
}

// String prints an op on one line, e.g.
// "#12 c3 write vm1/17=0x2a [1.203s,1.25s] ok"; a read that observed
// nothing has no value, one that observed garbage shows "=?".
func (o Op) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "#%d %s %s %s", o.ID, o.Client, o.Kind, o.Key)
	switch {
	case o.Kind == Read && o.Result != OK:
	case o.Kind == Read && o.Unknown:
		b.WriteString("=?")
	default:
		fmt.Fprintf(&b, "=%#x", o.Value)
	}
	end := "?"
	if o.Result == OK {
		end = o.End.String()
	}
	fmt.Fprintf(&b, " [%s,%s] %s", o.Start, end, o.Result)
	return b.String()
}

// Violation kinds, from the most local to the most global.
const (
	UnknownValue    = "unknown-value"     // torn or corrupt bytes
	NeverWritten    = "never-written"     // a value no write of this register carries
	ReadBeforeWrite = "read-before-write" // a value read before anyone started writing it
	StaleRead       = "stale-read"        // an older value after a newer one took effect
	ZeroAfterWrite  = "zero-after-write"  // zeros after a value took effect
	LostWrite       = "lost-write"        // the final read lost a value that had taken effect
)

// FinalClient is the Client of the reads made after the cluster healed: a
// breach they show is a write the cluster lost for good, not a transient
// stale read.
const FinalClient = "final"

// MaxViolations bounds Check's answer so that a badly broken run still
// reports quickly; the earliest ones are kept.
const MaxViolations = 100

// Violation is one reason the history is not linearizable.
type Violation struct {
	Key    string
	Kind   string // one of the kinds above
	Detail string // a sentence naming the ops, values, times and zones
	Ops    []Op   // the ops involved, the offending read first
}

// Check returns the violations of linearizability of a history, each
// register (Key) checked on its own, sorted by the earliest Start among
// their Ops, at most MaxViolations of them. Reads that did not return OK
// are ignored; writes that did not return OK may take effect at any time
// after their Start, or never. At most one violation is reported per pair
// of values. Check does not modify ops.
func Check(ops []Op) []Violation {
	c := checker{ops: ops, anyWrite: map[uint64]int{}}
	byKey := map[string][]int{}
	for i, o := range ops {
		switch {
		case o.Kind == Write && o.Value != 0:
			// A write of 0 would be confused with the initial content; the
			// contract forbids it, so it is ignored.
			byKey[o.Key] = append(byKey[o.Key], i)
			if j, ok := c.anyWrite[o.Value]; !ok || o.Start < ops[j].Start {
				c.anyWrite[o.Value] = i
			}
		case o.Kind == Read && o.Result == OK:
			byKey[o.Key] = append(byKey[o.Key], i)
		}
	}
	keys := make([]string, 0, len(byKey))
	for k := range byKey {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		c.register(k, byKey[k])
	}
	// Findings are cheap (no text); only the ones reported get a Detail.
	slices.SortFunc(c.found, func(a, b finding) int {
		return cmp.Or(cmp.Compare(a.start, b.start), cmp.Compare(a.key, b.key),
			cmp.Compare(a.kind, b.kind), cmp.Compare(ops[a.ops[0]].ID, ops[b.ops[0]].ID))
	})
	if len(c.found) > MaxViolations {
		c.found = c.found[:MaxViolations]
	}
	var out []Violation
	for _, f := range c.found {
		v := Violation{Key: f.key, Kind: f.kind, Detail: f.detail()}
		for _, i := range f.ops {
			v.Ops = append(v.Ops, ops[i])
		}
		out = append(out, v)
	}
	return out
}

// Stats counts a history, for the run's summary line.
type Stats struct {
	Ops, Reads, Writes  int
	OK, Failed, Timeout int
	Unknown             int // OK reads of torn or corrupt bytes
	Keys                int // distinct registers
}

func (s Stats) String() string {
	return fmt.Sprintf("%d ops (%d reads, %d writes; %d ok, %d failed, %d timeout; %d unknown) on %d keys",
		s.Ops, s.Reads, s.Writes, s.OK, s.Failed, s.Timeout, s.Unknown, s.Keys)
}

// Summary counts the ops of a history.
func Summary(ops []Op) Stats {
	s := Stats{Ops: len(ops)}
	keys := map[string]bool{}
	for _, o := range ops {
		keys[o.Key] = true
		switch o.Kind {
		case Read:
			s.Reads++
			if o.Result == OK && o.Unknown {
				s.Unknown++
			}
		case Write:
			s.Writes++
		}
		switch o.Result {
		case OK:
			s.OK++
		case Failed:
			s.Failed++
		case Timeout:
			s.Timeout++
		}
	}
	s.Keys = len(keys)
	return s
}

// The ends of time: the virtual initial write of 0 happens at -inf, and an
// indeterminate write may complete as late as +inf.
const (
	negInf = time.Duration(math.MinInt64)
	posInf = time.Duration(math.MaxInt64)
)

// virtual stands for the initial write of zeros wherever an op index goes.
const virtual = -1

// cluster is one value of one register: its write and the reads of it.
type cluster struct {
	value      uint64
	write      int           // index in ops, or virtual for 0
	minEnd     time.Duration // by then the value had taken effect
	minEndOp   int
	maxStart   time.Duration // until then the value was still current
	maxStartOp int
}

func (z *cluster) forward() bool { return z.minEnd < z.maxStart }

// lo and hi bound the zone, whichever its direction.
func (z *cluster) lo() time.Duration { return min(z.minEnd, z.maxStart) }
func (z *cluster) hi() time.Duration { return max(z.minEnd, z.maxStart) }

type finding struct {
	key    string
	kind   string
	ops    []int         // indices in ops, the read first
	start  time.Duration // earliest Start among ops, for the order of the report
	detail func() string
}

type checker struct {
	ops      []Op
	anyWrite map[uint64]int // value -> its earliest write on any register, to name misdirected writes
	found    []finding
}

func (c *checker) add(key, kind string, detail func() string, ops ...int) {
	f := finding{key: key, kind: kind, start: posInf, detail: detail}
	for _, i := range ops {
		if i == virtual || slices.Contains(f.ops, i) {
			continue
		}
		f.ops = append(f.ops, i)
		f.start = min(f.start, c.ops[i].Start)
	}
	c.found = append(c.found, f)
}

// end is when an op is known to have taken effect: never, for a write that
// did not return OK. A clock that ran backwards is read as no time at all,
// so that every zone still ends with a read.
func (c *checker) end(i int) time.Duration {
	if c.ops[i].Result != OK {
		return posInf
	}
	return max(c.ops[i].End, c.ops[i].Start)
}

// register checks one register; idx are its writes and OK reads.
func (c *checker) register(key string, idx []int) {
	ops := c.ops
	// Values are unique by contract; should one be written twice, the
	// earliest write stands for it.
	writes := map[uint64]int{}
	for _, i := range idx {
		if o := ops[i]; o.Kind == Write {
			if j, ok := writes[o.Value]; !ok || o.Start < ops[j].Start {
				writes[o.Value] = i
			}
		}
	}
	clusters := map[uint64]*cluster{}
	// Every write has a cluster, read or not: an acknowledged write nobody
	// read still must not fall inside another value's forward zone.
	for v, w := range writes {
		clusters[v] = &cluster{value: v, write: w, minEnd: c.end(w), minEndOp: w, maxStart: ops[w].Start, maxStartOp: w}
	}
	for _, i := range idx {
		r := ops[i]
		if r.Kind != Read {
			continue
		}
		if r.Unknown {
			c.add(key, UnknownValue, func() string {
				return fmt.Sprintf("read %s returned bytes that are neither zeros nor a well-formed value (torn or corrupt)", c.ref(i))
			}, i)
			continue
		}
		w, ok := writes[r.Value]
		switch {
		case r.Value == 0:
			if clusters[0] == nil {
				clusters[0] = &cluster{write: virtual, minEnd: negInf, minEndOp: virtual, maxStart: negInf, maxStartOp: virtual}
			}
		case !ok:
			other, elsewhere := c.anyWrite[r.Value]
			if !elsewhere {
				other = virtual
			}
			c.add(key, NeverWritten, func() string {
				s := fmt.Sprintf("read %s returned %#x, which no write of %s carries", c.ref(i), r.Value, key)
				if elsewhere {
					s += fmt.Sprintf("; write %s put it in %s (misdirected?)", c.ref(other), ops[other].Key)
				}
				return s
			}, i, other)
			continue
		case c.end(i) < ops[w].Start:
			c.add(key, ReadBeforeWrite, func() string {
				return fmt.Sprintf("read %s returned %#x, but it ended at %s, before write %s of that value started at %s",
					c.ref(i), r.Value, r.End, c.ref(w), ops[w].Start)
			}, i, w)
			continue // its own report says it all; in the zones it would only echo
		}
		z := clusters[r.Value]
		if end := c.end(i); end < z.minEnd {
			z.minEnd, z.minEndOp = end, i
		}
		// On a tie a read beats the write, and a final read any other, so
		// that the read named in a breach is the telling one.
		if r.Start > z.maxStart || r.Start == z.maxStart &&
			(z.maxStartOp == z.write || r.Client == FinalClient && ops[z.maxStartOp].Client != FinalClient) {
			z.maxStart, z.maxStartOp = r.Start, i
		}
	}

	var fwd, bwd []*cluster
	for _, z := range clusters {
		if z.forward() {
			fwd = append(fwd, z)
		} else {
			bwd = append(bwd, z)
		}
	}
	slices.SortFunc(fwd, func(a, b *cluster) int {
		return cmp.Or(cmp.Compare(a.minEnd, b.minEnd), cmp.Compare(a.maxStart, b.maxStart), cmp.Compare(a.value, b.value))
	})
	slices.SortFunc(bwd, func(a, b *cluster) int { return cmp.Compare(a.value, b.value) })

	// Forward zones must not overlap. Sorted by start, a zone overlaps an
	// earlier one iff it starts before the furthest end seen so far; the
	// earlier-starting value is the one read after the other took effect.
	// best[k] is the zone of longest reach among fwd[:k+1].
	best := make([]*cluster, len(fwd))
	for k, z := range fwd {
		if k > 0 && z.minEnd < best[k-1].maxStart {
			c.breach(key, best[k-1], z)
		}
		best[k] = z
		if k > 0 && best[k-1].maxStart >= z.maxStart {
			best[k] = best[k-1]
		}
	}
	// A backward zone [s, e] must not lie strictly inside a forward zone:
	// among the forward zones starting before s, the one reaching furthest
	// is the one to test.
	for _, z := range bwd {
		s, e := z.lo(), z.hi()
		k, _ := slices.BinarySearchFunc(fwd, s, func(f *cluster, t time.Duration) int {
			if f.minEnd < t {
				return -1
			}
			return 1
		})
		if k > 0 && e < best[k-1].maxStart {
			c.breach(key, best[k-1], z)
		}
	}
}

// breach reports value u read (at the end of its forward zone) after value
// v had taken effect (at v's minEnd), v having come after u.
func (c *checker) breach(key string, u, v *cluster) {
	r := u.maxStartOp // a read: a forward zone always ends with one
	kind := StaleRead
	switch {
	case c.ops[r].Client == FinalClient:
		kind = LostWrite
	case u.value == 0:
		kind = ZeroAfterWrite
	}
	detail := func() string {
		var b strings.Builder
		o := c.ops[r]
		who := "read"
		if o.Client == FinalClient {
			who = "final read"
		}
		fmt.Fprintf(&b, "%s %s returned %#x, but %s, before the read began", who, c.ref(r), u.value, c.tookEffect(v))
		if u.value == 0 {
			b.WriteString("; zeros are the initial content")
		} else {
			fmt.Fprintf(&b, "; %#x is older: %s", u.value, c.tookEffect(u))
		}
		fmt.Fprintf(&b, " (zones: %s, %s)", zone(u), zone(v))
		return b.String()
	}
	c.add(key, kind, detail, r, u.minEndOp, u.write, v.minEndOp, v.write)
}

// tookEffect says which op proves that a value had taken effect, and when.
func (c *checker) tookEffect(z *cluster) string {
	i := z.minEndOp
	if i == virtual {
		return "zeros are the initial content"
	}
	if c.ops[i].Kind == Write {
		return fmt.Sprintf("%#x was acknowledged by write %s at %s", z.value, c.ref(i), c.ops[i].End)
	}
	return fmt.Sprintf("%#x was returned by read %s, which ended at %s", z.value, c.ref(i), c.ops[i].End)
}

// ref names an op briefly inside a sentence.
func (c *checker) ref(i int) string {
	o := c.ops[i]
	end := "?"
	if o.Result == OK {
		end = o.End.String()
	}
	return fmt.Sprintf("#%d by %s [%s,%s]", o.ID, o.Client, o.Start, end)
}

func zone(z *cluster) string {
	dir := "backward"
	if z.forward() {
		dir = "forward"
	}
	return fmt.Sprintf("%#x %s [%s,%s]", z.value, dir, at(z.lo()), at(z.hi()))
}

func at(t time.Duration) string {
	switch t {
	case negInf:
		return "-inf"
	case posInf:
		return "+inf"
	}
	return t.String()
}
