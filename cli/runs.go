package cli

import (
	"fmt"
	"strings"

	"github.com/ukai-storage/ukai/api"
)

var stateWords = [...]string{"in sync", "syncing", "out of sync"}

// RunLines prints a block map's runs, one line each: the block range, then
// the nodes in each state, in sync first ("0-1023 in sync on n1,n2";
// "1024-1535 in sync on n1; out of sync on n2").
func RunLines(locs []api.Location, runs []api.BlockRun) []string {
	out := make([]string, 0, len(runs))
	for _, r := range runs {
		var parts []string
		for st, word := range stateWords {
			var nodes []string
			for _, l := range locs {
				if s, ok := r.States[l.Node]; ok && min(max(s, 0), 2) == st {
					nodes = append(nodes, l.Node)
				}
			}
			if len(nodes) > 0 {
				parts = append(parts, word+" on "+strings.Join(nodes, ","))
			}
		}
		rng := fmt.Sprint(r.First)
		if r.Last != r.First {
			rng = fmt.Sprintf("%d-%d", r.First, r.Last)
		}
		out = append(out, rng+" "+strings.Join(parts, "; "))
	}
	return out
}
