package placement

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"
)

var t0 = time.Date(2026, 1, 6, 12, 0, 0, 0, time.UTC)

const nb = 20 // blocks per test image

func nd(name string, free int64, labels ...string) NodeInfo {
	n := NodeInfo{Name: name, Alive: true, Free: free, Labels: map[string]string{}}
	for i := 0; i+1 < len(labels); i += 2 {
		n.Labels[labels[i]] = labels[i+1]
	}
	return n
}

func dead(n NodeInfo, since time.Time) NodeInfo { n.Alive = false; n.DeadSince = since; return n }

// bm is a map of nb blocks, in sync except the listed blocks (out of sync).
func bm(oos ...int64) *BlockMap {
	m := NewBlockMap(nb, InSync)
	for _, b := range oos {
		m.Set(b, OutOfSync)
	}
	return m
}

func allOOS() *BlockMap { return NewBlockMap(nb, OutOfSync) }

func im(name string, pol ImagePolicy, locs ...any) ImageState {
	img := ImageState{Name: name, Size: nb * 4 << 20, BlockSize: 4 << 20, Policy: pol, Maps: map[string]*BlockMap{}}
	for i := 0; i < len(locs); i += 2 {
		img.Locations = append(img.Locations, locs[i].(string))
		img.Maps[locs[i].(string)] = locs[i+1].(*BlockMap)
	}
	return img
}

// short renders an action compactly for comparisons.
func short(a Action) string {
	s := string(a.Kind)
	if a.Node != "" {
		s += " " + a.Node
	}
	if a.Kind == Sync {
		s += fmt.Sprintf(" [%d,%d)", a.From, a.To)
		if a.Rate != 0 {
			s += fmt.Sprintf(" @%d", a.Rate)
		}
		if !a.Deadline.IsZero() {
			s += " until " + a.Deadline.UTC().Format("01-02T15:04")
		}
	}
	if a.Kind == Wait && !a.Until.IsZero() {
		s += " until " + a.Until.UTC().Format("01-02T15:04")
	}
	return s
}

func shorts(as []Action) []string {
	out := []string{}
	for _, a := range as {
		out = append(out, short(a))
	}
	return out
}

func threeZones() []NodeInfo {
	return []NodeInfo{
		nd("n1", 100, "zone", "a"), nd("n2", 300, "zone", "a"),
		nd("n3", 200, "zone", "b"), nd("n4", 50, "zone", "c", "ssd", "yes"),
	}
}

