package node

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/membership"
	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/placement"
	"github.com/ukai-storage/ukai/target/lun"
)

// The placement executor: every few seconds each node plans the images it
// is responsible for (those it owns, and unowned ones whose first live
// location it is) with the pure planner of package placement, and runs the
// plan: add a location, sync block ranges inside the sync window under the
// rate caps, remove a location once every block has another in-sync copy.

// limiters holds the token buckets that cap copy traffic: one per image
// and one per node (shared by all images syncing from or to it).
type limiters struct {
	mu sync.Mutex
	m  map[string]*rate.Limiter
}

// get returns the limiter of key at rate r bytes/s (nil when r is 0:
// unlimited); burst is one block, so over any interval the copied bytes
// stay within one block of r times the interval.
func (l *limiters) get(key string, r int64, burst int64) *rate.Limiter {
	if r <= 0 {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.m == nil {
		l.m = map[string]*rate.Limiter{}
	}
	lim, ok := l.m[key]
	if !ok {
		lim = rate.NewLimiter(rate.Limit(r), int(burst))
		l.m[key] = lim
		return lim
	}
	if lim.Limit() != rate.Limit(r) {
		lim.SetLimit(rate.Limit(r))
	}
	if lim.Burst() < int(burst) {
		lim.SetBurst(int(burst))
	}
	return lim
}

// pacer waits, after each block copied, until the caps allow its bytes.
type pacer []*rate.Limiter

func (p pacer) wait(ctx context.Context, n int64) error {
	for _, l := range p {
		if l == nil {
			continue
		}
		for n > 0 {
			k := min(n, int64(l.Burst()))
			if err := l.WaitN(ctx, int(k)); err != nil {
				return err
			}
			n -= k
		}
	}
	return nil
}

// planState builds the planner's input for one image.
func (n *Node) planState(ctx context.Context, s *served) (placement.State, error) {
	img := s.record()
	st := placement.State{Now: n.now(), ReplaceAfter: n.cfg.Placement.ReplaceAfter, PerNode: map[string]placement.SyncPolicy{}}
	def, nodes, images, bad, err := n.cat.SyncPolicies(ctx)
	if err != nil {
		return st, err
	}
	for _, b := range bad {
		n.log.Warn("ignoring unreadable sync policy", "err", b)
	}
	if def != nil {
		st.Default = *def
	}
	st.PerNode = nodes
	pol, _, err := n.cat.ImagePolicy(ctx, img.Name)
	if err != nil {
		return st, err
	}
	is := placement.ImageState{Name: img.Name, Size: img.Size, BlockSize: img.BlockSize, Locations: img.Locations, Policy: pol, Maps: map[string]*placement.BlockMap{}}
	if p, ok := images[img.Name]; ok {
		is.Sync = &p
	}
	if s.owned.Load() {
		is.Maps = s.vol.MapsSnapshot()
	} else {
		for _, loc := range img.Locations {
			bm, err := n.cat.BlockMap(ctx, img, loc)
			if err != nil {
				return st, err
			}
			is.Maps[loc] = bm
		}
	}
	st.Images = []placement.ImageState{is}
	st.Nodes = n.nodeInfos()
	return st, nil
}

// planStateByName is planState for an image named by the operator.
func (n *Node) planStateByName(ctx context.Context, name string) (placement.State, error) {
	s, err := n.servedByName(ctx, name)
	if err != nil {
		return placement.State{}, err
	}
	return n.planState(ctx, s)
}

// nodeInfos is the membership as the planner sees it.
func (n *Node) nodeInfos() []placement.NodeInfo {
	if n.members == nil {
		_, free := n.diskSpace()
		return []placement.NodeInfo{{Name: n.cfg.Node.Name, Alive: true, Labels: n.cfg.Node.Labels, Free: free}}
	}
	var out []placement.NodeInfo
	for _, m := range n.members.Members() {
		ni := placement.NodeInfo{Name: m.Name, Alive: m.State == membership.StateAlive, Labels: m.Meta.Labels, Free: m.Meta.Free}
		if !ni.Alive {
			ni.DeadSince = m.Since
		}
		out = append(out, ni)
	}
	return out
}

// shouldAct says whether this node plans and executes s now.
func (n *Node) shouldAct(s *served) bool {
	if s.owned.Load() {
		return true
	}
	img := s.record()
	if img.Owner != "" && n.alive(img.Owner) {
		return false
	}
	for _, l := range img.Locations {
		if n.alive(l) {
			return l == n.cfg.Node.Name
		}
	}
	return false
}

// planMark is what an image's last plan saw when it found nothing to do:
// every copy in sync on a live node, no action. Until one of these moves
// (or planSweep passes) planning it again would find the same, so the
// idle cost of the executor does not grow with the images a node holds.
type planMark struct {
	rev            uint64         // the record
	maps           lun.MapVersion // the volume's out-of-sync records
	member, policy uint64         // membership and policy epochs
	at             time.Time
}

// planSweep re-plans idle images now and then anyway (labels and free
// space in the membership change without an epoch).
const planSweep = 5 * time.Minute

// markFor is the mark of s as of now.
func (n *Node) markFor(s *served) planMark {
	return planMark{rev: s.record().Rev, maps: s.vol.MapVersion(), member: n.memberEpoch.Load(), policy: n.policyEpoch.Load(), at: time.Now()}
}

// idle says whether s's last plan found nothing to do and nothing it
// depends on moved since.
func (n *Node) idle(s *served) bool {
	last := s.idleMark.Load()
	if last == nil || time.Since(last.at) > planSweep {
		return false
	}
	now := n.markFor(s)
	return now.rev == last.rev && now.maps == last.maps && now.member == last.member && now.policy == last.policy
}

// maxPlanning bounds the images the executor works on at once: each
// plan reads the catalog, so a burst of new images does not become a
// burst of store requests.
const maxPlanning = 32

// placementLoop runs the executor; it returns once every plan it started
// has ended.
func (n *Node) placementLoop(ctx context.Context) {
	var plans sync.WaitGroup
	defer plans.Wait()
	slots := make(chan struct{}, maxPlanning)
	every(ctx, 2*time.Second, func() {
		n.rounds.Add(1)
		for _, s := range n.servedImages(false) {
			if ctx.Err() != nil {
				return
			}
			if s.busy.Load() > 0 || n.idle(s) || !n.shouldAct(s) {
				continue
			}
			select {
			case slots <- struct{}{}:
			default:
				return // all slots busy: the rest next round
			}
			if !s.planning.CompareAndSwap(false, true) {
				<-slots
				continue
			}
			// Each image plans on its own: a long, rate-capped sync of
			// one image does not hold up the others.
			plans.Go(func() {
				defer func() { <-slots }()
				defer s.planning.Store(false)
				if err := n.executePlan(ctx, s); err != nil && ctx.Err() == nil {
					n.log.Warn("placement step failed", "image", s.record().Name, "err", err)
				}
			})
		}
	})
}

// executePlan plans s and runs the plan's actions in order.
func (n *Node) executePlan(ctx context.Context, s *served) error {
	mark := n.markFor(s)
	s.idleMark.Store(nil)
	st, err := n.planState(ctx, s)
	if err != nil {
		return err
	}
	img := s.record()
	actions := placement.PlanImage(st, img.Name)
	n.setPlan(img.Name, actions)
	if settled(st, actions) {
		s.idleMark.Store(&mark)
	}
	for _, a := range actions {
		switch a.Kind {
		case placement.AddLocation:
			n.log.Info("placement: adding a copy", "image", img.Name, "node", a.Node, "reason", a.Reason)
			if _, err := n.AddLocation(ctx, img.Name, a.Node); err != nil {
				return fmt.Errorf("add %s: %w", a.Node, err)
			}
		case placement.Sync:
			sctx := ctx
			if !a.Deadline.IsZero() {
				var cancel context.CancelFunc
				sctx, cancel = context.WithDeadline(ctx, a.Deadline)
				defer cancel()
			}
			err := n.syncServed(sctx, s, syncOpts{from: a.From, to: a.To, only: a.Node, pace: n.pacerFor(st, img, a)}, nil)
			if err != nil && errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
				n.log.Info("placement: sync window closed; resuming at the next one", "image", img.Name, "node", a.Node)
				return nil
			}
			if err != nil {
				return fmt.Errorf("sync %s: %w", a.Node, err)
			}
		case placement.RemoveLocation:
			n.log.Info("placement: removing a copy", "image", img.Name, "node", a.Node, "reason", a.Reason)
			if _, err := n.RemoveLocation(ctx, img.Name, a.Node); err != nil {
				return fmt.Errorf("remove %s: %w", a.Node, err)
			}
		case placement.Wait, placement.Refuse:
			n.log.Debug("placement", "image", img.Name, "kind", a.Kind, "reason", a.Reason)
		}
	}
	return n.finishRelocation(ctx, s)
}

