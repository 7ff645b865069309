// Package operate carries out the operator's node-level requests: cordon
// (no new copy goes to the node), drain (every copy moves away, within
// sync windows and caps unless --now, the images the node owns handed to
// other nodes on request) and uncordon (the drain stops, moved owners come
// back), and reports a drain's progress. It decides nothing about copies
// itself: it records the node's state in the catalog, where every
// placement executor sees it (package placement plans the moves), and it
// asks the planner what a drain would do before it starts one, so that a
// drain that could not finish is refused with the images named and
// nothing changed.
//
// Lock order: an Operator holds no lock; its state is the catalog's.
package operate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/node/executor"
	"github.com/ukai-storage/ukai/placement"
)

// Planner builds the planner's input for an image (the executor's State).
type Planner interface {
	State(ctx context.Context, img executor.Image) (placement.State, error)
}

// Config is what an Operator needs; every field but Log and Now is
// required.
type Config struct {
	Catalog *meta.Catalog
	Plans   Planner
	// Known says whether the membership knows a node (alive or not).
	Known func(node string) bool
	// Attach makes node the image's owner until Detach (the node's
	// Attach, which runs on node).
	Attach func(ctx context.Context, image, node string) error
	Detach func(ctx context.Context, image string) error
	Now    func() time.Time
	Log    *slog.Logger
}

// Operator carries out cordon, drain and uncordon.
type Operator struct{ cfg Config }

// New returns an Operator.
func New(cfg Config) *Operator {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Operator{cfg: cfg}
}

func (o *Operator) known(node string) error {
	if !o.cfg.Known(node) {
		return fmt.Errorf("no node %s: %w", node, meta.ErrNodeNotFound)
	}
	return nil
}

// Cordon stops new copies and ownership from going to node; with
// moveOwners the images it owns are handed to other nodes now.
func (o *Operator) Cordon(ctx context.Context, node string, moveOwners bool) (api.NodeOperation, error) {
	if err := o.known(node); err != nil {
		return api.NodeOperation{}, err
	}
	st, err := o.cfg.Catalog.UpdateNodeState(ctx, node, func(s *meta.NodeState) error {
		switch {
		case s.Unreadable:
			return unreadable(node)
		case moveOwners && (s.Cordoned || s.Drain != nil):
			return nil // cordoned already: only the owners move
		case s.Drain != nil:
			return fmt.Errorf("%w: %s is draining (so already cordoned)", meta.ErrRefused, node)
		case s.Cordoned:
			return fmt.Errorf("%w: %s is already cordoned", meta.ErrRefused, node)
		}
		s.Cordoned = true
		return nil
	})
	if err != nil {
		return api.NodeOperation{}, err
	}
	o.cfg.Log.Info("node cordoned", "node", node, "move_owners", moveOwners)
	out := opOf(node, st)
	if moveOwners {
		out.Moved, out.OwnerErrors = o.moveAndRecord(ctx, node)
	}
	return out, nil
}

// moveAndRecord moves node's owners away and records where they went.
func (o *Operator) moveAndRecord(ctx context.Context, node string) (map[string]string, []string) {
	moved, pinned, errs := o.moveOwners(ctx, node)
	if len(moved) == 0 {
		return moved, errs
	}
	if _, err := o.cfg.Catalog.UpdateNodeState(ctx, node, func(s *meta.NodeState) error {
		if s.Unreadable {
			return unreadable(node)
		}
		if !s.Cordoned && s.Drain == nil {
			return errors.New("the node was uncordoned meanwhile")
		}
		if s.Moved == nil {
			s.Moved = map[string]string{}
		}
		for k, v := range moved {
			s.Moved[k] = v
		}
		for _, p := range pinned {
			if !slices.Contains(s.WasAttached, p) {
				s.WasAttached = append(s.WasAttached, p)
			}
		}
		return nil
	}); err != nil {
		errs = append(errs, fmt.Sprintf("record the moved owners: %v", err))
	}
	return moved, errs
}