func TestPlanRules(t *testing.T) {
	night := SyncPolicy{Windows: []Window{{22 * 60, 6 * 60}}}
	for _, c := range []struct {
		rule   string
		state  State
		want   []string
		reason []string // substrings expected in the reasons, in order of actions
	}{
		{"replicas-up most free", State{Nodes: threeZones(), Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2}, "n1", bm())}},
			[]string{"add_location n2"}, []string{"replicas 2 wanted, 1 present: add n2 (most free space)"}},
		{"replicas-up spread", State{Nodes: threeZones(), Images: []ImageState{
			im("i", ImagePolicy{Replicas: 3, SpreadBy: "zone"}, "n1", bm())}},
			[]string{"add_location n3", "add_location n4"}, []string{"add n3 (zone b, most free space)", "add n4 (zone c, only candidate)"}},
		{"replicas-up prefer labels", State{Nodes: threeZones(), Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2, PreferLabels: map[string]string{"ssd": "yes"}}, "n1", bm())}},
			[]string{"add_location n4"}, []string{"preferred labels"}},
		{"replicas-up no candidate", State{Nodes: threeZones()[:2], Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2, SpreadBy: "zone"}, "n1", bm())}},
			[]string{"refuse"}, []string{"spread by zone needs 2 distinct values"}},
		{"replicas-up dead candidates", State{Nodes: []NodeInfo{nd("n1", 1), dead(nd("n2", 1), t0)}, Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2}, "n1", bm())}},
			[]string{"refuse"}, []string{"cannot place 1 more: no alive node"}},
		{"replicas-down covered", State{Nodes: threeZones(), Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2}, "n1", bm(), "n2", bm(), "n3", bm())}},
			[]string{"remove_location n1"}, []string{"replicas 2 wanted, 3 present: remove n1 (least free space)"}},
		{"replicas-down prefers out of sync", State{Nodes: threeZones(), Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2}, "n1", bm(), "n2", bm(3), "n3", bm())}},
			// n2 is removed; blocks it holds are held by the others; its
			// missing block 3 is not its to lose.
			[]string{"remove_location n2"}, []string{"1 block not in sync"}},
		{"replicas-down last copy of a block", State{Nodes: threeZones(), Images: []ImageState{
			im("i", ImagePolicy{Replicas: 1}, "n1", bm(17), "n2", bm(3))}},
			// each holds the last in-sync copy of a block the other lacks;
			// both sync what they can meanwhile.
			[]string{"sync n1 [17,18)", "sync n2 [3,4)", "wait"}, []string{"", "", "n1 holds the last in-sync copy of block 3"}},
		{"replicas-down to one, spread violator", State{Nodes: threeZones(), Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2, SpreadBy: "zone"}, "n2", bm(), "n3", bm(), "n1", bm())}},
			[]string{"remove_location n1"}, []string{"shares zone a with n2"}},
		{"replicas-down dead first", State{Nodes: []NodeInfo{nd("n1", 1), dead(nd("n2", 900), t0), nd("n3", 1)}, Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2}, "n1", bm(), "n2", bm(), "n3", bm())}},
			[]string{"remove_location n2"}, []string{"node down"}},
		{"dead holds last copy", State{Nodes: []NodeInfo{nd("n1", 1), dead(nd("n2", 900), t0)}, Images: []ImageState{
			im("i", ImagePolicy{Replicas: 1}, "n1", bm(5), "n2", bm())}},
			[]string{"wait", "wait n1"}, []string{"n2 holds the last in-sync copy of block 5", "no alive in-sync copy"}},
		{"exact add and wait", State{Nodes: threeZones(), Images: []ImageState{
			im("i", ImagePolicy{Locations: []string{"n2", "n3"}}, "n1", bm(), "n2", bm())}},
			[]string{"add_location n3", "wait n1"}, []string{"add n3", "would leave block 0 with 1 in-sync copy (2 wanted)"}},
		{"exact remove once in sync", State{Nodes: threeZones(), Images: []ImageState{
			im("i", ImagePolicy{Locations: []string{"n2", "n3"}}, "n1", bm(), "n2", bm(), "n3", bm())}},
			[]string{"remove_location n1"}, []string{"not listed"}},
		{"exact target down", State{Nodes: []NodeInfo{nd("n1", 1), dead(nd("n2", 1), t0)}, Images: []ImageState{
			im("i", ImagePolicy{Locations: []string{"n1", "n2"}}, "n1", bm())}},
			[]string{"refuse n2"}, []string{"not alive"}},
		{"sync open", State{Nodes: threeZones(), Now: t0, Default: SyncPolicy{MaxRate: 1000}, Images: []ImageState{
			im("i", ImagePolicy{}, "n1", bm(), "n2", bm(2, 5, 9))}},
			[]string{"sync n2 [2,10) @1000"}, []string{"n2 has 3 of 20 blocks not in sync: sync blocks [2,10) from n1"}},
		{"sync window closed", State{Nodes: threeZones(), Now: t0, Default: night, Images: []ImageState{
			im("i", ImagePolicy{}, "n1", bm(), "n2", bm(2))}},
			[]string{"wait n2 until 01-06T22:00"}, []string{"closed"}},
		{"sync window open deadline", State{Nodes: threeZones(), Now: t0.Add(11 * time.Hour), Default: night, Images: []ImageState{
			im("i", ImagePolicy{}, "n1", bm(), "n2", bm(2))}},
			[]string{"sync n2 [2,3) until 01-07T06:00"}, nil},
		{"sync per-node window of destination", State{Nodes: threeZones(), Now: t0, PerNode: map[string]SyncPolicy{"n2": night}, Images: []ImageState{
			im("i", ImagePolicy{}, "n1", bm(), "n2", bm(2), "n3", bm(4))}},
			[]string{"sync n3 [4,5)", "wait n2 until 01-06T22:00"}, nil},
		{"image sync policy wins", State{Nodes: threeZones(), Now: t0, PerNode: map[string]SyncPolicy{"n2": night}, Images: []ImageState{
			func() ImageState {
				i := im("i", ImagePolicy{}, "n1", bm(), "n2", bm(2))
				i.Sync = &SyncPolicy{MaxRate: 10}
				return i
			}()}},
			[]string{"sync n2 [2,3) @10"}, []string{"image cap"}},
		{"caps shared by two images on one node", State{Nodes: threeZones(), Now: t0, PerNode: map[string]SyncPolicy{"n3": {MaxRate: 100 << 20}}, Images: []ImageState{
			im("a", ImagePolicy{}, "n1", bm(), "n3", bm(0)),
			im("b", ImagePolicy{}, "n2", bm(), "n3", bm(1))}},
			[]string{"sync n3 [0,1) @52428800", "sync n3 [1,2) @52428800"}, []string{"node n3 cap 100M/s shared by 2 syncs"}},
		{"replace dead after delay", State{Nodes: []NodeInfo{nd("n1", 1), dead(nd("n2", 1), t0.Add(-2*time.Hour)), nd("n3", 5)}, ReplaceAfter: time.Hour, Now: t0, Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2}, "n1", bm(), "n2", bm())}},
			[]string{"add_location n3", "wait n2"}, []string{"replaces n2"}},
		{"not yet replaced", State{Nodes: []NodeInfo{nd("n1", 1), dead(nd("n2", 1), t0.Add(-30*time.Minute)), nd("n3", 5)}, ReplaceAfter: time.Hour, Now: t0, Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2}, "n1", bm(), "n2", bm())}},
			[]string{"wait n2 until 01-06T12:30"}, []string{"unless it comes back"}},
		{"replace never when 0", State{Nodes: []NodeInfo{nd("n1", 1), dead(nd("n2", 1), t0.Add(-200*time.Hour)), nd("n3", 5)}, Now: t0, Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2}, "n1", bm(), "n2", bm())}},
			[]string{}, nil},
		{"replaced dead removed", State{Nodes: []NodeInfo{nd("n1", 1), dead(nd("n2", 1), t0.Add(-2*time.Hour)), nd("n3", 5)}, ReplaceAfter: time.Hour, Now: t0, Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2}, "n1", bm(), "n2", bm(), "n3", bm())}},
			[]string{"remove_location n2"}, []string{"replacement is in sync"}},
		{"relocate add", State{Nodes: threeZones(), Now: t0, Images: []ImageState{
			im("i", ImagePolicy{Relocate: &Relocation{To: "n3", From: "n1"}}, "n1", bm(), "n2", bm())}},
			[]string{"add_location n3"}, []string{"relocate n1 → n3: add n3"}},
		{"relocate syncing", State{Nodes: threeZones(), Now: t0, Images: []ImageState{
			im("i", ImagePolicy{Relocate: &Relocation{To: "n3", From: "n1"}}, "n1", bm(), "n2", bm(), "n3", bm(4, 5))}},
			[]string{"sync n3 [4,6)"}, nil},
		{"relocate remove", State{Nodes: threeZones(), Now: t0, Images: []ImageState{
			im("i", ImagePolicy{Relocate: &Relocation{To: "n3", From: "n1"}}, "n1", bm(), "n2", bm(), "n3", bm())}},
			[]string{"remove_location n1"}, []string{"n3 is in sync, remove n1"}},
		{"relocate only source", State{Nodes: threeZones(), Now: t0, Images: []ImageState{
			im("i", ImagePolicy{Relocate: &Relocation{To: "n3", From: "n1"}}, "n1", bm(), "n2", bm(7), "n3", bm())}},
			// n2 still syncs block 7: n1 stays until it has it
			[]string{"sync n2 [7,8)", "wait n1"}, []string{"", "removing n1 would leave block 7 with 1 in-sync copy (2 wanted)"}},
		{"relocate done", State{Nodes: threeZones(), Now: t0, Images: []ImageState{
			im("i", ImagePolicy{Relocate: &Relocation{To: "n3", From: "n1"}}, "n2", bm(), "n3", bm())}},
			[]string{}, nil},
		{"relocate without from", State{Nodes: threeZones(), Now: t0, Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2, Relocate: &Relocation{To: "n3"}}, "n1", bm(), "n2", bm(), "n3", bm())}},
			[]string{"remove_location n1"}, []string{"least free space"}},
		{"relocate target down", State{Nodes: []NodeInfo{nd("n1", 1), dead(nd("n3", 1), t0)}, Now: t0, Images: []ImageState{
			im("i", ImagePolicy{Relocate: &Relocation{To: "n3", From: "n1"}}, "n1", bm())}},
			[]string{"refuse n3"}, []string{"n3 is not alive"}},
		{"invalid policy refused", State{Nodes: threeZones(), Images: []ImageState{
			im("i", ImagePolicy{Replicas: 9}, "n1", bm())}},
			[]string{"refuse"}, []string{"9 copies wanted but only 4 nodes are known"}},
		{"invalid image sync refused", State{Nodes: threeZones(), Images: []ImageState{
			func() ImageState {
				i := im("i", ImagePolicy{}, "n1", bm(), "n2", bm(1))
				i.Sync = &SyncPolicy{TZ: "Nowhere/Else"}
				return i
			}()}},
			// copies stay; the sync that cannot run says why
			[]string{"refuse", "refuse n2"}, []string{"image sync policy", "sync to n2: invalid sync policy"}},
	} {
		t.Run(c.rule, func(t *testing.T) { checkPlan(t, c.state, c.want, c.reason) })
	}
}

