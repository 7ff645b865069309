package activity

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"
)

// volume is an in-memory Volume that records what the log asked of it.
type volume struct {
	mu         sync.Mutex
	blocks     int64
	flushes    int
	suspects   bool
	suspectErr error
	reconciled []int64
}

func (v *volume) Blocks() int64 { return v.blocks }
func (v *volume) Flush(context.Context) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.flushes++
	return nil
}
func (v *volume) HasSuspects() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.suspects
}
func (v *volume) ReconcileSuspects(context.Context) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.suspectErr != nil {
		return v.suspectErr
	}
	v.suspects = false
	return nil
}
func (v *volume) ReconcileBlock(_ context.Context, b int64) (int, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.reconciled = append(v.reconciled, b)
	return 1, nil
}

// store is an in-memory Store; fail makes Put fail.
type store struct {
	log    []int64
	puts   int
	fail   error
	getErr error
}

func (s *store) Put(_ context.Context, blocks []int64) error {
	if s.fail != nil {
		return s.fail
	}
	s.puts++
	s.log = slices.Sorted(slices.Values(blocks))
	return nil
}
func (s *store) Get(context.Context) ([]int64, error) { return s.log, s.getErr }

// clock is a manual clock.
type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }
func (c *clock) tick()          { c.t = c.t.Add(time.Second) }

func newLog(blocks int64, max, ahead int) (*Log, *volume, *store, *clock, *bool) {
	v := &volume{blocks: blocks}
	st := &store{}
	c := &clock{t: time.Unix(1000, 0)}
	held := true
	l := New(Config{Volume: v, Store: st, Held: func() bool { return held }, Now: c.now, Max: max, Ahead: ahead})
	return l, v, st, c, &held
}

func TestBeforeStoresOnlyNewBlocks(t *testing.T) {
	ctx := context.Background()
	l, _, st, c, _ := newLog(100, 0, -1)
	tests := []struct {
		blocks   []int64
		wantPuts int
		wantLog  []int64
	}{
		{[]int64{5}, 1, []int64{5}},
		{[]int64{5}, 1, []int64{5}},       // present: no metadata write
		{[]int64{7, 5}, 2, []int64{5, 7}}, // one new block: one write
		{[]int64{5, 7}, 2, []int64{5, 7}}, // all present
		{[]int64{9, 10}, 3, []int64{5, 7, 9, 10}},
	}
	for i, tc := range tests {
		c.tick()
		if err := l.Before(ctx, tc.blocks); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
		if st.puts != tc.wantPuts || !slices.Equal(st.log, tc.wantLog) {
			t.Fatalf("after write %d of %v: %d puts, log %v; want %d, %v", i, tc.blocks, st.puts, st.log, tc.wantPuts, tc.wantLog)
		}
		if l.Stored() != len(tc.wantLog) {
			t.Fatalf("Stored() = %d, want %d", l.Stored(), len(tc.wantLog))
		}
	}
}

func TestBeforeLogsAheadOfSequentialWriter(t *testing.T) {
	ctx := context.Background()
	l, _, st, _, _ := newLog(20, 0, 3)
	if err := l.Before(ctx, []int64{4}); err != nil {
		t.Fatal(err)
	}
	// Block 5 follows 4: 6, 7 and 8 go in with it.
	if err := l.Before(ctx, []int64{5}); err != nil {
		t.Fatal(err)
	}
	if want := []int64{4, 5, 6, 7, 8}; !slices.Equal(st.log, want) {
		t.Fatalf("log %v, want %v", st.log, want)
	}
	puts := st.puts
	for _, b := range []int64{6, 7, 8} {
		if err := l.Before(ctx, []int64{b}); err != nil {
			t.Fatal(err)
		}
	}
	if st.puts != puts {
		t.Fatalf("writes to blocks logged ahead stored the log again (%d puts, want %d)", st.puts, puts)
	}
	// Never past the end of the image.
	if err := l.Before(ctx, []int64{18}); err != nil {
		t.Fatal(err)
	}
	if err := l.Before(ctx, []int64{19}); err != nil {
		t.Fatal(err)
	}
	if slices.Max(st.log) != 19 {
		t.Fatalf("log %v goes past the image's 20 blocks", st.log)
	}
}

func TestBeforeFailsWhenStoringFails(t *testing.T) {
	ctx := context.Background()
	l, _, st, _, _ := newLog(100, 0, -1)
	st.fail = errors.New("store down")
	if err := l.Before(ctx, []int64{3}); !errors.Is(err, st.fail) {
		t.Fatalf("Before with the store down: %v", err)
	}
	st.fail = nil
	if err := l.Before(ctx, []int64{3}); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(st.log, []int64{3}) {
		t.Fatalf("the next write to the block did not store it: log %v", st.log)
	}
}

