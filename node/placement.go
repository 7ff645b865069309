package node

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/membership"
	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/node/executor"
	"github.com/ukai-storage/ukai/node/served"
	"github.com/ukai-storage/ukai/placement"
)

// The placement executor runs in package executor; the node is its Host
// (the images it serves, the membership, and the actions: add or remove
// a location, sync) and the API's entry to it.

// newExecutor returns the node's placement executor.
func (n *Node) newExecutor() *executor.Executor {
	return executor.New(executor.Config{
		Self: n.cfg.Node.Name, Catalog: n.cat, Host: execHost{n},
		ReplaceAfter: n.cfg.Placement.ReplaceAfter, Now: func() time.Time { return n.now() },
		Locality: placement.Locality(n.cfg.Placement.Locality), LocalityDelay: n.cfg.Placement.LocalityDelay,
		Log: n.log.With("component", "placement"),
	})
}

// execHost is the node as the executor's Host.
type execHost struct{ n *Node }

func (h execHost) Images() []executor.Image {
	ss := h.n.servedImages(false)
	out := make([]executor.Image, len(ss))
	for i, s := range ss {
		out[i] = s
	}
	return out
}

func (h execHost) Alive(node string) bool { return h.n.alive(node) }

// Nodes is the membership as the planner sees it.
func (h execHost) Nodes() []placement.NodeInfo {
	n := h.n
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

func (h execHost) AddLocation(ctx context.Context, image, node string) error {
	_, err := h.n.AddLocation(ctx, image, node)
	return err
}

func (h execHost) RemoveLocation(ctx context.Context, image, node string) error {
	_, err := h.n.RemoveLocation(ctx, image, node)
	return err
}

func (h execHost) Sync(ctx context.Context, img executor.Image, from, to int64, node string, pace executor.Pacer) error {
	return h.n.syncServed(ctx, img.(*served.Image), syncOpts{from: from, to: to, only: node, pace: pace}, nil)
}

var _ executor.Image = (*served.Image)(nil)

// watchMembers tells the executor when a node joins, leaves or dies.
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
				n.exec.MembersChanged()
			}
		}
	}
}

// planStateByName is the planner's input for an image named by the
// operator.
func (n *Node) planStateByName(ctx context.Context, name string) (placement.State, error) {
	s, err := n.servedByName(ctx, name)
	if err != nil {
		return placement.State{}, err
	}
	return n.exec.State(ctx, s)
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
	if req.Group != nil && *req.Group != "" {
		// The rule of the group joined, and its images as they are now.
		if st.Groups, _, err = n.cat.GroupRules(ctx); err != nil {
			return placement.ImagePolicy{}, err
		}
		if st.GroupImages, err = n.cat.GroupImages(ctx, *req.Group); err != nil {
			return placement.ImagePolicy{}, err
		}
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
		if req.Locality != nil {
			l, err := placement.ParseLocality(*req.Locality)
			if err != nil {
				return fmt.Errorf("%w: %v", meta.ErrInvalid, err)
			}
			p.Locality = l
		}
		if req.Group != nil {
			p.Group = *req.Group
		}
		if req.AllowRemote != nil {
			p.AllowRemote = *req.AllowRemote
			if len(p.AllowRemote) == 0 {
				p.AllowRemote = nil
			}
		}
		if err := placement.ValidatePolicy(*p, st.Images[0], st.Nodes); err != nil {
			return fmt.Errorf("%w: %v", meta.ErrInvalid, err)
		}
		if req.Group != nil && p.Group != "" {
			img := st.Images[0]
			img.Policy = *p
			if err := placement.ValidateGroup(st, img); err != nil {
				return fmt.Errorf("%w: %v", meta.ErrInvalid, err)
			}
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
	// A policy for an image or node that does not exist would be kept and
	// never apply: refused, like a typo should be.
	switch {
	case strings.HasPrefix(req.Scope, "image:"):
		if _, _, err := n.cat.GetImage(ctx, req.Scope[6:]); err != nil {
			if errors.Is(err, meta.ErrImageNotFound) {
				return fmt.Errorf("%w: no image %s", meta.ErrImageNotFound, req.Scope[6:])
			}
			return err
		}
	case strings.HasPrefix(req.Scope, "node:"):
		name := req.Scope[5:]
		known := false
		if n.members != nil {
			_, known = n.members.Member(name)
		}
		if !known {
			if known, err = n.cat.NodeKnown(ctx, name); err != nil {
				return err
			}
		}
		if !known && name != n.cfg.Node.Name {
			return fmt.Errorf("%w: no node %s", meta.ErrNodeNotFound, name)
		}
	}
	if req.Clear {
		return n.cat.SetSyncPolicy(ctx, scope, nil)
	}
	var windows []placement.Window
	for _, w := range req.Windows {
		win, err := placement.ParseWindow(w)
		if err != nil {
			return fmt.Errorf("%w: --sync-window %q: %v", meta.ErrInvalid, w, err)
		}
		windows = append(windows, win)
	}
	var rate int64
	if req.MaxRate != "" {
		if rate, err = placement.ParseRate(req.MaxRate); err != nil {
			return fmt.Errorf("%w: --max-rate %q: %v", meta.ErrInvalid, req.MaxRate, err)
		}
	}
	if req.ClearWindows && len(req.Windows) > 0 || req.ClearRate && req.MaxRate != "" {
		return fmt.Errorf("%w: a field both set and cleared", meta.ErrInvalid)
	}
	_, err = n.cat.UpdateSyncPolicy(ctx, scope, func(p *placement.SyncPolicy) error {
		switch {
		case req.ClearWindows:
			p.Windows = nil
		case len(windows) > 0:
			p.Windows = windows
		}
		switch {
		case req.ClearRate:
			p.MaxRate = 0
		case req.MaxRate != "":
			p.MaxRate = rate
		}
		if req.TZ != "" {
			p.TZ = req.TZ
		}
		if err := p.Validate(); err != nil {
			return fmt.Errorf("%w: %v", meta.ErrInvalid, err)
		}
		return nil
	})
	return err
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
	st := api.Stats{Node: n.cfg.Node.Name, SyncBytes: n.syncBytes.Load(), PlacementRounds: n.exec.Rounds(), Settled: n.exec.Settled()}
	if n.peerSrv != nil {
		ps := n.peerSrv.Stats()
		st.PeerBytesIn, st.PeerBytesOut = ps.BytesIn, ps.BytesOut
	}
	for _, s := range n.target.Sessions() {
		if !s.Discovery {
			st.Sessions++
		}
	}
	st.Images = n.images.Len()
	return st, nil
}
