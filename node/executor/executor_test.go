package executor

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/time/rate"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/cluster/meta/kvtest"
	"github.com/ukai-storage/ukai/placement"
)

func TestShouldAct(t *testing.T) {
	alive := func(n string) bool { return n != "dead" }
	tests := []struct {
		name  string
		img   meta.Image
		owned bool
		want  bool
	}{
		{"owned here", meta.Image{Owner: "n2", Locations: []string{"n2"}}, true, true},
		{"owned by a live node", meta.Image{Owner: "n2", Locations: []string{"n1", "n2"}}, false, false},
		{"unowned, first location", meta.Image{Locations: []string{"n1", "n2"}}, false, true},
		{"unowned, second location", meta.Image{Locations: []string{"n2", "n1"}}, false, false},
		{"unowned, first live location", meta.Image{Locations: []string{"dead", "n1"}}, false, true},
		{"owner dead, first live location", meta.Image{Owner: "dead", Locations: []string{"dead", "n1"}}, false, true},
		{"not a location", meta.Image{Locations: []string{"n2"}}, false, false},
		{"no live location", meta.Image{Locations: []string{"dead"}}, false, false},
	}
	for _, tc := range tests {
		if got := ShouldAct(tc.img, tc.owned, "n1", alive); got != tc.want {
			t.Errorf("%s: ShouldAct = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestSettled(t *testing.T) {
	inSync := placement.NewBlockMap(4, placement.InSync)
	behind := placement.NewBlockMap(4, placement.InSync)
	behind.Set(2, placement.OutOfSync)
	nodes := []placement.NodeInfo{{Name: "n1", Alive: true}, {Name: "n2", Alive: true}, {Name: "n3"}}
	state := func(p placement.ImagePolicy, maps map[string]*placement.BlockMap, locs ...string) placement.State {
		return placement.State{Nodes: nodes, Images: []placement.ImageState{{Name: "vm", Locations: locs, Policy: p, Maps: maps}}}
	}
	both := map[string]*placement.BlockMap{"n1": inSync, "n2": inSync}
	tests := []struct {
		name    string
		st      placement.State
		actions []placement.Action
		want    bool
	}{
		{"all in sync, no action", state(placement.ImagePolicy{}, both, "n1", "n2"), nil, true},
		{"waits only", state(placement.ImagePolicy{}, both, "n1", "n2"), []placement.Action{{Kind: placement.Wait}, {Kind: placement.Refuse}}, true},
		{"an action", state(placement.ImagePolicy{}, both, "n1", "n2"), []placement.Action{{Kind: placement.Sync}}, false},
		{"a copy behind", state(placement.ImagePolicy{}, map[string]*placement.BlockMap{"n1": inSync, "n2": behind}, "n1", "n2"), nil, false},
		{"a dead location", state(placement.ImagePolicy{}, map[string]*placement.BlockMap{"n1": inSync, "n3": inSync}, "n1", "n3"), nil, false},
		{"a map missing", state(placement.ImagePolicy{}, map[string]*placement.BlockMap{"n1": inSync}, "n1", "n2"), nil, false},
		{"a relocation", state(placement.ImagePolicy{Relocate: &placement.Relocation{To: "n2"}}, both, "n1", "n2"), nil, false},
	}
	for _, tc := range tests {
		if got := Settled(tc.st, tc.actions); got != tc.want {
			t.Errorf("%s: Settled = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// TestPacerTakesFromEveryCap: a copy under an image cap and a node cap
// takes its bytes from both. The pacer counted the bytes down once for
// all its caps, so only the first cap ever applied.
func TestPacerTakesFromEveryCap(t *testing.T) {
	at := time.Now()
	a := rate.NewLimiter(1<<20, 1<<20)
	b := rate.NewLimiter(1<<20, 1<<20)
	if err := (Pacer{a, nil, b}).Wait(context.Background(), 64<<10); err != nil {
		t.Fatal(err)
	}
	for i, l := range []*rate.Limiter{a, b} {
		// Less than a millisecond of refill may have passed.
		if got := l.TokensAt(at); got > (1<<20)-(64<<10)+2048 {
			t.Errorf("cap %d: %.0f tokens left after 64 KiB, want about %d", i, got, (1<<20)-(64<<10))
		}
	}
}

// image is a served image as the test controls it.
type image struct {
	rec   meta.Image
	owned bool
	busy  atomic.Bool
	ver   atomic.Uint64
}

func (i *image) Record() meta.Image { return i.rec }
func (i *image) Owned() bool        { return i.owned }
func (i *image) Busy() bool         { return i.busy.Load() }
func (i *image) Maps() map[string]*placement.BlockMap {
	return map[string]*placement.BlockMap{}
}
func (i *image) MapVersion() uint64 { return i.ver.Load() }

// host records what the executor asks of it.
type host struct {
	mu     sync.Mutex
	images []Image
	nodes  []placement.NodeInfo
	plans  int // State calls (Nodes is read once per State)
	syncs  []string
	adds   []string
}

func (h *host) Images() []Image { h.mu.Lock(); defer h.mu.Unlock(); return h.images }
func (h *host) Alive(node string) bool {
	for _, n := range h.nodes {
		if n.Name == node {
			return n.Alive
		}
	}
	return false
}
func (h *host) Nodes() []placement.NodeInfo {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.plans++
	return h.nodes
}
func (h *host) AddLocation(_ context.Context, _ string, node string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.adds = append(h.adds, node)
	return nil
}
func (h *host) RemoveLocation(context.Context, string, string) error { return nil }
func (h *host) Sync(_ context.Context, img Image, from, to int64, node string, _ Pacer) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.syncs = append(h.syncs, node)
	return nil
}
func (h *host) counts() (int, int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.plans, len(h.syncs)
}

func testCatalog(t *testing.T) *meta.Catalog { return kvtest.BoltCatalog(t) }

// runRound runs one round and waits for the plans it started.
func runRound(e *Executor) {
	var wg sync.WaitGroup
	e.round(context.Background(), make(chan struct{}, MaxPlanning), &wg)
	wg.Wait()
}

// TestIdleImageIsNotPlannedAgain: the executor's idle cost does not grow
// with the images a node holds. A settled image is planned once, then
// again only when something it depends on moves: its record, its owner's
// maps, the membership or a policy.
func TestIdleImageIsNotPlannedAgain(t *testing.T) {
	ctx := context.Background()
	cat := testCatalog(t)
	rec := kvtest.OwnedImage(t, cat, "vm1", 4<<16, 1<<16, "", "n1", "n2")
	img := &image{rec: rec}
	h := &host{images: []Image{img}, nodes: []placement.NodeInfo{{Name: "n1", Alive: true}, {Name: "n2", Alive: true}}}
	e := New(Config{Self: "n1", Catalog: cat, Host: h})

	plansAfter := func(what string, want int) {
		t.Helper()
		runRound(e)
		if got, _ := h.counts(); got != want {
			t.Fatalf("%s: %d plans, want %d", what, got, want)
		}
	}
	// One State per plan: the relocation check reads the catalog again
	// only for an image with a relocation.
	plansAfter("first round", 1)
	if e.Settled() != 1 {
		t.Fatalf("a settled image: Settled() = %d, want 1", e.Settled())
	}
	plansAfter("idle round", 1)
	plansAfter("idle round", 1)
	img.ver.Add(1)
	plansAfter("maps changed", 2)
	plansAfter("idle round", 2)
	e.MembersChanged()
	plansAfter("membership changed", 3)
	e.policy.Add(1) // what watchPolicies does on a policy change
	plansAfter("policy changed", 4)
	img.busy.Store(true)
	img.ver.Add(1)
	plansAfter("busy", 4)
	img.busy.Store(false)
	plansAfter("no longer busy", 5)

	// A copy falls behind: the next plan syncs it, and a plan with an
	// action does not mark the image idle.
	if err := cat.SetBlockStates(ctx, rec, "n2", []int64{1, 2}, placement.OutOfSync); err != nil {
		t.Fatal(err)
	}
	img.rec, _, _ = cat.GetImage(ctx, "vm1")
	img.ver.Add(1) // the owner's out-of-sync record moves its maps
	runRound(e)
	runRound(e)
	if _, syncs := h.counts(); syncs != 2 {
		t.Fatalf("%d syncs of the copy behind in two rounds, want 2 (one per round)", syncs)
	}
	if h.syncs[0] != "n2" {
		t.Fatalf("synced %v, want n2", h.syncs)
	}
	if e.Settled() != 0 {
		t.Fatalf("an image with a copy behind counted settled")
	}
	if plan := e.LastPlan("vm1"); len(plan) == 0 || plan[0].Kind != placement.Sync {
		t.Fatalf("last plan %v, want a sync", plan)
	}
}

// TestOnlyResponsibleNodeActs: an unowned image is planned by its first
// live location only; an image a live node owns, by its owner only.
func TestOnlyResponsibleNodeActs(t *testing.T) {
	cat := testCatalog(t)
	rec := kvtest.OwnedImage(t, cat, "vm1", 4<<16, 1<<16, "", "n1", "n2")
	for _, tc := range []struct {
		self string
		want int
	}{{"n1", 1}, {"n2", 0}} {
		h := &host{images: []Image{&image{rec: rec}}, nodes: []placement.NodeInfo{{Name: "n1", Alive: true}, {Name: "n2", Alive: true}}}
		runRound(New(Config{Self: tc.self, Catalog: cat, Host: h}))
		if got, _ := h.counts(); got != tc.want {
			t.Errorf("%s: %d plans, want %d", tc.self, got, tc.want)
		}
	}
}

// TestForgetsImagesNoLongerServed: the executor's per-image state does
// not outlive the image.
func TestForgetsImagesNoLongerServed(t *testing.T) {
	cat := testCatalog(t)
	rec := kvtest.OwnedImage(t, cat, "vm1", 4<<16, 1<<16, "", "n1")
	h := &host{images: []Image{&image{rec: rec}}, nodes: []placement.NodeInfo{{Name: "n1", Alive: true}}}
	e := New(Config{Self: "n1", Catalog: cat, Host: h})
	runRound(e)
	if len(e.images) != 1 || e.LastPlan("vm1") == nil && len(e.plans) != 1 {
		t.Fatalf("after a round: %d image states, %d plans", len(e.images), len(e.plans))
	}
	h.images = nil
	runRound(e)
	if len(e.images) != 0 || len(e.plans) != 0 {
		t.Fatalf("after the image went: %d image states, %d plans kept", len(e.images), len(e.plans))
	}
}

// A node that does not own an image plans from the catalog: a record it
// applied before a location was removed must not make the removed
// location's deleted map read as malformed metadata (chaos seed 117: an
// operator's `image relocate` through such a node failed "malformed
// metadata").
func TestStateOfStaleRecord(t *testing.T) {
	ctx := context.Background()
	cat := testCatalog(t)
	stale := kvtest.OwnedImage(t, cat, "vm1", 4<<16, 1<<16, "", "n1", "n2", "n3")
	if _, err := cat.RemoveLocation(ctx, "vm1", "n3"); err != nil {
		t.Fatal(err)
	}
	h := &host{nodes: []placement.NodeInfo{{Name: "n1", Alive: true}, {Name: "n2", Alive: true}, {Name: "n3", Alive: true}}}
	e := New(Config{Self: "n1", Catalog: cat, Host: h})
	st, err := e.State(ctx, &image{rec: stale})
	if err != nil {
		t.Fatalf("planning from a record applied before a location was removed: %v", err)
	}
	is := st.Images[0]
	if !slices.Equal(is.Locations, []string{"n1", "n2"}) || len(is.Maps) != 2 || is.Maps["n3"] != nil {
		t.Fatalf("state lists %v with maps of %d locations, want n1, n2 as stored now", is.Locations, len(is.Maps))
	}
}

// ownedImage is an image this node owns, its copies in sync.
type ownedImage struct{ image }

func (i *ownedImage) Maps() map[string]*placement.BlockMap {
	out := map[string]*placement.BlockMap{}
	for _, l := range i.rec.Locations {
		out[l] = placement.NewBlockMap(i.rec.Blocks(), placement.InSync)
	}
	return out
}

// TestLocalityAfterTheDelay: an image this node owns without a copy is
// not planned again while locality's delay runs (its idle mark lasts
// until the wait ends), then gets a copy here; the delay counts from when
// the node took ownership, and starts again after ownership was lost.
func TestLocalityAfterTheDelay(t *testing.T) {
	cat := testCatalog(t)
	rec := kvtest.OwnedImage(t, cat, "vm1", 4<<16, 1<<16, "n3", "n1", "n2")
	img := &ownedImage{image{rec: rec, owned: true}}
	h := &host{images: []Image{img}, nodes: []placement.NodeInfo{{Name: "n1", Alive: true}, {Name: "n2", Alive: true}, {Name: "n3", Alive: true}}}
	now := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	const delay = 8 * time.Minute // more than a step, less than Sweep
	e := New(Config{Self: "n3", Catalog: cat, Host: h, Locality: placement.LocalityBestEffort, LocalityDelay: delay,
		Now: func() time.Time { return now }})
	adds := func() []string { h.mu.Lock(); defer h.mu.Unlock(); return slices.Clone(h.adds) }
	runRound(e)
	if plan := e.LastPlan("vm1"); len(plan) != 1 || plan[0].Kind != placement.Wait || !plan[0].Until.Equal(now.Add(delay)) {
		t.Fatalf("first plan %+v, want a wait until the delay ends", plan)
	}
	plans, _ := h.counts()
	now = now.Add(3 * time.Minute)
	runRound(e)
	if got, _ := h.counts(); got != plans || len(adds()) != 0 {
		t.Fatalf("planned again during the delay (%d plans, adds %v)", got-plans, adds())
	}
	// Ownership lost and taken back: the delay starts again.
	img.owned = false
	runRound(e)
	img.owned = true
	runRound(e)
	now = now.Add(6 * time.Minute) // 9 min after the first take, 6 after the second
	runRound(e)
	if len(adds()) != 0 {
		t.Fatalf("a copy added %v before the delay since ownership came back", adds())
	}
	now = now.Add(3 * time.Minute)
	runRound(e) // the count is recorded first (replicas was not set) ...
	runRound(e) // ... then the copy is added
	if got := adds(); !slices.Equal(got, []string{"n3"}) {
		t.Fatalf("adds %v after the delay, want [n3]; last plan %+v", got, e.LastPlan("vm1"))
	}
}

// TestGroupViewFollowsPolicyChanges: a group's rules and members are
// read once for several plans, but a policy change is seen by the next
// plan (else it was found settled on the old rule and left for Sweep).
func TestGroupViewFollowsPolicyChanges(t *testing.T) {
	ctx := context.Background()
	cat := testCatalog(t)
	rec := kvtest.OwnedImage(t, cat, "vm1", 4<<16, 1<<16, "", "n1")
	if _, err := cat.UpdateImagePolicy(ctx, "vm1", func(p *placement.ImagePolicy) error { p.Group = "g"; return nil }); err != nil {
		t.Fatal(err)
	}
	h := &host{nodes: []placement.NodeInfo{{Name: "n1", Alive: true}}}
	e := New(Config{Self: "n1", Catalog: cat, Host: h})
	kind := func() placement.GroupKind {
		st, err := e.State(ctx, &image{rec: rec})
		if err != nil {
			t.Fatal(err)
		}
		return st.Groups["g"].Kind
	}
	set := func(k placement.GroupKind) {
		if err := cat.SetGroupRule(ctx, "g", &placement.GroupRule{Kind: k, Label: "rack"}); err != nil {
			t.Fatal(err)
		}
	}
	set(placement.Affinity)
	if k := kind(); k != placement.Affinity {
		t.Fatalf("rule %q", k)
	}
	set(placement.AntiAffinity)
	e.policy.Add(1) // what watchPolicies does on the change
	if k := kind(); k != placement.AntiAffinity {
		t.Fatalf("after the change the plan saw %q", k)
	}
}