func TestBeforeRefusesWhenNotHeld(t *testing.T) {
	ctx := context.Background()
	l, _, st, _, held := newLog(100, 0, -1)
	*held = false
	if err := l.Before(ctx, []int64{3}); !errors.Is(err, ErrNotHeld) {
		t.Fatalf("Before without ownership: %v, want ErrNotHeld", err)
	}
	if st.puts != 0 {
		t.Fatal("the log was stored without ownership")
	}
	*held = true
	if err := l.Before(ctx, []int64{3}); err != nil || !slices.Equal(st.log, []int64{3}) {
		t.Fatalf("after ownership came back: %v, log %v", err, st.log)
	}
}

func TestFullLogFlushesAndStartsOver(t *testing.T) {
	ctx := context.Background()
	l, v, st, c, _ := newLog(100, 4, -1)
	for b := int64(0); b < 4; b += 1 {
		c.tick()
		if err := l.Before(ctx, []int64{b * 2}); err != nil {
			t.Fatal(err)
		}
	}
	if v.flushes != 0 {
		t.Fatal("flushed before the log was full")
	}
	c.tick()
	if err := l.Before(ctx, []int64{50}); err != nil {
		t.Fatal(err)
	}
	if v.flushes != 1 || !slices.Equal(st.log, []int64{50}) {
		t.Fatalf("full log: %d flushes, log %v; want 1 flush and only the new block", v.flushes, st.log)
	}
	// Blocks flushed by someone else (Flushed) are evicted without a flush.
	c.tick()
	l.Flushed(c.now())
	c.tick()
	for _, b := range []int64{60, 62, 64, 66} {
		if err := l.Before(ctx, []int64{b}); err != nil {
			t.Fatal(err)
		}
	}
	if v.flushes != 1 || !slices.Equal(st.log, []int64{60, 62, 64, 66}) {
		t.Fatalf("after Flushed: %d flushes, log %v", v.flushes, st.log)
	}
}

// TestFailedStoreAfterEvictionKeepsBlockOut: an eviction can leave as
// many blocks in memory as were stored; the old rule (keep the new block
// when the counts match) then kept a block the failed store never wrote,
// and no later write to it stored it: a crash in such a write left a
// block a successor would not reconcile.
func TestFailedStoreAfterEvictionKeepsBlockOut(t *testing.T) {
	ctx := context.Background()
	l, _, st, c, _ := newLog(100, 2, -1)
	for _, b := range []int64{0, 2} {
		c.tick()
		if err := l.Before(ctx, []int64{b}); err != nil {
			t.Fatal(err)
		}
	}
	c.tick()
	l.Flushed(c.now()) // block 0 and 2 durable
	c.tick()
	if err := l.Before(ctx, []int64{2}); err != nil { // 2 written again: not durable
		t.Fatal(err)
	}
	c.tick()
	st.fail = errors.New("store down")
	// 3 blocks > max 2: block 0 is evicted, leaving 2 in memory, the count stored.
	if err := l.Before(ctx, []int64{4}); err == nil {
		t.Fatal("Before succeeded with the store down")
	}
	st.fail = nil
	if err := l.Before(ctx, []int64{4}); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(st.log, 4) {
		t.Fatalf("block 4 never reached the stored log (log %v): a write to it is unprotected", st.log)
	}
}

func TestClear(t *testing.T) {
	ctx := context.Background()
	l, v, st, c, _ := newLog(100, 0, -1)
	l.Clear(ctx) // nothing stored: no store request
	if st.puts != 0 {
		t.Fatal("Clear of an empty log stored it")
	}
	c.tick()
	if err := l.Before(ctx, []int64{1, 2}); err != nil {
		t.Fatal(err)
	}
	l.Clear(ctx)
	if len(st.log) != 2 {
		t.Fatalf("cleared blocks written after the last flush: log %v", st.log)
	}
	c.tick()
	l.Flushed(c.now())
	v.suspects, v.suspectErr = true, errors.New("copy down")
	l.Clear(ctx)
	if len(st.log) != 2 {
		t.Fatal("cleared the log while a failed write's blocks could not be reconciled")
	}
	v.suspectErr = nil
	l.Clear(ctx)
	if len(st.log) != 0 || l.Stored() != 0 || v.suspects {
		t.Fatalf("after flush and reconcile: log %v, stored %d, suspects %v", st.log, l.Stored(), v.suspects)
	}
}

func TestReconcile(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name   string
		stored []int64
		getErr error
		want   []int64
	}{
		{"empty log", nil, nil, nil},
		{"the logged blocks", []int64{1, 3}, nil, []int64{1, 3}},
		{"out of range ignored", []int64{-1, 2, 4, 99}, nil, []int64{2}},
		{"unreadable: every block", nil, errors.New("malformed"), []int64{0, 1, 2, 3}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l, v, st, _, _ := newLog(4, 0, -1)
			st.log, st.getErr = tc.stored, tc.getErr
			if err := l.Reconcile(ctx); err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(v.reconciled, tc.want) {
				t.Fatalf("reconciled %v, want %v", v.reconciled, tc.want)
			}
			if tc.want != nil && (len(st.log) != 0 || st.puts != 1) {
				t.Fatalf("log not cleared after reconciling: %v (%d puts)", st.log, st.puts)
			}
		})
	}
}