// settled says whether a plan found nothing to do on a quiet image: no
// action but waits or refusals, every copy in sync, every location alive.
func settled(st placement.State, actions []placement.Action) bool {
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

// watchPolicies bumps the policy epoch whenever an operator's decision
// changes (one blocking query; see planMark).
func (n *Node) watchPolicies(ctx context.Context) {
	var idx uint64
	for ctx.Err() == nil {
		next, err := n.kv.Watch(ctx, n.cat.PoliciesPrefix(), idx)
		if err != nil {
			sleep(ctx, time.Second)
			continue
		}
		if next != idx {
			n.policyEpoch.Add(1)
		}
		idx = next
	}
}

// watchMembers bumps the membership epoch when a node joins, leaves or
// dies (see planMark).
func (n *Node) watchMembers(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-n.members.Events():
			if !ok {
				return
			}
			if ev.Type != membership.EventUpdate {
				n.memberEpoch.Add(1)
			}
		}
	}
}

// finishRelocation clears a relocation the planner says is done (the new
// copy in sync, the old one gone).
func (n *Node) finishRelocation(ctx context.Context, s *served) error {
	st, err := n.planState(ctx, s)
	if err != nil {
		return err
	}
	is := st.Images[0]
	if is.Policy.Relocate == nil || !placement.RelocationDone(is) {
		return nil
	}
	r := is.Policy.Relocate
	_, err = n.cat.UpdateImagePolicy(ctx, is.Name, func(p *placement.ImagePolicy) error {
		p.Relocate = nil
		return nil
	})
	if err == nil {
		n.log.Info("relocation finished", "image", is.Name, "to", r.To, "from", r.From)
	}
	return err
}

