// Package executor is the placement executor: every few seconds it plans
// the images this node is responsible for (those it owns, and unowned
// ones whose first live location it is) with the pure planner of package
// placement, and has the node carry out the plan: add a location, sync
// block ranges inside the sync window under the rate caps, remove a
// location once every block has another in-sync copy, end a relocation
// the planner says is done.
//
// It owns the executor's loop, the per-image planning state (a plan in
// progress, the mark of an idle image), the token buckets that cap copy
// traffic, the last plan of each image (shown by `ukai image info`) and
// the epochs of membership and policy changes. It decides nothing itself
// (package placement does) and does no data I/O (the Host does).
//
// Lock order: Executor.mu and the limiters' mu are leaves: nothing else is
// locked while one is held (an image's mark is read before mu is taken),
// and the Host and its images are never called with one held.
package executor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/placement"
)

// Image is one image the node serves, as the executor sees it.
type Image interface {
	// Record is the image's record as last applied.
	Record() meta.Image
	// Owned says whether this node owns the image now.
	Owned() bool
	// Busy says whether a sync, verify or snapshot runs on it (the
	// executor leaves it alone meanwhile).
	Busy() bool
	// Maps are the owner's own block maps (asked only while Owned), more
	// current than the catalog's.
	Maps() map[string]*placement.BlockMap
	// MapVersion changes whenever the owner's maps do.
	MapVersion() uint64
}

// Host carries out what a plan decides.
type Host interface {
	// Images are the images the node serves now.
	Images() []Image
	// Alive says whether a node is alive in the membership.
	Alive(node string) bool
	// Nodes is the membership as the planner sees it.
	Nodes() []placement.NodeInfo
	AddLocation(ctx context.Context, image, node string) error
	RemoveLocation(ctx context.Context, image, node string) error
	// Sync copies blocks [from, to) (to 0: the end) of img to node's
	// copy where it is not in sync, each copied block paced by pace.
	Sync(ctx context.Context, img Image, from, to int64, node string, pace Pacer) error
}

// Config is what an Executor needs. Catalog and Host are required.
type Config struct {
	// Self is this node's name.
	Self    string
	Catalog *meta.Catalog
	Host    Host
	// ReplaceAfter is how long a location stays dead before the planner
	// replaces its copy.
	ReplaceAfter time.Duration
	// Locality is the locality policy of images whose policy does not
	// say; LocalityDelay how long an image is owned by a node without a
	// copy before locality adds one there.
	Locality      placement.Locality
	LocalityDelay time.Duration
	// Interval between rounds (default 2 s).
	Interval time.Duration
	// Now is the clock plans decide by (sync windows, dead since); default
	// time.Now.
	Now func() time.Time
	Log *slog.Logger
}

// MaxPlanning bounds the images the executor works on at once: each plan
// reads the catalog, so a burst of new images does not become a burst of
// store requests.
const MaxPlanning = 32

// Sweep: idle images are planned again now and then anyway (labels and
// free space in the membership change without an epoch).
const Sweep = 5 * time.Minute

// Executor runs the plans of one node.
type Executor struct {
	cfg    Config
	limits limiters
	rounds atomic.Int64
	// nodeCap: this node's copy cap as its last plan saw it.
	nodeCap atomic.Int64
	member  atomic.Uint64 // membership changes seen (see mark)
	policy  atomic.Uint64 // policy changes seen (see mark)

	mu     sync.Mutex
	images map[string]*imageState // by image id
	plans  map[string][]placement.Action
	groups map[string]groupView // by group name
	// reports: what each image's last plan saw, by name (metrics of the
	// images this node plans but does not own); actions: the actions
	// started, by kind.
	reports map[string]Report
	actions map[placement.ActionKind]int64
}

// Report is what an image's last plan here saw: the copies it wants and,
// per location, the blocks not in sync.
type Report struct {
	Wanted      int
	OutOfSync   map[string]int64
	Syncing     map[string]int64
	Unprotected int64 // blocks without an in-sync copy on a live location
}

// Report returns what the last plan of image name saw.
func (e *Executor) Report(name string) (Report, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	r, ok := e.reports[name]
	return r, ok
}

