package status

import (
	"strings"
	"testing"
	"time"
)

var t0 = time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)

func nodes(states ...string) []Node {
	var out []Node
	for i, s := range states {
		out = append(out, Node{Name: "n" + string(rune('1'+i)), State: s, Cap: 1 << 20})
	}
	return out
}

func img(name string, wanted int, locs ...Location) Image {
	return Image{Name: name, BlockSize: 1 << 20, Wanted: wanted, Locations: locs}
}

func TestSummarize(t *testing.T) {
	for _, c := range []struct {
		name     string
		nodes    []Node
		images   []Image
		healthy  bool
		problems []string // kind:subject, in order
		eta      float64
		activity map[string]int
	}{
		{"healthy", nodes("alive", "alive"), []Image{img("a", 2, Location{Node: "n1"}, Location{Node: "n2"})},
			true, nil, 0, map[string]int{}},
		{"syncing is not a problem when enough copies are in sync", nodes("alive", "alive", "alive"),
			[]Image{img("a", 2, Location{Node: "n1"}, Location{Node: "n2"}, Location{Node: "n3", OutOfSync: 4})},
			true, nil, 4, map[string]int{"sync": 1, "remove_copy": 1}},
		{"dead node holding a copy", nodes("alive", "dead"), []Image{img("a", 2, Location{Node: "n1"}, Location{Node: "n2"})},
			false, []string{"degraded:a", "node_dead:n2"}, 0, map[string]int{}},
		{"suspect still counts as live", nodes("alive", "suspect"), []Image{img("a", 2, Location{Node: "n1"}, Location{Node: "n2"})},
			true, nil, 0, map[string]int{}},
		{"no in-sync copy of some blocks", nodes("alive", "dead"),
			[]Image{{Name: "a", BlockSize: 1 << 20, Wanted: 2, Unprotected: 3, Locations: []Location{{Node: "n1", OutOfSync: 3}, {Node: "n2"}}}},
			false, []string{"degraded:a", "unavailable:a", "node_dead:n2"}, 3, map[string]int{"sync": 1}},
		{"attached to a dead node", nodes("alive", "dead"),
			[]Image{{Name: "a", Attached: "n2", BlockSize: 1, Wanted: 1, Locations: []Location{{Node: "n1"}}}},
			false, []string{"ownerless:a"}, 0, map[string]int{}},
		{"uncapped backlog has no ETA", []Node{{Name: "n1", State: "alive"}, {Name: "n2", State: "alive"}},
			[]Image{img("a", 1, Location{Node: "n1"}, Location{Node: "n2", Syncing: 1})},
			true, nil, -1, map[string]int{"sync": 1, "remove_copy": 1}},
		{"a paused backlog has no ETA", nodes("alive", "alive"),
			[]Image{{Name: "a", BlockSize: 1, Wanted: 1, SyncPaused: true, Locations: []Location{{Node: "n1"}, {Node: "n2", OutOfSync: 5}}}},
			true, nil, -1, map[string]int{"sync_paused": 1, "remove_copy": 1}},
		{"missing copy", nodes("alive", "alive"), []Image{img("a", 2, Location{Node: "n1"})},
			false, []string{"degraded:a"}, 0, map[string]int{"add_copy": 1}},
		{"snapshots are counted apart", nodes("alive"), []Image{{Name: "s", Snapshot: true}},
			true, nil, 0, map[string]int{}},
	} {
		t.Run(c.name, func(t *testing.T) {
			st := Summarize("n1", t0, c.nodes, c.images, nil)
			if st.Healthy != c.healthy {
				t.Errorf("healthy %v, want %v: %+v", st.Healthy, c.healthy, st.Problems)
			}
			var got []string
			for _, p := range st.Problems {
				subj := p.Image
				if subj == "" {
					subj = p.Node
				}
				got = append(got, p.Kind+":"+subj)
			}
			if strings.Join(got, " ") != strings.Join(c.problems, " ") {
				t.Errorf("problems %v, want %v", got, c.problems)
			}
			if st.BacklogETASec != c.eta {
				t.Errorf("ETA %v, want %v", st.BacklogETASec, c.eta)
			}
			if len(st.Activity) != len(c.activity) {
				t.Errorf("activity %v, want %v", st.Activity, c.activity)
			}
			for k, v := range c.activity {
				if st.Activity[k] != v {
					t.Errorf("activity %v, want %v", st.Activity, c.activity)
				}
			}
		})
	}
	st := Summarize("n1", t0, nodes("alive"), nil, []string{"ukai/images/x: bad json"})
	if st.Healthy || len(st.Problems) != 1 || st.Problems[0].Kind != "unreadable" {
		t.Fatalf("an unreadable record is a problem: %+v", st)
	}
}