// pacerFor returns the caps that apply to a sync action: the planner's
// rate for the action (its share of the node caps and the image cap) on
// the image's own bucket, and each node's cap on that node's bucket.
func (n *Node) pacerFor(st placement.State, img meta.Image, a placement.Action) pacer {
	var p pacer
	p = append(p, n.limits.get("image/"+img.Name, a.Rate, img.BlockSize))
	for node, pol := range st.PerNode {
		if node == a.Node || (len(img.Locations) > 0 && node == n.cfg.Node.Name) {
			p = append(p, n.limits.get("node/"+node, pol.MaxRate, img.BlockSize))
		}
	}
	return p
}

func (n *Node) setPlan(name string, actions []placement.Action) {
	n.planMu.Lock()
	defer n.planMu.Unlock()
	if n.plans == nil {
		n.plans = map[string][]placement.Action{}
	}
	n.plans[name] = actions
}

// PlanImage implements api.Service: what the planner would do now, and why.
func (n *Node) PlanImage(ctx context.Context, name string) ([]api.Action, error) {
	st, err := n.planStateByName(ctx, name)
	if err != nil {
		return nil, err
	}
	return apiActions(placement.PlanImage(st, name)), nil
}

// SetImagePolicy implements api.Service (setImagePolicy).
func (n *Node) SetImagePolicy(ctx context.Context, name string, req api.ImagePolicyRequest) (api.ImagePolicy, error) {
	p, err := n.setImagePolicy(ctx, name, req)
	return apiImagePolicy(p), err
}

// Relocate implements api.Service (relocate).
func (n *Node) Relocate(ctx context.Context, name string, req api.RelocateRequest) (api.ImagePolicy, error) {
	p, err := n.relocate(ctx, name, req)
	return apiImagePolicy(p), err
}

// setImagePolicy merges the request into the image's policy, refusing an
// impossible one with the reason.
func (n *Node) setImagePolicy(ctx context.Context, name string, req api.ImagePolicyRequest) (placement.ImagePolicy, error) {
	st, err := n.planStateByName(ctx, name)
	if err != nil {
		return placement.ImagePolicy{}, err
	}
	return n.cat.UpdateImagePolicy(ctx, name, func(p *placement.ImagePolicy) error {
		if req.Replicas != nil {
			p.Replicas = *req.Replicas
			if req.Locations == nil {
				p.Locations = nil
			}
		}
		if req.Locations != nil {
			p.Locations = req.Locations
			if req.Replicas == nil {
				p.Replicas = 0
			}
		}
		if req.PreferLabels != nil {
			p.PreferLabels = req.PreferLabels
			if len(p.PreferLabels) == 0 {
				p.PreferLabels = nil
			}
		}
		if req.SpreadBy != nil {
			p.SpreadBy = *req.SpreadBy
		}
		if err := placement.ValidatePolicy(*p, st.Images[0], st.Nodes); err != nil {
			return fmt.Errorf("%w: %v", meta.ErrInvalid, err)
		}
		return nil
	})
}