// Actions returns how many actions of each kind (add, remove, sync,
// set_replicas; not waits or refusals) the executor started since it
// started.
func (e *Executor) Actions() map[string]int64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make(map[string]int64, len(e.actions))
	for k, n := range e.actions {
		out[string(k)] = n
	}
	return out
}

// report summarizes the maps a plan saw.
func report(is placement.ImageState, alive func(string) bool) Report {
	r := Report{Wanted: is.Policy.Replicas, OutOfSync: map[string]int64{}, Syncing: map[string]int64{}}
	if r.Wanted == 0 {
		r.Wanted = len(is.Locations)
	}
	var live []*placement.BlockMap
	for _, loc := range is.Locations {
		bm := is.Maps[loc]
		if bm == nil {
			continue
		}
		r.OutOfSync[loc], r.Syncing[loc] = bm.Count(placement.OutOfSync), bm.Count(placement.Syncing)
		if alive(loc) {
			live = append(live, bm)
		}
	}
	r.Unprotected = placement.Unprotected(is.Blocks(), live)
	return r
}

// imageState is the executor's state of one image (guarded by mu).
type imageState struct {
	planning   bool
	idle       *mark     // the last plan found nothing to do
	ownedSince time.Time // since when this node owns the image (zero: it does not)
}

// New returns an executor; Run starts it.
func New(cfg Config) *Executor {
	if cfg.Interval <= 0 {
		cfg.Interval = 2 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	e := &Executor{cfg: cfg, images: map[string]*imageState{}, plans: map[string][]placement.Action{},
		reports: map[string]Report{}, actions: map[placement.ActionKind]int64{}}
	e.nodeCap.Store(-1)
	return e
}

// Rounds is the number of rounds run since start.
func (e *Executor) Rounds() int64 { return e.rounds.Load() }

// Settled is the number of images whose last plan found nothing to do
// (every copy in sync on a live node): the executor leaves them alone
// until something they depend on moves.
func (e *Executor) Settled() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := 0
	for _, st := range e.images {
		if st.idle != nil {
			n++
		}
	}
	return n
}

// MembersChanged notes that a node joined, left or died.
func (e *Executor) MembersChanged() { e.member.Add(1) }

// LastPlan is the last plan made for image name.
func (e *Executor) LastPlan(name string) []placement.Action {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.plans[name]
}

// mark is what an image's last plan saw when it found nothing to do:
// every copy in sync on a live node, no action. Until one of these moves
// (or Sweep passes) planning it again would find the same, so the idle
// cost of the executor does not grow with the images a node holds.
type mark struct {
	rev            uint64 // the record
	maps           uint64 // the owner's block maps
	member, policy uint64 // membership and policy epochs
	at             time.Time
	until          time.Time // a wait of the plan ends then (locality's delay)
}

func (e *Executor) markOf(img Image) mark {
	return mark{rev: img.Record().Rev, maps: img.MapVersion(), member: e.member.Load(), policy: e.policy.Load(), at: e.cfg.Now()}
}

// idle says whether img's last plan found nothing to do and nothing it
// depends on moved since (now: img's mark as of now); the caller holds
// mu.
func (st *imageState) idleAt(now mark) bool {
	last := st.idle
	if last == nil || now.at.Sub(last.at) > Sweep || !last.until.IsZero() && !now.at.Before(last.until) {
		return false
	}
	return now.rev == last.rev && now.maps == last.maps && now.member == last.member && now.policy == last.policy
}

// Run runs rounds every Interval and follows policy changes until ctx
// ends; it returns once every plan it started has ended.
func (e *Executor) Run(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { e.watchPolicies(ctx) })
	slots := make(chan struct{}, MaxPlanning)
	t := time.NewTicker(e.cfg.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			e.round(ctx, slots, &wg)
		}
	}
}

