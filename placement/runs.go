package placement

// Run is a range of blocks [First, Last] over which every location has one
// state: States[i] is the state of the i-th map given to Runs.
type Run struct {
	First, Last int64
	States      []SyncState
}

// Runs cuts n blocks into maximal runs of equal states across maps (one
// per location, each of n blocks). With cells > 0 and fewer cells than
// blocks, blocks are first grouped into at most cells groups of equal
// size, each taking the worst state of its blocks (out of sync, then
// syncing, then in sync) per location: a picture of a large image keeps a
// bounded size and never hides a block that is not in sync.
func Runs(n int64, maps []*BlockMap, cells int64) []Run {
	per := int64(1)
	if cells > 0 && n > cells {
		per = (n + cells - 1) / cells
	}
	var out []Run
	cur := make([]SyncState, len(maps))
	for first := int64(0); first < n; first += per {
		last := min(first+per, n) - 1
		for i, m := range maps {
			cur[i] = worst(m, first, last)
		}
		if k := len(out) - 1; k >= 0 && equalStates(out[k].States, cur) {
			out[k].Last = last
			continue
		}
		out = append(out, Run{First: first, Last: last, States: append([]SyncState(nil), cur...)})
	}
	return out
}

// worst is the worst state of blocks [first, last] of m.
func worst(m *BlockMap, first, last int64) SyncState {
	w := InSync
	for b := first; b <= last; b++ {
		switch s := m.Get(b); s {
		case OutOfSync:
			return OutOfSync
		case Syncing:
			w = Syncing
		}
	}
	return w
}

func equalStates(a, b []SyncState) bool {
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