// Uncordon lets copies go to node again; a drain in progress stops (the
// copies it moved stay where they are) and the images whose owners it
// moved are handed back to node.
func (o *Operator) Uncordon(ctx context.Context, node string) (api.NodeOperation, error) {
	if err := o.known(node); err != nil {
		return api.NodeOperation{}, err
	}
	var drain *meta.Drain
	var moved map[string]string
	var pinned []string
	st, err := o.cfg.Catalog.UpdateNodeState(ctx, node, func(s *meta.NodeState) error {
		if !s.Cordoned && s.Drain == nil {
			return fmt.Errorf("%w: %s is not cordoned", meta.ErrRefused, node)
		}
		drain, moved, pinned = s.Drain, s.Moved, s.WasAttached
		*s = meta.NodeState{}
		return nil
	})
	if err != nil {
		return api.NodeOperation{}, err
	}
	o.cfg.Log.Info("node uncordoned", "node", node, "was_draining", drain != nil)
	out := opOf(node, st)
	// Owners moved away come back, unless someone attached the image
	// elsewhere since.
	names := make([]string, 0, len(moved))
	for name := range moved {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		rec, _, err := o.cfg.Catalog.GetImage(ctx, name)
		if err != nil || rec.Attached != moved[name] {
			continue
		}
		if err := o.cfg.Attach(ctx, name, node); err != nil {
			out.OwnerErrors = append(out.OwnerErrors, fmt.Sprintf("%s: hand back to %s: %v", name, node, err))
			continue
		}
		if !slices.Contains(pinned, name) {
			// It was not attached here before: ownership follows the
			// sessions again.
			if err := o.cfg.Detach(ctx, name); err != nil {
				out.OwnerErrors = append(out.OwnerErrors, fmt.Sprintf("%s: detach: %v", name, err))
				continue
			}
		}
		if out.Moved == nil {
			out.Moved = map[string]string{}
		}
		out.Moved[name] = node
	}
	return out, nil
}

// unreadable refuses to change a node state this node cannot read (a
// newer ukai wrote it, or it is malformed): it would lose what it holds.
func unreadable(node string) error {
	return fmt.Errorf("%w: the state of node %s cannot be read by this ukai (written by a newer version, or malformed): only an uncordon replaces it", meta.ErrRefused, node)
}

func opOf(node string, st meta.NodeState) api.NodeOperation {
	out := api.NodeOperation{Node: node, Cordoned: st.Cordoned || st.Drain != nil, Draining: st.Drain != nil, Moved: st.Moved}
	if d := st.Drain; d != nil {
		out.Started, out.Now = d.Started, d.Now
	}
	return out
}

// Drain starts moving every copy off node. It first plans each image with
// a copy there as if node were draining: a refusal the image does not
// have today (no eligible node, exact locations naming node, a group
// rule that cannot be kept) refuses the whole drain, naming the images,
// and nothing changes. With moveOwners the images node owns are attached
// to another node (one holding a copy, if any can) at once.
func (o *Operator) Drain(ctx context.Context, node string, req api.DrainRequest) (api.NodeOperation, error) {
	if err := o.known(node); err != nil {
		return api.NodeOperation{}, err
	}
	states, _, err := o.cfg.Catalog.NodeStates(ctx)
	if err != nil {
		return api.NodeOperation{}, err
	}
	if d := states[node].Drain; d != nil {
		return api.NodeOperation{}, fmt.Errorf("%w: %s is already draining (since %s); `ukai node uncordon %s` stops it",
			meta.ErrRefused, node, d.Started.UTC().Format(time.RFC3339), node)
	}
	imgs, err := o.imagesOn(ctx, node)
	if err != nil {
		return api.NodeOperation{}, err
	}
	var problems []string
	for _, rec := range imgs {
		why, err := o.wouldRefuse(ctx, rec, node, req.Now)
		if err != nil {
			return api.NodeOperation{}, fmt.Errorf("plan %s: %w", rec.Name, err)
		}
		if why != "" {
			problems = append(problems, rec.Name+": "+why)
		}
	}
	if len(problems) > 0 {
		return api.NodeOperation{}, fmt.Errorf("%w: draining %s cannot finish, nothing changed: %s", meta.ErrRefused, node, strings.Join(problems, "; "))
	}
	d := &meta.Drain{Started: o.cfg.Now().UTC(), Now: req.Now, MoveOwners: req.MoveOwners}
	for _, rec := range imgs {
		d.Images = append(d.Images, rec.Name)
	}
	if _, err := o.cfg.Catalog.UpdateNodeState(ctx, node, func(s *meta.NodeState) error {
		if s.Unreadable {
			return unreadable(node)
		}
		if s.Drain != nil {
			return fmt.Errorf("%w: %s is already draining", meta.ErrRefused, node)
		}
		s.Cordoned, s.Drain = true, d
		return nil
	}); err != nil {
		return api.NodeOperation{}, err
	}
	o.cfg.Log.Info("node draining", "node", node, "images", len(imgs), "now", req.Now, "move_owners", req.MoveOwners)
	var ownerErrs []string
	var moved map[string]string
	if req.MoveOwners {
		moved, ownerErrs = o.moveAndRecord(ctx, node)
	}
	st, err := o.Status(ctx, node)
	if err != nil {
		// The drain runs: say so, not that it failed.
		o.cfg.Log.Warn("drain started; its progress cannot be read now", "node", node, "err", err)
		st = api.NodeOperation{Node: node, Cordoned: true, Draining: true, Started: d.Started, Now: d.Now, Total: len(d.Images), Moved: moved}
	}
	st.OwnerErrors = append(st.OwnerErrors, ownerErrs...)
	return st, nil
}