// round starts a plan for every image that needs one, as slots allow.
func (e *Executor) round(ctx context.Context, slots chan struct{}, wg *sync.WaitGroup) {
	e.rounds.Add(1)
	images := e.cfg.Host.Images()
	e.forget(images)
	for _, img := range images {
		if ctx.Err() != nil {
			return
		}
		id := img.Record().ID
		owned := img.Owned()
		if !owned {
			// Ownership lost: locality's delay starts again when it
			// comes back.
			e.mu.Lock()
			if st := e.images[id]; st != nil {
				st.ownedSince = time.Time{}
			}
			e.mu.Unlock()
		}
		if img.Busy() || !ShouldAct(img.Record(), owned, e.cfg.Self, e.cfg.Host.Alive) {
			continue
		}
		now := e.markOf(img) // the image's locks, outside mu
		e.mu.Lock()
		st := e.images[id]
		if st == nil {
			st = &imageState{}
			e.images[id] = st
		}
		if owned && st.ownedSince.IsZero() {
			st.ownedSince = e.cfg.Now()
		}
		skip := st.planning || st.idleAt(now)
		e.mu.Unlock()
		if skip {
			continue
		}
		select {
		case slots <- struct{}{}:
		default:
			return // all slots busy: the rest next round
		}
		e.mu.Lock()
		st.planning = true
		e.mu.Unlock()
		// Each image plans on its own: a long, rate-capped sync of one
		// image does not hold up the others.
		wg.Go(func() {
			defer func() {
				e.mu.Lock()
				st.planning = false
				e.mu.Unlock()
				<-slots
			}()
			if err := e.execute(ctx, st, img); err != nil && ctx.Err() == nil {
				e.cfg.Log.Warn("placement step failed", "image", img.Record().Name, "err", err)
			}
		})
	}
}

// forget drops the state of images no longer served.
func (e *Executor) forget(images []Image) {
	ids := make(map[string]bool, len(images))
	for _, img := range images {
		ids[img.Record().ID] = true
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	for id, st := range e.images {
		if !ids[id] && !st.planning {
			delete(e.images, id)
		}
	}
	names := make(map[string]bool, len(images))
	for _, img := range images {
		names[img.Record().Name] = true
	}
	for name := range e.plans {
		if !names[name] {
			delete(e.plans, name)
		}
	}
	for name := range e.reports {
		if !names[name] {
			delete(e.reports, name)
		}
	}
	for g, v := range e.groups {
		if time.Since(v.at) >= groupTTL {
			delete(e.groups, g)
		}
	}
}

// ShouldAct says whether node self plans and executes an image now: it
// owns it, or nobody alive does and self is its first live location.
func ShouldAct(img meta.Image, owned bool, self string, alive func(string) bool) bool {
	if owned {
		return true
	}
	if img.Owner != "" && alive(img.Owner) {
		return false
	}
	for _, l := range img.Locations {
		if alive(l) {
			return l == self
		}
	}
	return false
}

// execute plans img and runs the plan's actions in order.
func (e *Executor) execute(ctx context.Context, st *imageState, img Image) error {
	m := e.markOf(img)
	e.mu.Lock()
	st.idle = nil
	e.mu.Unlock()
	state, err := e.State(ctx, img)
	if err != nil {
		return err
	}
	rec := img.Record()
	e.mu.Lock()
	if since := st.ownedSince; !since.IsZero() && len(state.Images) == 1 {
		state.Images[0].Owner, state.Images[0].OwnerSince = e.cfg.Self, since
	}
	e.mu.Unlock()
	actions := placement.PlanImage(state, rec.Name)
	rep := report(state.Images[0], e.cfg.Host.Alive)
	e.nodeCap.Store(placement.NodeCap(state.PerNode, state.Default, e.cfg.Self, false))
	e.mu.Lock()
	e.plans[rec.Name] = actions
	e.reports[rec.Name] = rep
	if Settled(state, actions) {
		for _, a := range actions {
			if a.Kind == placement.Wait && !a.Until.IsZero() && (m.until.IsZero() || a.Until.Before(m.until)) {
				m.until = a.Until
			}
		}
		st.idle = &m
	}
	e.mu.Unlock()
	for _, a := range actions {
		if a.Kind != placement.Wait && a.Kind != placement.Refuse {
			e.mu.Lock()
			e.actions[a.Kind]++
			e.mu.Unlock()
		}
		switch a.Kind {
		case placement.SetReplicas:
			e.cfg.Log.Info("placement: recording the replica count", "image", rec.Name, "replicas", a.Count, "reason", a.Reason)
			if _, err := e.cfg.Catalog.UpdateImagePolicy(ctx, rec.Name, func(p *placement.ImagePolicy) error {
				if p.Replicas == 0 {
					p.Replicas = a.Count
				}
				return nil
			}); err != nil {
				return fmt.Errorf("record replicas %d: %w", a.Count, err)
			}
			return nil // plan again with it
		case placement.AddLocation:
			e.cfg.Log.Info("placement: adding a copy", "image", rec.Name, "node", a.Node, "reason", a.Reason)
			if err := e.cfg.Host.AddLocation(ctx, rec.Name, a.Node); err != nil {
				return fmt.Errorf("add %s: %w", a.Node, err)
			}
		case placement.Sync:
			if done, err := e.sync(ctx, state, img, a); err != nil {
				return fmt.Errorf("sync %s: %w", a.Node, err)
			} else if !done {
				e.cfg.Log.Info("placement: sync window closed; resuming at the next one", "image", rec.Name, "node", a.Node)
				return nil
			}
		case placement.RemoveLocation:
			e.cfg.Log.Info("placement: removing a copy", "image", rec.Name, "node", a.Node, "reason", a.Reason)
			if err := e.cfg.Host.RemoveLocation(ctx, rec.Name, a.Node); err != nil {
				return fmt.Errorf("remove %s: %w", a.Node, err)
			}
		case placement.Wait, placement.Refuse:
			e.cfg.Log.Debug("placement", "image", rec.Name, "kind", a.Kind, "reason", a.Reason)
		}
	}
	if state.Images[0].Policy.Relocate == nil {
		return nil // nothing to finish: no second read of the catalog
	}
	return e.finishRelocation(ctx, img)
}

// sync runs one sync action until its window's deadline; done is false
// when the window closed first.
func (e *Executor) sync(ctx context.Context, st placement.State, img Image, a placement.Action) (done bool, err error) {
	sctx := ctx
	if !a.Deadline.IsZero() {
		var cancel context.CancelFunc
		sctx, cancel = context.WithDeadline(ctx, a.Deadline)
		defer cancel()
	}
	err = e.cfg.Host.Sync(sctx, img, a.From, a.To, a.Node, e.Pacer(st, img.Record(), a))
	if err != nil && errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
		return false, nil
	}
	return err == nil, err
}