// checkPlan plans s and checks the actions (in short form), the
// substrings of their reasons (in order), that every action has a reason
// and an image, and that planning again gives the same.
func checkPlan(t *testing.T, s State, want, reason []string) {
	t.Helper()
	got := Plan(s)
	if gs := shorts(got); !slices.Equal(gs, want) {
		t.Fatalf("got %q want %q\n%s", gs, want, reasons(got))
	}
	for i, r := range reason {
		if i < len(got) && !strings.Contains(got[i].Reason, r) {
			t.Errorf("action %d reason %q, want it to contain %q", i, got[i].Reason, r)
		}
	}
	for _, a := range got {
		if a.Reason == "" || a.Image == "" {
			t.Errorf("action without reason or image: %+v", a)
		}
	}
	if again := Plan(s); !slices.EqualFunc(got, again, func(a, b Action) bool { return a.Reason == b.Reason && short(a) == short(b) }) {
		t.Errorf("not deterministic")
	}
}

func reasons(as []Action) string {
	var b strings.Builder
	for _, a := range as {
		fmt.Fprintf(&b, "  %s: %s\n", short(a), a.Reason)
	}
	return b.String()
}

func TestPlanImage(t *testing.T) {
	s := State{Nodes: threeZones(), Now: t0, PerNode: map[string]SyncPolicy{"n3": {MaxRate: 100}}, Images: []ImageState{
		im("a", ImagePolicy{}, "n1", bm(), "n3", bm(0)),
		im("b", ImagePolicy{}, "n2", bm(), "n3", bm(1))}}
	got := PlanImage(s, "b")
	if gs := shorts(got); !slices.Equal(gs, []string{"sync n3 [1,2) @50"}) {
		t.Fatalf("%q", gs)
	}
	if PlanImage(s, "zzz") != nil {
		t.Fatal("unknown image")
	}
}

