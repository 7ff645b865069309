package placement

import (
	"slices"
	"testing"
	"time"
)

func cordoned(n NodeInfo) NodeInfo { n.Cordoned = true; return n }
func draining(n NodeInfo) NodeInfo { n.Cordoned, n.Draining = true, true; return n }

func owned(img ImageState, owner string, since time.Time) ImageState {
	img.Owner, img.OwnerSince = owner, since
	return img
}

func withGroup(pol ImagePolicy, g string) ImagePolicy { pol.Group = g; return pol }

// TestPlanOperate is the table of rules cordon, drain, leave (dead nodes
// without a replica count), misplaced (spread and anti-affinity repair),
// groups and locality.
func TestPlanOperate(t *testing.T) {
	zones := threeZones() // n1 a 100, n2 a 300, n3 b 200, n4 c 50
	night := SyncPolicy{Windows: []Window{{22 * 60, 6 * 60}}, MaxRate: 1000}
	anti := map[string]GroupRule{"db": {Kind: AntiAffinity, Label: "zone"}}
	aff := map[string]GroupRule{"web": {Kind: Affinity, Label: "zone"}}
	for _, c := range []struct {
		rule   string
		state  State
		want   []string
		reason []string
	}{
		{"cordoned not chosen", State{Nodes: []NodeInfo{zones[0], cordoned(zones[1]), zones[2], zones[3]}, Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2}, "n1", bm())}},
			[]string{"add_location n3"}, []string{"add n3 (most free space)"}},
		{"drain adds a replacement", State{Nodes: []NodeInfo{draining(zones[0]), zones[1], zones[2], zones[3]}, Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2}, "n1", bm(), "n2", bm())}},
			[]string{"add_location n3", "wait n1"}, []string{"replaces n1: n1 is draining", "n1 is draining: remove it once a replacement is in sync on a live node"}},
		{"drain waits for the replacement's sync", State{Nodes: []NodeInfo{draining(zones[0]), zones[1], zones[2], zones[3]}, Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2}, "n1", bm(), "n2", bm(), "n3", bm(4))}},
			[]string{"sync n3 [4,5)", "wait n1"}, []string{"", "remove it once n3 is in sync on a live node"}},
		{"drain removes once in sync", State{Nodes: []NodeInfo{draining(zones[0]), zones[1], zones[2], zones[3]}, Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2}, "n1", bm(), "n2", bm(), "n3", bm())}},
			[]string{"remove_location n1"}, []string{"n1 is draining and its replacement is in sync"}},
		{"drain of the only copy keeps it until the new one has every block", State{Nodes: []NodeInfo{draining(zones[0]), zones[1]}, Images: []ImageState{
			im("i", ImagePolicy{Replicas: 1}, "n1", bm(), "n2", bm(3))}},
			[]string{"sync n2 [3,4)", "wait n1"}, []string{"", "remove it once n2 is in sync on a live node"}},
		{"drain: a replacement on a dead node does not let the drained copy go", State{Nodes: []NodeInfo{draining(zones[0]), zones[1], dead(zones[2], t0)}, Now: t0, Images: []ImageState{
			// n3 was added for n1 and died before it was filled: n1 stays
			// until two copies are live and in sync.
			im("i", ImagePolicy{Replicas: 2}, "n1", bm(), "n2", bm(), "n3", allOOS())}},
			[]string{"wait n1", "refuse"}, []string{"n1 is draining: remove it once a replacement is in sync on a live node", "cannot place 1 more"}},
		{"drain without replicas pins the count", State{Nodes: []NodeInfo{draining(zones[0]), zones[1], zones[2]}, Images: []ImageState{
			im("i", ImagePolicy{}, "n1", bm(), "n2", bm())}},
			[]string{"set_replicas"}, []string{"keep the 2 copies the image has while copies move (n1 is draining)"}},
		{"drain with no eligible node", State{Nodes: []NodeInfo{draining(zones[0]), zones[1], cordoned(zones[2])}, Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2}, "n1", bm(), "n2", bm())}},
			[]string{"wait n1", "refuse"}, []string{"", "cannot place 1 more: no alive node outside the current locations (1 cordoned or draining node not counted)"}},
		{"drain now ignores the window and the caps", State{Nodes: []NodeInfo{func() NodeInfo { n := draining(zones[0]); n.DrainNow = true; return n }(), zones[1], zones[2]}, Now: t0, Default: night, Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2}, "n1", bm(), "n2", bm(), "n3", allOOS())}},
			[]string{"sync n3 [0,20)", "wait n1"}, []string{"drain --now of n1: no window", ""}},
		{"drain waits for the window", State{Nodes: []NodeInfo{draining(zones[0]), zones[1], zones[2]}, Now: t0, Default: night, Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2}, "n1", bm(), "n2", bm(), "n3", allOOS())}},
			[]string{"wait n1", "wait n3 until 01-06T22:00"}, nil},
		{"drain of exact locations refused", State{Nodes: []NodeInfo{draining(zones[0]), zones[1], zones[2]}, Images: []ImageState{
			im("i", ImagePolicy{Locations: []string{"n1", "n2"}}, "n1", bm(), "n2", bm())}},
			[]string{"refuse n1"}, []string{"n1 is draining but the image's locations name it"}},
		{"exact add to a cordoned node refused", State{Nodes: []NodeInfo{zones[0], cordoned(zones[1])}, Images: []ImageState{
			im("i", ImagePolicy{Locations: []string{"n1", "n2"}}, "n1", bm())}},
			[]string{"refuse n2"}, []string{"n2 is cordoned"}},
		{"relocate to a cordoned node refused", State{Nodes: []NodeInfo{zones[0], zones[1], cordoned(zones[2])}, Images: []ImageState{
			im("i", ImagePolicy{Relocate: &Relocation{To: "n3", From: "n1"}}, "n1", bm())}},
			[]string{"refuse n3"}, []string{"n3 is cordoned"}},
		{"dead without replicas pins the count", State{Nodes: []NodeInfo{nd("n1", 1), dead(nd("n2", 1), t0.Add(-2*time.Hour)), nd("n3", 5)}, ReplaceAfter: time.Hour, Now: t0, Images: []ImageState{
			im("i", ImagePolicy{}, "n1", bm(), "n2", bm())}},
			[]string{"set_replicas"}, []string{"keep the 2 copies"}},
		{"dead without replicas waits like the others", State{Nodes: []NodeInfo{nd("n1", 1), dead(nd("n2", 1), t0.Add(-30*time.Minute)), nd("n3", 5)}, ReplaceAfter: time.Hour, Now: t0, Images: []ImageState{
			im("i", ImagePolicy{}, "n1", bm(), "n2", bm())}},
			[]string{"wait n2 until 01-06T12:30"}, []string{"unless it comes back"}},
		{"spread violation repaired by adding", State{Nodes: zones, Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2, SpreadBy: "zone"}, "n1", bm(), "n2", bm())}},
			[]string{"add_location n3", "wait n2"}, []string{"replaces n2: n2 shares zone a with n1 (spread by zone)", "remove it once a replacement is in sync"}},
		{"spread violation: the copy most in sync stays", State{Nodes: zones, Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2, SpreadBy: "zone"}, "n1", bm(2), "n2", bm())}},
			[]string{"add_location n3", "sync n1 [2,3)", "wait n1"}, []string{"replaces n1: n1 shares zone a with n2"}},
		{"spread violation without a free value stays", State{Nodes: zones[:3], Images: []ImageState{
			im("i", ImagePolicy{Replicas: 2, SpreadBy: "zone"}, "n1", bm(), "n2", bm(), "n3", bm())}},
			[]string{"remove_location n2"}, []string{"n2 shares zone a with n1"}},
		{"spread violation, no node to move to", State{Nodes: []NodeInfo{zones[0], zones[1], cordoned(zones[2])}, Images: []ImageState{
			im("i", ImagePolicy{Replicas: 1, SpreadBy: "zone"}, "n1", bm())}},
			[]string{}, nil},
		{"anti-affinity moves the later image", State{Nodes: zones, Groups: anti, GroupImages: map[string][]GroupImage{"db": {{Name: "vm1", Locations: []string{"n1"}, Copies: 1}, {Name: "vm2", Locations: []string{"n2"}, Copies: 1}}}, Images: []ImageState{
			im("vm1", withGroup(ImagePolicy{Replicas: 1}, "db"), "n1", bm()),
			im("vm2", withGroup(ImagePolicy{Replicas: 1}, "db"), "n2", bm())}},
			[]string{"add_location n3", "wait n2"}, []string{"group db anti-affinity: zone b unused", "zone a also holds vm1's copy on n1 (group db anti-affinity by zone)"}},
		{"anti-affinity new copies avoid the group's values", State{Nodes: zones, Groups: anti, GroupImages: map[string][]GroupImage{"db": {{Name: "vm1", Locations: []string{"n3"}, Copies: 1}}}, Images: []ImageState{
			im("vm2", withGroup(ImagePolicy{Replicas: 2}, "db"), "n1", bm())}},
			[]string{"add_location n4"}, []string{"zone c unused"}},
		{"anti-affinity that cannot be met", State{Nodes: zones, Groups: anti, GroupImages: map[string][]GroupImage{"db": {{Name: "vm1", Locations: []string{"n3", "n4"}, Copies: 2}}}, Images: []ImageState{
			im("vm2", withGroup(ImagePolicy{Replicas: 2}, "db"), "n1", bm())}},
			[]string{"refuse"}, []string{"anti-affinity by zone needs 4 distinct zone values for the 4 copies of its 2 images, the known nodes have 3 (a, b, c)"}},
		{"group without a rule", State{Nodes: zones, Images: []ImageState{
			im("vm2", withGroup(ImagePolicy{Replicas: 2}, "nosuch"), "n1", bm())}},
			[]string{"refuse"}, []string{"group nosuch has no rule"}},
		{"affinity prefers the group's zone over free space", State{Nodes: zones, Groups: aff, GroupImages: map[string][]GroupImage{"web": {{Name: "w1", Locations: []string{"n4"}, Copies: 1}}}, Images: []ImageState{
			im("w2", withGroup(ImagePolicy{Replicas: 2}, "web"), "n1", bm())}},
			[]string{"add_location n4"}, []string{"group web affinity: zone c holds 1 of its copies"}},
		{"affinity: the copy away from the group goes first", State{Nodes: zones, Groups: aff, GroupImages: map[string][]GroupImage{"web": {{Name: "w1", Locations: []string{"n3"}, Copies: 1}}}, Images: []ImageState{
			im("w2", withGroup(ImagePolicy{Replicas: 1}, "web"), "n3", bm(), "n4", bm())}},
			[]string{"remove_location n4"}, nil},
		{"locality adds a copy on the owner", State{Nodes: zones, Now: t0, LocalityDelay: 10 * time.Minute, Images: []ImageState{
			owned(im("i", ImagePolicy{Replicas: 2, Locality: LocalityBestEffort}, "n1", bm(), "n2", bm()), "n3", t0.Add(-time.Hour))}},
			[]string{"add_location n3"}, []string{"locality best-effort: n3 owns the image without a copy since"}},
		{"locality waits for the delay", State{Nodes: zones, Now: t0, LocalityDelay: 10 * time.Minute, Images: []ImageState{
			owned(im("i", ImagePolicy{Replicas: 2, Locality: LocalityBestEffort}, "n1", bm(), "n2", bm()), "n3", t0.Add(-time.Minute))}},
			[]string{"wait n3 until 01-06T12:09"}, []string{"a copy is added there at"}},
		{"locality from the default", State{Nodes: zones, Now: t0, Locality: LocalityBestEffort, Images: []ImageState{
			owned(im("i", ImagePolicy{Replicas: 1}, "n1", bm()), "n3", t0)}},
			[]string{"add_location n3"}, nil},
		{"locality off in the image wins", State{Nodes: zones, Now: t0, Locality: LocalityBestEffort, Images: []ImageState{
			owned(im("i", ImagePolicy{Replicas: 1, Locality: LocalityOff}, "n1", bm()), "n3", t0)}},
			[]string{}, nil},
		{"locality keeps the owner's copy", State{Nodes: zones, Now: t0, Images: []ImageState{
			owned(im("i", ImagePolicy{Replicas: 2, Locality: LocalityBestEffort}, "n1", bm(), "n2", bm(), "n4", bm()), "n4", t0.Add(-time.Hour))}},
			[]string{"remove_location n1"}, nil},
		{"locality waits for the owner's sync", State{Nodes: zones, Now: t0, Images: []ImageState{
			owned(im("i", ImagePolicy{Replicas: 2, Locality: LocalityBestEffort}, "n1", bm(), "n2", bm(), "n4", allOOS()), "n4", t0.Add(-time.Hour))}},
			[]string{"sync n4 [0,20)", "wait"}, []string{"", "would leave block 0 with 1 in-sync copy"}},
		{"locality without replicas pins the count", State{Nodes: zones, Now: t0, Images: []ImageState{
			owned(im("i", ImagePolicy{Locality: LocalityBestEffort}, "n1", bm()), "n3", t0.Add(-time.Hour))}},
			[]string{"set_replicas"}, []string{"locality adds a copy on the owner n3"}},
		{"locality: a cordoned owner gets no copy", State{Nodes: []NodeInfo{zones[0], zones[1], cordoned(zones[2])}, Now: t0, Images: []ImageState{
			owned(im("i", ImagePolicy{Replicas: 1, Locality: LocalityBestEffort}, "n1", bm()), "n3", t0.Add(-time.Hour))}},
			[]string{"wait n3"}, []string{"the owner n3 has no copy, but n3 is cordoned"}},
		{"locality: an owner without the spread label gets no copy", State{Nodes: append(slices.Clone(zones), nd("n5", 900)), Now: t0, Images: []ImageState{
			owned(im("i", ImagePolicy{Replicas: 2, SpreadBy: "zone", Locality: LocalityBestEffort}, "n1", bm(), "n3", bm()), "n5", t0.Add(-time.Hour))}},
			[]string{"wait n5"}, []string{"the owner n5 has no zone label (spread by zone)"}},
		{"a group without a rule still syncs", State{Nodes: zones, Images: []ImageState{
			im("vm", withGroup(ImagePolicy{Replicas: 2}, "nosuch"), "n1", bm(), "n2", bm(3))}},
			[]string{"sync n2 [3,4)", "refuse"}, []string{"", "group nosuch has no rule"}},
		{"locality: replicas-up picks the owner first", State{Nodes: zones, Now: t0, Images: []ImageState{
			owned(im("i", ImagePolicy{Replicas: 2, Locality: LocalityStrict}, "n1", bm()), "n4", t0)}},
			[]string{"add_location n4"}, []string{"owner, locality strict"}},
	} {
		t.Run(c.rule, func(t *testing.T) { checkPlan(t, c.state, c.want, c.reason) })
	}
}

