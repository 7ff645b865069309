package node

import (
	"context"
	"fmt"
	"sort"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/node/operate"
	"github.com/ukai-storage/ukai/placement"
)

// Cordon, drain and uncordon run in package operate; groups are catalog
// records. The node wires them to the API.

func (n *Node) newOperator() *operate.Operator {
	return operate.New(operate.Config{
		Catalog: n.cat, Plans: n.exec,
		Known: func(node string) bool {
			if node == n.cfg.Node.Name {
				return true
			}
			if n.members == nil {
				return false
			}
			_, ok := n.members.Member(node)
			return ok
		},
		Attach: func(ctx context.Context, image, node string) error {
			_, err := n.Attach(ctx, image, node)
			return err
		},
		Detach: func(ctx context.Context, image string) error {
			_, err := n.Detach(ctx, image)
			return err
		},
		Now: n.now,
		Log: n.log.With("component", "operate"),
	})
}

// CordonNode implements api.Service.
func (n *Node) CordonNode(ctx context.Context, node string, req api.CordonRequest) (api.NodeOperation, error) {
	if req.Cordoned {
		return n.op.Cordon(ctx, node, req.MoveOwners)
	}
	if req.MoveOwners {
		return api.NodeOperation{}, fmt.Errorf("%w: move_owners goes with a cordon (uncordon hands the moved owners back)", meta.ErrInvalid)
	}
	return n.op.Uncordon(ctx, node)
}

// DrainNode implements api.Service.
func (n *Node) DrainNode(ctx context.Context, node string, req api.DrainRequest) (api.NodeOperation, error) {
	return n.op.Drain(ctx, node, req)
}

// NodeOperation implements api.Service.
func (n *Node) NodeOperation(ctx context.Context, node string) (api.NodeOperation, error) {
	return n.op.Status(ctx, node)
}

// withNodeStates adds the operator's cordons and drains to nodes.
func (n *Node) withNodeStates(ctx context.Context, nodes []api.Node) []api.Node {
	states, _, err := n.cat.NodeStates(ctx)
	if err != nil {
		return nodes
	}
	for i := range nodes {
		if st, ok := states[nodes[i].Name]; ok {
			nodes[i].Cordoned, nodes[i].Draining = st.Cordoned || st.Drain != nil, st.Drain != nil
		}
	}
	return nodes
}

// SetGroup implements api.Service.
func (n *Node) SetGroup(ctx context.Context, g api.Group) (api.Group, error) {
	rule := placement.GroupRule{Kind: placement.GroupKind(g.Kind), Label: g.Label}
	if err := n.cat.SetGroupRule(ctx, g.Name, &rule); err != nil {
		return api.Group{}, err
	}
	return n.group(ctx, g.Name)
}

// Groups implements api.Service.
func (n *Node) Groups(ctx context.Context) ([]api.Group, error) {
	rules, bad, err := n.cat.GroupRules(ctx)
	if err != nil {
		return nil, err
	}
	for _, b := range bad {
		n.log.Warn("unreadable group rule", "err", b)
	}
	names := make([]string, 0, len(rules))
	for name := range rules {
		names = append(names, name)
	}
	sort.Strings(names)
	members, err := n.cat.GroupImages(ctx, names...)
	if err != nil {
		return nil, err
	}
	out := []api.Group{}
	for _, name := range names {
		g := api.Group{Name: name, Kind: string(rules[name].Kind), Label: rules[name].Label}
		for _, gi := range members[name] {
			g.Images = append(g.Images, gi.Name)
		}
		out = append(out, g)
	}
	return out, nil
}

func (n *Node) group(ctx context.Context, name string) (api.Group, error) {
	gs, err := n.Groups(ctx)
	if err != nil {
		return api.Group{}, err
	}
	for _, g := range gs {
		if g.Name == name {
			return g, nil
		}
	}
	return api.Group{}, fmt.Errorf("%w: no group %s", meta.ErrGroupNotFound, name)
}

// DeleteGroup implements api.Service: refused while images are in it.
func (n *Node) DeleteGroup(ctx context.Context, name string) error {
	members, err := n.cat.GroupImages(ctx, name)
	if err != nil {
		return err
	}
	if imgs := members[name]; len(imgs) > 0 {
		names := make([]string, len(imgs))
		for i, gi := range imgs {
			names[i] = gi.Name
		}
		return fmt.Errorf("%w: group %s has images (%v): take them out first (ukai image set IMAGE --group '')", meta.ErrRefused, name, names)
	}
	return n.cat.SetGroupRule(ctx, name, nil)
}