// Settled says whether a plan found nothing to do on a quiet image: no
// action but waits or refusals, every copy in sync, every location alive.
func Settled(st placement.State, actions []placement.Action) bool {
	for _, a := range actions {
		if a.Kind != placement.Wait && a.Kind != placement.Refuse {
			return false
		}
	}
	if len(st.Images) != 1 {
		return false
	}
	is := st.Images[0]
	if is.Policy.Relocate != nil {
		return false
	}
	alive := map[string]bool{}
	for _, ni := range st.Nodes {
		alive[ni.Name] = ni.Alive
	}
	for _, loc := range is.Locations {
		bm := is.Maps[loc]
		if !alive[loc] || bm == nil || bm.Count(placement.InSync) != bm.Len() {
			return false
		}
	}
	return true
}

// State builds the planner's input for one image: the policies, the
// image's block maps (the owner's own when this node owns it, else the
// catalog's) and the membership.
func (e *Executor) State(ctx context.Context, img Image) (placement.State, error) {
	rec := img.Record()
	cat := e.cfg.Catalog
	st := placement.State{Now: e.cfg.Now(), ReplaceAfter: e.cfg.ReplaceAfter, PerNode: map[string]placement.SyncPolicy{},
		Locality: e.cfg.Locality, LocalityDelay: e.cfg.LocalityDelay}
	def, nodes, images, bad, err := cat.SyncPolicies(ctx)
	if err != nil {
		return st, err
	}
	for _, b := range bad {
		e.cfg.Log.Warn("ignoring unreadable sync policy", "err", b)
	}
	if def != nil {
		st.Default = *def
	}
	st.PerNode = nodes
	pol, _, err := cat.ImagePolicy(ctx, rec.Name)
	if err != nil {
		return st, err
	}
	var maps map[string]*placement.BlockMap
	if img.Owned() {
		maps = img.Maps()
	} else {
		// rec is the record as this node last applied it: read it as it
		// stands now (a location may have come or gone since).
		if fresh, _, err := cat.GetImage(ctx, rec.Name); err == nil && fresh.ID == rec.ID {
			rec = fresh
		}
		if rec, maps, err = cat.LocationMaps(ctx, rec); err != nil {
			return st, err
		}
	}
	is := placement.ImageState{Name: rec.Name, Size: rec.Size, BlockSize: rec.BlockSize, Locations: rec.Locations, Policy: pol, Maps: maps, SyncPaused: rec.SyncPaused}
	if p, ok := images[rec.Name]; ok {
		is.Sync = &p
	}
	st.Images = []placement.ImageState{is}
	st.Nodes, err = e.nodes(ctx)
	if err != nil {
		return st, err
	}
	if pol.Group != "" {
		if st.Groups, st.GroupImages, err = e.group(ctx, pol.Group); err != nil {
			return st, err
		}
	}
	return st, nil
}

