package placement

import (
	"math/rand/v2"
	"reflect"
	"testing"
)

func TestRuns(t *testing.T) {
	a, b := NewBlockMap(10, InSync), NewBlockMap(10, InSync)
	b.SetRange(4, 3, OutOfSync)
	b.Set(9, Syncing)
	got := Runs(10, []*BlockMap{a, b}, 0)
	want := []Run{
		{0, 3, []SyncState{InSync, InSync}},
		{4, 6, []SyncState{InSync, OutOfSync}},
		{7, 8, []SyncState{InSync, InSync}},
		{9, 9, []SyncState{InSync, Syncing}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("runs\n got %v\nwant %v", got, want)
	}
	// 4 cells of 3 blocks: the worst state of each group wins.
	got = Runs(10, []*BlockMap{a, b}, 4)
	want = []Run{
		{0, 2, []SyncState{InSync, InSync}},
		{3, 8, []SyncState{InSync, OutOfSync}},
		{9, 9, []SyncState{InSync, Syncing}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("4 cells\n got %v\nwant %v", got, want)
	}
	if got := Runs(0, []*BlockMap{NewBlockMap(0, InSync)}, 0); len(got) != 0 {
		t.Fatalf("empty image: %v", got)
	}
}

// TestRunsCoverEveryBlock: runs tile [0, n) in order, adjacent runs
// differ, and without cells each run's states are its blocks' states.
func TestRunsCoverEveryBlock(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for trial := range 200 {
		n := int64(rng.IntN(200))
		maps := []*BlockMap{NewBlockMap(n, InSync), NewBlockMap(n, InSync)}
		for _, m := range maps {
			for range rng.IntN(6) {
				if n == 0 {
					break
				}
				from := rng.Int64N(n)
				m.SetRange(from, 1+rng.Int64N(n-from), SyncState(rng.IntN(3)))
			}
		}
		cells := int64(0)
		if trial%2 == 1 {
			cells = 1 + rng.Int64N(40)
		}
		runs := Runs(n, maps, cells)
		next := int64(0)
		for i, r := range runs {
			if r.First != next || r.Last < r.First {
				t.Fatalf("trial %d: run %d %v does not follow %d", trial, i, r, next)
			}
			if i > 0 && equalStates(runs[i-1].States, r.States) {
				t.Fatalf("trial %d: runs %d and %d have the same states", trial, i-1, i)
			}
			for b := r.First; b <= r.Last; b++ {
				for j, m := range maps {
					s := m.Get(b)
					if cells == 0 && s != r.States[j] || s > r.States[j] { // states are ordered by how bad they are
						t.Fatalf("trial %d: block %d of map %d is %v, its run says %v", trial, b, j, s, r.States[j])
					}
				}
			}
			next = r.Last + 1
		}
		if next != n {
			t.Fatalf("trial %d: runs end at %d of %d blocks", trial, next, n)
		}
		if cells > 0 && int64(len(runs)) > cells {
			t.Fatalf("trial %d: %d runs for %d cells", trial, len(runs), cells)
		}
	}
}