func TestValidatePolicy(t *testing.T) {
	nodes := threeZones()
	img := im("i", ImagePolicy{}, "n1", bm(), "n2", bm())
	for _, c := range []struct {
		p    ImagePolicy
		want string
	}{
		{ImagePolicy{Replicas: 2}, ""},
		{ImagePolicy{Replicas: 3, SpreadBy: "zone"}, ""},
		{ImagePolicy{Locations: []string{"n1", "n3"}, Replicas: 2}, ""},
		{ImagePolicy{Relocate: &Relocation{To: "n3", From: "n1"}}, ""},
		{ImagePolicy{Replicas: -1}, "replicas -1"},
		{ImagePolicy{Locations: []string{"n1", "n9"}}, "location n9 is not a known node"},
		{ImagePolicy{Locations: []string{"n1", "n1"}}, "listed twice"},
		{ImagePolicy{Replicas: 5}, "5 copies wanted but only 4 nodes"},
		{ImagePolicy{Replicas: 4, SpreadBy: "zone"}, "needs 4 distinct values but the known nodes have 3 (a, b, c)"},
		{ImagePolicy{Locations: []string{"n1", "n2"}, SpreadBy: "zone"}, "share zone a"},
		{ImagePolicy{Relocate: &Relocation{To: "n9"}}, "target n9 is not a known node"},
		{ImagePolicy{Relocate: &Relocation{To: "n1", From: "n1"}}, "also the source"},
		{ImagePolicy{Relocate: &Relocation{To: "n3", From: "n4"}}, "source n4 is not a location"},
		{ImagePolicy{Relocate: &Relocation{}}, "no target"},
		{ImagePolicy{Locations: []string{"n1", "n2"}, Replicas: 3}, "replicas 3 disagrees with the 2 locations"},
	} {
		err := ValidatePolicy(c.p, img, nodes)
		if c.want == "" {
			if err != nil {
				t.Errorf("%+v: %v", c.p, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: got %v, want %q", c.p, err, c.want)
		}
	}
}

// --- simulator ---

func cloneState(s State) State {
	c := s
	c.Images = nil
	for _, img := range s.Images {
		ni := img
		ni.Locations = slices.Clone(img.Locations)
		ni.Maps = map[string]*BlockMap{}
		for k, m := range img.Maps {
			ni.Maps[k] = m.Clone()
		}
		if img.Policy.Relocate != nil {
			r := *img.Policy.Relocate
			ni.Policy.Relocate = &r
		}
		c.Images = append(c.Images, ni)
	}
	return c
}

func aliveIn(s State, n string) bool {
	for _, x := range s.Nodes {
		if x.Name == n {
			return x.Alive
		}
	}
	return false
}

// apply executes actions like an executor that finishes every sync in one
// step: a sync copies only blocks some other alive location has in sync.
func apply(t *testing.T, s *State, actions []Action) {
	t.Helper()
	for _, a := range actions {
		var img *ImageState
		for i := range s.Images {
			if s.Images[i].Name == a.Image {
				img = &s.Images[i]
			}
		}
		switch a.Kind {
		case AddLocation:
			if slices.Contains(img.Locations, a.Node) {
				t.Fatalf("add of existing location %s", a.Node)
			}
			img.Locations = append(img.Locations, a.Node)
			img.Maps[a.Node] = NewBlockMap(numBlocks(*img), OutOfSync)
		case Sync:
			m := img.Maps[a.Node]
			for b := a.From; b < a.To; b++ {
				for _, l := range img.Locations {
					if l != a.Node && aliveIn(*s, l) && img.Maps[l].Get(b) == InSync {
						m.Set(b, InSync)
					}
				}
			}
		case SetReplicas:
			if img.Policy.Replicas != 0 {
				t.Fatalf("set_replicas on an image with replicas %d", img.Policy.Replicas)
			}
			img.Policy.Replicas = a.Count
		case RemoveLocation:
			i := slices.Index(img.Locations, a.Node)
			if i < 0 {
				t.Fatalf("remove of unknown location %s", a.Node)
			}
			img.Locations = slices.Delete(img.Locations, i, i+1)
			delete(img.Maps, a.Node)
		}
	}
	for i := range s.Images {
		if RelocationDone(s.Images[i]) {
			s.Images[i].Policy.Relocate = nil
		}
	}
}

// checkInvariant is rule safe-remove seen from outside: no block that had
// an in-sync copy (alive, or any) loses its last one, no image loses its
// last location.
func checkInvariant(t *testing.T, before, after State) {
	t.Helper()
	for i, b := range before.Images {
		a := after.Images[i]
		if len(b.Locations) > 0 && len(a.Locations) == 0 {
			t.Fatalf("%s: last location removed", a.Name)
		}
		n := numBlocks(b)
		for blk := int64(0); blk < n; blk++ {
			had, hadAlive, has, hasAlive := false, false, false, false
			for _, l := range b.Locations {
				if b.Maps[l].Get(blk) == InSync {
					had = true
					hadAlive = hadAlive || aliveIn(before, l)
				}
			}
			for _, l := range a.Locations {
				if a.Maps[l].Get(blk) == InSync {
					has = true
					hasAlive = hasAlive || aliveIn(after, l)
				}
			}
			if had && !has || hadAlive && !hasAlive {
				t.Fatalf("%s: block %d lost its last in-sync copy (before %v, after %v)", a.Name, blk, b.Locations, a.Locations)
			}
		}
	}
}

// run plans and applies until nothing but waits remain; Now jumps to the
// earliest Until of a wait when only waits are left.
func run(t *testing.T, s State, maxSteps int) (State, []Action, int) {
	t.Helper()
	for step := 0; step < maxSteps; step++ {
		acts := Plan(s)
		busy := false
		var next time.Time
		for _, a := range acts {
			switch a.Kind {
			case AddLocation, Sync, RemoveLocation, SetReplicas:
				busy = true
			case Wait:
				if !a.Until.IsZero() && (next.IsZero() || a.Until.Before(next)) {
					next = a.Until
				}
			}
		}
		if !busy && next.IsZero() {
			return s, acts, step
		}
		before := cloneState(s)
		apply(t, &s, acts)
		checkInvariant(t, before, s)
		if !busy {
			s.Now = next
		} else {
			s.Now = s.Now.Add(time.Minute)
		}
	}
	t.Fatalf("no convergence in %d steps; last plan:\n%s", maxSteps, reasons(Plan(s)))
	return s, nil, 0
}

func TestRelocationStepByStep(t *testing.T) {
	s := State{Nodes: threeZones(), Now: t0, Default: SyncPolicy{Windows: []Window{{22 * 60, 6 * 60}}},
		Images: []ImageState{im("i", ImagePolicy{Relocate: &Relocation{To: "n3", From: "n1"}}, "n1", bm(), "n2", bm())}}
	var trace []string
	for step := 0; step < 10; step++ {
		acts := Plan(s)
		if len(acts) == 0 {
			break
		}
		trace = append(trace, strings.Join(shorts(acts), "; "))
		before := cloneState(s)
		apply(t, &s, acts)
		checkInvariant(t, before, s)
		for _, a := range acts {
			if a.Kind == Wait && !a.Until.IsZero() {
				s.Now = a.Until
			}
		}
	}
	want := []string{
		"add_location n3",
		"wait n3 until 01-06T22:00",
		"sync n3 [0,20) until 01-07T06:00",
		"remove_location n1",
	}
	if !slices.Equal(trace, want) {
		t.Fatalf("trace %q\nwant %q", trace, want)
	}
	img := s.Images[0]
	if !slices.Equal(img.Locations, []string{"n2", "n3"}) || img.Policy.Relocate != nil {
		t.Fatalf("end state %v relocate %v", img.Locations, img.Policy.Relocate)
	}
}

func TestConvergeReplaceDead(t *testing.T) {
	s := State{Nodes: []NodeInfo{nd("n1", 1), dead(nd("n2", 1), t0.Add(-2*time.Hour)), nd("n3", 5)}, ReplaceAfter: time.Hour, Now: t0,
		Images: []ImageState{im("i", ImagePolicy{Replicas: 2}, "n1", bm(), "n2", bm())}}
	end, _, _ := run(t, s, 10)
	if got := end.Images[0].Locations; !slices.Equal(got, []string{"n1", "n3"}) {
		t.Fatalf("locations %v", got)
	}
}

// TestPlanProperty runs random states and policies through the simulator:
// the invariant holds after every step, and every valid policy whose
// blocks all have an alive in-sync copy converges to it.
func TestPlanProperty(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	zones := []string{"a", "b", "c"}
	checked := 0
	defer func() {
		t.Logf("%d of 300 random cases had a valid, satisfiable policy and were checked for convergence", checked)
		if checked < 50 {
			t.Errorf("only %d cases checked for convergence", checked)
		}
	}()
	for iter := 0; iter < 300; iter++ {
		var nodes []NodeInfo
		nn := 3 + rng.IntN(4)
		for i := range nn {
			n := nd(fmt.Sprintf("n%d", i+1), int64(rng.IntN(1000)), "zone", zones[rng.IntN(len(zones))])
			if rng.IntN(5) == 0 {
				n.Labels["ssd"] = "yes"
			}
			if rng.IntN(8) == 0 {
				delete(n.Labels, "zone") // rules on a label some nodes lack
			}
			if i > 0 && rng.IntN(6) == 0 {
				n = dead(n, t0.Add(-time.Duration(rng.IntN(5))*time.Hour))
			}
			nodes = append(nodes, n)
		}
		// 1-3 locations with random maps; every block in sync somewhere alive.
		perm := rng.Perm(nn)
		nl := 1 + rng.IntN(3)
		img := im("img", ImagePolicy{})
		for _, p := range perm[:nl] {
			m := NewBlockMap(nb, InSync)
			for b := int64(0); b < nb; b++ {
				m.Set(b, SyncState(rng.IntN(3)))
			}
			img.Locations = append(img.Locations, nodes[p].Name)
			img.Maps[nodes[p].Name] = m
		}
		var holder string
		for _, l := range img.Locations {
			if aliveIn(State{Nodes: nodes}, l) {
				holder = l
				break
			}
		}
		if holder == "" {
			continue
		}
		lose := rng.IntN(8) == 0 // sometimes a block has no alive in-sync copy
		for b := int64(0); b < nb; b++ {
			if !lose || rng.IntN(4) != 0 {
				img.Maps[holder].Set(b, InSync)
			}
		}
		full := true
		for b := int64(0); b < nb; b++ {
			ok := false
			for _, l := range img.Locations {
				ok = ok || aliveIn(State{Nodes: nodes}, l) && img.Maps[l].Get(b) == InSync
			}
			full = full && ok
		}
		switch rng.IntN(4) {
		case 0:
			img.Policy.Replicas = 1 + rng.IntN(nn)
		case 1:
			img.Policy.Replicas = 1 + rng.IntN(3)
			img.Policy.SpreadBy = "zone"
		case 2:
			for _, p := range rng.Perm(nn)[:1+rng.IntN(3)] {
				img.Policy.Locations = append(img.Policy.Locations, nodes[p].Name)
			}
		case 3:
			to := nodes[rng.IntN(nn)].Name
			img.Policy.Relocate = &Relocation{To: to}
			if rng.IntN(2) == 0 {
				img.Policy.Relocate.From = img.Locations[0]
			}
			if rng.IntN(2) == 0 {
				img.Policy.Replicas = len(img.Locations)
			}
		}
		img.Policy.PreferLabels = map[string]string{}
		if rng.IntN(2) == 0 {
			img.Policy.PreferLabels["ssd"] = "yes"
		}
		// Operations: a node drained, one cordoned, locality to an owner.
		var drained string
		if rng.IntN(3) == 0 {
			i := rng.IntN(nn)
			nodes[i].Cordoned, nodes[i].Draining, nodes[i].DrainNow = true, true, rng.IntN(2) == 0
			drained = nodes[i].Name
		}
		if rng.IntN(4) == 0 {
			nodes[rng.IntN(nn)].Cordoned = true
		}
		var owner string
		if rng.IntN(3) == 0 {
			owner = nodes[rng.IntN(nn)].Name
			img.Owner, img.OwnerSince = owner, t0.Add(-time.Hour)
			img.Policy.Locality = LocalityBestEffort
		}
		s := State{Nodes: nodes, Images: []ImageState{img}, Now: t0, ReplaceAfter: time.Duration(rng.IntN(3)) * time.Hour, LocalityDelay: 10 * time.Minute}
		if rng.IntN(2) == 0 {
			s.Default = SyncPolicy{Windows: []Window{{22 * 60, 6 * 60}}, MaxRate: 1 << 20}
		}
		name := fmt.Sprintf("iter%d", iter)

		t.Run(name, func(t *testing.T) {
			end, last, _ := run(t, cloneState(s), 40)
			valid := ValidatePolicy(img.Policy, img, nodes) == nil
			refused := slices.ContainsFunc(last, func(a Action) bool { return a.Kind == Refuse })
			// a listed node that is down cannot receive its copy
			deadListed := slices.ContainsFunc(img.Policy.Locations, func(l string) bool { return !aliveIn(s, l) })
			if !valid || refused || !full || deadListed {
				return
			}
			checked++
			e := end.Images[0]
			pol := e.Policy
			for _, l := range e.Locations {
				if aliveIn(end, l) && e.Maps[l].Count(InSync) != nb {
					t.Fatalf("converged with %s not in sync: %s", l, reasons(last))
				}
			}
			switch {
			case len(pol.Locations) > 0:
				if !sameSet(e.Locations, pol.Locations) {
					t.Fatalf("locations %v want %v\n%s", e.Locations, pol.Locations, reasons(last))
				}
			case pol.Relocate != nil && !RelocationDone(e):
				t.Fatalf("relocation not done: %v %+v\n%s", e.Locations, pol.Relocate, reasons(last))
			case pol.Replicas > 0:
				// A copy on a live node leaves (drained, misplaced) only once
				// as many copies are live and in sync without it: while a
				// kept copy is on a dead node (not yet replaced), it stays.
				deadKept := slices.ContainsFunc(e.Locations, func(l string) bool { return !aliveIn(end, l) })
				if len(e.Locations) != pol.Replicas && !(deadKept && len(e.Locations) > pol.Replicas) {
					t.Fatalf("%d locations %v want %d\n%s", len(e.Locations), e.Locations, pol.Replicas, reasons(last))
				}
			}
			if drained != "" && len(pol.Locations) == 0 && pol.Relocate == nil && slices.Contains(e.Locations, drained) {
				t.Fatalf("drained %s still holds a copy: %v\n%s", drained, e.Locations, reasons(last))
			}
			if owner != "" && len(pol.Locations) == 0 && pol.Relocate == nil && aliveIn(end, owner) && owner != drained &&
				!slices.ContainsFunc(end.Nodes, func(n NodeInfo) bool { return n.Name == owner && n.Cordoned }) &&
				!slices.ContainsFunc(last, func(a Action) bool { return a.Kind == Wait && a.Node == owner }) &&
				!slices.Contains(e.Locations, owner) {
				t.Fatalf("owner %s has no copy under locality: %v\n%s", owner, e.Locations, reasons(last))
			}
		})
	}
}

func sameSet(a, b []string) bool {
	x, y := slices.Clone(a), slices.Clone(b)
	slices.Sort(x)
	slices.Sort(y)
	return slices.Equal(x, y)
}

// TestSyncPaused: an operator's pause holds a copy's sync, window or not;
// adding copies still happens, and resuming syncs again.
func TestSyncPaused(t *testing.T) {
	paused := im("i", ImagePolicy{Replicas: 3}, "n1", bm(), "n2", bm(4, 5))
	paused.SyncPaused = true
	checkPlan(t, State{Nodes: threeZones(), Images: []ImageState{paused}},
		[]string{"add_location n3", "wait n2"}, []string{"", "sync paused by the operator (ukai image sync i --resume)"})
	paused.SyncPaused = false
	checkPlan(t, State{Nodes: threeZones(), Images: []ImageState{paused}},
		[]string{"add_location n3", "sync n2 [4,6)"}, nil)
}