// groupTTL: a group's rules and members, read for one grouped image's
// plan, serve the plans of its other images for this long. Reading them
// lists every image policy, so without it a change that replans a group
// of n images read n times what one read gives; a plan working from a
// view this old places a copy at worst where the next plan moves it
// from (anti-affinity repairs it).
const groupTTL = 2 * time.Second

type groupView struct {
	at     time.Time
	policy uint64 // the policy epoch it was read at: a change is a miss
	rules  map[string]placement.GroupRule
	images map[string][]placement.GroupImage
}

// group returns the group rules and the images of group g, read at most
// once per groupTTL.
func (e *Executor) group(ctx context.Context, g string) (map[string]placement.GroupRule, map[string][]placement.GroupImage, error) {
	epoch := e.policy.Load() // before the read: a change during it is a miss next time
	e.mu.Lock()
	v, ok := e.groups[g]
	e.mu.Unlock()
	if ok && v.policy == epoch && time.Since(v.at) < groupTTL {
		return v.rules, v.images, nil
	}
	cat := e.cfg.Catalog
	rules, bad, err := cat.GroupRules(ctx)
	if err != nil {
		return nil, nil, err
	}
	for _, b := range bad {
		e.cfg.Log.Warn("ignoring an unreadable group rule", "err", b)
	}
	images, err := cat.GroupImages(ctx, g)
	if err != nil {
		return nil, nil, err
	}
	e.mu.Lock()
	if e.groups == nil {
		e.groups = map[string]groupView{}
	}
	e.groups[g] = groupView{at: time.Now(), policy: epoch, rules: rules, images: images}
	e.mu.Unlock()
	return rules, images, nil
}

// nodes is the membership with the operator's cordons and drains.
func (e *Executor) nodes(ctx context.Context) ([]placement.NodeInfo, error) {
	nodes := e.cfg.Host.Nodes()
	states, bad, err := e.cfg.Catalog.NodeStates(ctx)
	if err != nil {
		return nil, err
	}
	for _, b := range bad {
		e.cfg.Log.Warn("unreadable node state: the node is treated as cordoned", "err", b)
	}
	for i := range nodes {
		ns, ok := states[nodes[i].Name]
		if !ok {
			continue
		}
		nodes[i].Cordoned = ns.Cordoned || ns.Drain != nil
		if ns.Drain != nil {
			nodes[i].Draining, nodes[i].DrainNow = true, ns.Drain.Now
		}
	}
	return nodes, nil
}

// finishRelocation clears a relocation the planner says is done (the new
// copy in sync, the old one gone).
func (e *Executor) finishRelocation(ctx context.Context, img Image) error {
	st, err := e.State(ctx, img)
	if err != nil {
		return err
	}
	is := st.Images[0]
	if is.Policy.Relocate == nil || !placement.RelocationDone(is) {
		return nil
	}
	r := is.Policy.Relocate
	_, err = e.cfg.Catalog.UpdateImagePolicy(ctx, is.Name, func(p *placement.ImagePolicy) error {
		p.Relocate = nil
		return nil
	})
	if err == nil {
		e.cfg.Log.Info("relocation finished", "image", is.Name, "to", r.To, "from", r.From)
	}
	return err
}

// watchPolicies bumps the policy epoch whenever an operator's decision
// changes (one blocking query; see mark).
func (e *Executor) watchPolicies(ctx context.Context) {
	kv := e.cfg.Catalog.KV()
	var idx uint64
	for ctx.Err() == nil {
		next, err := kv.Watch(ctx, e.cfg.Catalog.PoliciesPrefix(), idx)
		if err != nil {
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
			continue
		}
		if next != idx {
			e.policy.Add(1)
		}
		idx = next
	}
}