// TestConvergeGroups runs images of a group to convergence, the group's
// view refreshed from the images at every step: anti-affinity spreads
// every copy of the group over distinct values whichever images started
// together, affinity gathers new copies on the group's value.
func TestConvergeGroups(t *testing.T) {
	nodes := []NodeInfo{nd("h1", 100, "host", "h1", "rack", "r1"), nd("h2", 100, "host", "h2", "rack", "r1"),
		nd("h3", 100, "host", "h3", "rack", "r2"), nd("h4", 100, "host", "h4", "rack", "r2"),
		nd("h5", 100, "host", "h5", "rack", "r3"), nd("h6", 900, "host", "h6", "rack", "r3")}
	for _, c := range []struct {
		name  string
		rule  GroupRule
		imgs  []ImageState
		check func(t *testing.T, s State)
	}{
		{"anti-affinity", GroupRule{Kind: AntiAffinity, Label: "host"}, []ImageState{
			im("db1", withGroup(ImagePolicy{Replicas: 2}, "g"), "h1", bm(), "h2", bm()),
			im("db2", withGroup(ImagePolicy{Replicas: 2}, "g"), "h1", bm(), "h3", bm()),
			im("db3", withGroup(ImagePolicy{Replicas: 1}, "g"), "h2", bm()),
		}, func(t *testing.T, s State) {
			seen := map[string]string{}
			for _, img := range s.Images {
				if len(img.Locations) != img.Policy.Replicas {
					t.Errorf("%s: %v, want %d copies", img.Name, img.Locations, img.Policy.Replicas)
				}
				for _, l := range img.Locations {
					if o, dup := seen[l]; dup {
						t.Errorf("host %s holds copies of %s and %s", l, o, img.Name)
					}
					seen[l] = img.Name
				}
			}
		}},
		{"affinity", GroupRule{Kind: Affinity, Label: "rack"}, []ImageState{
			im("w1", withGroup(ImagePolicy{Replicas: 2}, "g"), "h3", bm(), "h4", bm()),
			im("w2", withGroup(ImagePolicy{Replicas: 2}, "g"), "h3", bm()),
		}, func(t *testing.T, s State) {
			w2 := s.Images[1]
			if !sameSet(w2.Locations, []string{"h3", "h4"}) {
				t.Errorf("w2 at %v, want the group's rack r2 (h3, h4) although h6 has the most free space", w2.Locations)
			}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := State{Nodes: nodes, Now: t0, Groups: map[string]GroupRule{"g": c.rule}, Images: c.imgs}
			for step := 0; ; step++ {
				if step == 30 {
					t.Fatalf("no convergence; last plan:\n%s", reasons(Plan(s)))
				}
				s.GroupImages = map[string][]GroupImage{}
				for _, img := range s.Images {
					s.GroupImages["g"] = append(s.GroupImages["g"], GroupImage{Name: img.Name, Locations: slices.Clone(img.Locations), Copies: Copies(img)})
				}
				acts := Plan(s)
				if !slices.ContainsFunc(acts, func(a Action) bool { return a.Kind != Wait }) {
					break
				}
				before := cloneState(s)
				apply(t, &s, acts)
				checkInvariant(t, before, s)
			}
			c.check(t, s)
		})
	}
}