// relocate starts (or cancels) a follow-the-VM move.
func (n *Node) relocate(ctx context.Context, name string, req api.RelocateRequest) (placement.ImagePolicy, error) {
	st, err := n.planStateByName(ctx, name)
	if err != nil {
		return placement.ImagePolicy{}, err
	}
	return n.cat.UpdateImagePolicy(ctx, name, func(p *placement.ImagePolicy) error {
		if req.Cancel {
			if p.Relocate == nil {
				return fmt.Errorf("%w: %q has no relocation in progress", meta.ErrInvalid, name)
			}
			p.Relocate = nil
			return nil
		}
		p.Relocate = &placement.Relocation{To: req.To, From: req.From, Started: n.now().UTC()}
		if err := placement.ValidatePolicy(*p, st.Images[0], st.Nodes); err != nil {
			return fmt.Errorf("%w: %v", meta.ErrInvalid, err)
		}
		return nil
	})
}

// SetSyncPolicy implements api.Service.
func (n *Node) SetSyncPolicy(ctx context.Context, req api.SyncPolicyRequest) error {
	scope, err := syncScope(req.Scope)
	if err != nil {
		return err
	}
	if req.Clear {
		return n.cat.SetSyncPolicy(ctx, scope, nil)
	}
	p := placement.SyncPolicy{TZ: req.TZ}
	for _, w := range req.Windows {
		win, err := placement.ParseWindow(w)
		if err != nil {
			return fmt.Errorf("%w: --sync-window %q: %v", meta.ErrInvalid, w, err)
		}
		p.Windows = append(p.Windows, win)
	}
	if req.MaxRate != "" {
		r, err := placement.ParseRate(req.MaxRate)
		if err != nil {
			return fmt.Errorf("%w: --max-rate %q: %v", meta.ErrInvalid, req.MaxRate, err)
		}
		p.MaxRate = r
	}
	if err := p.Validate(); err != nil {
		return fmt.Errorf("%w: %v", meta.ErrInvalid, err)
	}
	return n.cat.SetSyncPolicy(ctx, scope, &p)
}

func syncScope(s string) (meta.SyncScope, error) {
	switch {
	case s == "default":
		return meta.DefaultScope(), nil
	case len(s) > 5 && s[:5] == "node:" && meta.NodeNameRE.MatchString(s[5:]):
		return meta.NodeScope(s[5:]), nil
	case len(s) > 6 && s[:6] == "image:" && meta.ValidateName(s[6:]) == nil:
		return meta.ImageScope(s[6:]), nil
	}
	return "", fmt.Errorf("%w: scope %q: want default, node:NAME or image:NAME", meta.ErrInvalid, s)
}

// SyncPolicies implements api.Service.
func (n *Node) SyncPolicies(ctx context.Context) (api.SyncPolicies, error) {
	def, nodes, images, bad, err := n.cat.SyncPolicies(ctx)
	if err != nil {
		return api.SyncPolicies{}, err
	}
	out := api.SyncPolicies{Nodes: apiSyncPolicies(nodes), Images: apiSyncPolicies(images)}
	if def != nil {
		d := apiSyncPolicy(*def)
		out.Default = &d
	}
	for _, b := range bad {
		out.Problems = append(out.Problems, b.Error())
	}
	return out, nil
}

// Stats implements api.Service.
func (n *Node) Stats(context.Context) (api.Stats, error) {
	st := api.Stats{Node: n.cfg.Node.Name, SyncBytes: n.syncBytes.Load(), PlacementRounds: n.rounds.Load()}
	if n.peerSrv != nil {
		ps := n.peerSrv.Stats()
		st.PeerBytesIn, st.PeerBytesOut = ps.BytesIn, ps.BytesOut
	}
	for _, s := range n.target.Sessions() {
		if !s.Discovery {
			st.Sessions++
		}
	}
	n.mu.RLock()
	st.Images = len(n.served)
	n.mu.RUnlock()
	return st, nil
}