// imagesOn lists the images with a copy on node.
func (o *Operator) imagesOn(ctx context.Context, node string) ([]meta.Image, error) {
	all, _, bad, err := o.cfg.Catalog.ListImages(ctx)
	if err != nil {
		return nil, err
	}
	for _, b := range bad {
		o.cfg.Log.Warn("drain: an image record cannot be read", "err", b)
	}
	var out []meta.Image
	for _, rec := range all {
		if slices.Contains(rec.Locations, node) {
			out = append(out, rec)
		}
	}
	return out, nil
}

// record is an image the node may not serve, for the planner's input
// (its maps come from the catalog).
type record struct{ rec meta.Image }

func (r record) Record() meta.Image                 { return r.rec }
func (record) Owned() bool                          { return false }
func (record) Busy() bool                           { return false }
func (record) Maps() map[string]*placement.BlockMap { return nil }
func (record) MapVersion() uint64                   { return 0 }

// plan plans rec with node draining (or not).
func (o *Operator) plan(ctx context.Context, rec meta.Image, node string, draining, now bool) (placement.State, []placement.Action, error) {
	st, err := o.cfg.Plans.State(ctx, record{rec})
	if err != nil {
		return st, nil, err
	}
	for i := range st.Nodes {
		if st.Nodes[i].Name == node {
			st.Nodes[i].Draining, st.Nodes[i].DrainNow = draining, draining && now
			st.Nodes[i].Cordoned = st.Nodes[i].Cordoned || draining
		}
	}
	// The count the executor records first (placement.SetReplicas), so
	// that the plan shows the moves that follow.
	if pol := &st.Images[0].Policy; draining && pol.Replicas == 0 && len(pol.Locations) == 0 {
		pol.Replicas = len(st.Images[0].Locations)
	}
	return st, placement.PlanImage(st, rec.Name), nil
}

// wouldRefuse is the refusals rec's plan has with node draining and not
// without.
func (o *Operator) wouldRefuse(ctx context.Context, rec meta.Image, node string, now bool) (string, error) {
	_, before, err := o.plan(ctx, rec, node, false, false)
	if err != nil {
		return "", err
	}
	_, after, err := o.plan(ctx, rec, node, true, now)
	if err != nil {
		return "", err
	}
	var out []string
	for _, a := range after {
		if a.Kind == placement.Refuse && !slices.ContainsFunc(before, func(b placement.Action) bool { return b.Kind == placement.Refuse && b.Reason == a.Reason }) {
			out = append(out, a.Reason)
		}
	}
	return strings.Join(out, "; "), nil
}

