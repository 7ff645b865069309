package paths

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/ukai-storage/ukai/target/scsi"
)

func TestPaths(t *testing.T) {
	members := map[string]Node{
		"n1": {Alive: true, Portal: "10.0.0.1:3260", Port: 1},
		"n2": {Alive: true, Portal: "10.0.0.2:3260", Port: 2},
		"n3": {Alive: false, Portal: "10.0.0.3:3260", Port: 3},
		"n4": {Alive: true, Portal: "[fd00::4]:3260", Port: 4},
		"n5": {Alive: true, Portal: "10.0.0.5:3260"}, // no number yet
		"n6": {Alive: true, Port: 6},                 // no portal gossiped
	}
	lookup := func(name string) (Node, bool) { n, ok := members[name]; return n, ok }
	self := func(name string) Node { return members[name] }
	tests := []struct {
		name    string
		in      Input
		want    string // "port:state" by port
		portals string
	}{
		{"owner elsewhere, self a copy",
			Input{Self: "n1", Owner: "n2", Named: []string{"n1", "n2"}},
			"1:AN 2:AO", "10.0.0.2:3260,2 10.0.0.1:3260,1"},
		{"self owns",
			Input{Self: "n1", SelfOwns: true, Owner: "n1", Named: []string{"n1", "n2"}},
			"1:AO 2:AN", "10.0.0.1:3260,1 10.0.0.2:3260,2"},
		{"self owns before the record says so",
			Input{Self: "n1", SelfOwns: true, Owner: "n2", Named: []string{"n1", "n2"}},
			"1:AO 2:AN", "10.0.0.1:3260,1 10.0.0.2:3260,2"},
		{"the record names self but self let go",
			Input{Self: "n1", Owner: "n1", Named: []string{"n1", "n2"}},
			"1:AO 2:AO", "10.0.0.1:3260,1 10.0.0.2:3260,2"},
		{"nobody owns: every live path optimized, the dead one unavailable",
			Input{Self: "n2", Named: []string{"n1", "n2", "n3"}},
			"1:AO 2:AO 3:U", "10.0.0.1:3260,1 10.0.0.2:3260,2"},
		{"dead owner: the others non-optimized, still usable",
			Input{Self: "n1", Owner: "n3", Named: []string{"n1", "n3"}},
			"1:AN 3:U", "10.0.0.1:3260,1"},
		{"owner not a copy (attached elsewhere), self not named",
			Input{Self: "n2", Owner: "n4", Named: []string{"n1"}},
			"1:AN 2:AN 4:AO", "[fd00::4]:3260,4 10.0.0.1:3260,1 10.0.0.2:3260,2"},
		{"unknown and unnumbered nodes left out, a portal-less one not discovered",
			Input{Self: "n1", Owner: "n1", SelfOwns: true, Named: []string{"n5", "n6", "n7"}},
			"1:AO 6:AN", "10.0.0.1:3260,1"},
	}
	short := map[scsi.AccessState]string{scsi.ActiveOptimized: "AO", scsi.ActiveNonOptimized: "AN", scsi.Unavailable: "U"}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.in.Lookup = func(name string) (Node, bool) {
				if name == tc.in.Self {
					t.Fatalf("Lookup asked about self")
				}
				return lookup(name)
			}
			tc.in.SelfNode = self(tc.in.Self)
			ps := Paths(tc.in)
			var got []string
			for _, p := range ps {
				got = append(got, fmt.Sprintf("%d:%s", p.Port, short[p.State]))
			}
			if g := strings.Join(got, " "); g != tc.want {
				t.Errorf("paths %q, want %q", g, tc.want)
			}
			if g := strings.Join(Portals(ps), " "); g != tc.portals {
				t.Errorf("portals %q, want %q", g, tc.portals)
			}
			gs := Groups(ps)
			if len(gs) != len(ps) || !slices.IsSortedFunc(gs, func(a, b scsi.PortGroup) int { return int(a.ID) - int(b.ID) }) {
				t.Errorf("groups %v", gs)
			}
		})
	}
}