// moveOwners attaches every image node owns to another node: a location
// that may take copies if there is one, else any node that may.
func (o *Operator) moveOwners(ctx context.Context, node string) (moved map[string]string, pinned, errs []string) {
	all, _, _, err := o.cfg.Catalog.ListImages(ctx)
	if err != nil {
		return nil, nil, []string{fmt.Sprintf("list images: %v", err)}
	}
	moved = map[string]string{}
	var nodes []placement.NodeInfo // the membership with cordons, read once
	for _, rec := range all {
		if rec.Owner != node || rec.IsSnapshot() {
			continue
		}
		if nodes == nil {
			st, err := o.cfg.Plans.State(ctx, record{rec})
			if err != nil {
				errs = append(errs, fmt.Sprintf("%s: %v", rec.Name, err))
				continue
			}
			nodes = st.Nodes
		}
		target := ownerTarget(rec, node, nodes)
		if target == "" {
			errs = append(errs, fmt.Sprintf("%s: no other alive node that is not cordoned", rec.Name))
			continue
		}
		if err := o.cfg.Attach(ctx, rec.Name, target); err != nil {
			errs = append(errs, fmt.Sprintf("%s: attach to %s: %v", rec.Name, target, err))
			continue
		}
		moved[rec.Name] = target
		if rec.Attached == node {
			pinned = append(pinned, rec.Name)
		}
		o.cfg.Log.Info("owner moved", "image", rec.Name, "from", node, "to", target)
	}
	return moved, pinned, errs
}

// ownerTarget picks the node an image owned by node moves to: its first
// location that is alive and neither cordoned nor draining, else the
// first such node by name.
func ownerTarget(rec meta.Image, node string, nodes []placement.NodeInfo) string {
	ok := map[string]bool{}
	var names []string
	for _, n := range nodes {
		if n.Name != node && n.Alive && !n.Cordoned && !n.Draining {
			ok[n.Name] = true
			names = append(names, n.Name)
		}
	}
	for _, l := range rec.Locations {
		if ok[l] {
			return l
		}
	}
	sort.Strings(names)
	if len(names) > 0 {
		return names[0]
	}
	return ""
}

// Status is node's operator state and, while it drains, the progress:
// the images still to move, with the bytes their new copies lack and why
// any of them cannot go on.
func (o *Operator) Status(ctx context.Context, node string) (api.NodeOperation, error) {
	if err := o.known(node); err != nil {
		return api.NodeOperation{}, err
	}
	states, bad, err := o.cfg.Catalog.NodeStates(ctx)
	if err != nil {
		return api.NodeOperation{}, err
	}
	for _, b := range bad {
		var m *meta.MalformedError
		if errors.As(b, &m) && strings.HasSuffix(m.Key, "/"+node) {
			return api.NodeOperation{}, fmt.Errorf("the state of node %s cannot be read: %w", node, b)
		}
	}
	st := states[node]
	out := opOf(node, st)
	if st.Drain == nil {
		return out, nil
	}
	on, err := o.imagesOn(ctx, node)
	if err != nil {
		return out, err
	}
	names := map[string]bool{}
	for _, n := range st.Drain.Images {
		names[n] = true
	}
	for _, rec := range on {
		names[rec.Name] = true
	}
	out.Total = len(names)
	out.Done = out.Total - len(on)
	for _, rec := range on {
		di, err := o.progress(ctx, rec, node, st.Drain.Now)
		if err != nil {
			di = api.DrainImage{Name: rec.Name, Waiting: err.Error()}
		}
		out.BytesLeft += di.BytesLeft
		out.Images = append(out.Images, di)
	}
	return out, nil
}

// progress is what is left of moving rec off node.
func (o *Operator) progress(ctx context.Context, rec meta.Image, node string, now bool) (api.DrainImage, error) {
	st, acts, err := o.plan(ctx, rec, node, true, now)
	if err != nil {
		return api.DrainImage{}, err
	}
	out := api.DrainImage{Name: rec.Name}
	is := st.Images[0]
	moving := false
	for _, a := range acts {
		switch a.Kind {
		case placement.AddLocation:
			out.BytesLeft += is.Size
			moving = true
		case placement.Sync, placement.RemoveLocation, placement.SetReplicas:
			moving = true
		case placement.Refuse:
			if out.Blocked == "" {
				out.Blocked = a.Reason
			}
		case placement.Wait:
			if out.Waiting == "" {
				out.Waiting = a.Reason
			}
		}
	}
	alive := map[string]bool{}
	for _, n := range st.Nodes {
		alive[n.Name] = n.Alive
	}
	for _, l := range is.Locations {
		if l == node || !alive[l] {
			continue
		}
		if m := is.Maps[l]; m != nil {
			out.BytesLeft += (m.Len() - m.Count(placement.InSync)) * is.BlockSize
		}
	}
	if moving {
		out.Waiting = ""
	}
	return out, nil
}
