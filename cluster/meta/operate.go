package meta

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/ukai-storage/ukai/placement"
)

// The operator's decisions about nodes and groups live beside the other
// policies (so the placement executors' one watch on the policies sees
// them change):
//
//	<prefix>policies/nodes/<node>    NodeState: cordoned, a drain in progress
//	<prefix>policies/groups/<name>   GroupRule: affinity or anti-affinity on a label
//
// Each is JSON with a "version" field, like the other policies.

// NodeState is what the operator decided about one node.
type NodeState struct {
	// Cordoned: no new copy is placed on the node.
	Cordoned bool `json:"cordoned,omitempty"`
	// Drain, when set, moves every copy off the node (it implies
	// Cordoned).
	Drain *Drain `json:"drain,omitempty"`
	// Moved are the images whose ownership a cordon or drain with
	// --move-owners handed to other nodes (image: node), for uncordon to
	// hand back.
	Moved map[string]string `json:"moved,omitempty"`
	// Unreadable (not stored) marks a stored state UpdateNodeState could
	// not read (malformed, or a newer version): it reaches fn as
	// cordoned, and only a change that clears it all (uncordon) should
	// replace it.
	Unreadable bool `json:"-"`
	// WasAttached are those of Moved that were attached to the node
	// before (an orchestrator's pin): uncordon attaches them back and
	// leaves them so.
	WasAttached []string `json:"was_attached,omitempty"`
}

// Drain is a drain in progress.
type Drain struct {
	Started time.Time `json:"started"`
	// Now: the drain's copies ignore sync windows and rate caps.
	Now bool `json:"now,omitempty"`
	// MoveOwners: the images the node owned were handed to other nodes
	// (attached there; NodeState.Moved).
	MoveOwners bool `json:"move_owners,omitempty"`
	// Images had a copy on the node when the drain started (its progress
	// counts them).
	Images []string `json:"images,omitempty"`
}

// ErrRefused is an operator's request that cannot be done as asked (a
// node cordoned twice, a drain that cannot finish); nothing was changed.
var ErrRefused = errors.New("refused")

// ErrGroupNotFound: no group of that name.
var ErrGroupNotFound = errors.New("group not found")

type nodeStateRecord struct {
	Version int `json:"version"`
	NodeState
}

type groupRecord struct {
	Version int `json:"version"`
	placement.GroupRule
}

func (c *Catalog) nodeStatePrefix() string         { return c.prefix + "policies/nodes/" }
func (c *Catalog) groupPrefix() string             { return c.prefix + "policies/groups/" }
func (c *Catalog) nodeStateKey(node string) string { return c.nodeStatePrefix() + node }
func (c *Catalog) groupKey(name string) string     { return c.groupPrefix() + name }

// NodeStates returns the state of every node with one (nodes without are
// neither cordoned nor draining), and MalformedErrors for the values that
// cannot be read: such a node is treated as cordoned, the safe reading
// (no copy is placed there, none is moved away).
func (c *Catalog) NodeStates(ctx context.Context) (map[string]NodeState, []error, error) {
	entries, _, err := c.kv.List(ctx, c.nodeStatePrefix())
	if err != nil {
		return nil, nil, fmt.Errorf("list node states: %w", err)
	}
	out := map[string]NodeState{}
	var bad []error
	for _, e := range entries {
		node := strings.TrimPrefix(e.Key, c.nodeStatePrefix())
		st, err := decodeNodeState(e)
		if err != nil {
			bad = append(bad, err)
			st = NodeState{Cordoned: true}
		}
		out[node] = st
	}
	return out, bad, nil
}

func decodeNodeState(e Entry) (NodeState, error) {
	var r nodeStateRecord
	if err := json.Unmarshal(e.Value, &r); err != nil {
		return NodeState{}, &MalformedError{Key: e.Key, Err: err}
	}
	if r.Version != PolicyVersion {
		return NodeState{}, &MalformedError{Key: e.Key, Err: fmt.Errorf("unknown node state version %d", r.Version)}
	}
	return r.NodeState, nil
}

// UpdateNodeState applies fn to a node's state with check-and-set; a
// state left with nothing set is deleted. fn's error is returned as is
// and nothing is written. A stored state that cannot be read reaches fn
// as cordoned (as NodeStates reads it), so that the operator can fix it
// with a cordon or an uncordon instead of editing the store.
func (c *Catalog) UpdateNodeState(ctx context.Context, node string, fn func(*NodeState) error) (NodeState, error) {
	key := c.nodeStateKey(node)
	for range maxCASRetries {
		var st NodeState
		var idx uint64
		e, err := c.kv.Get(ctx, key)
		switch {
		case errors.Is(err, ErrNotFound):
		case err != nil:
			return st, fmt.Errorf("read the state of node %s: %w", node, err)
		default:
			if st, err = decodeNodeState(e); err != nil {
				st = NodeState{Cordoned: true, Unreadable: true}
			}
			idx = e.ModifyIndex
		}
		if err := fn(&st); err != nil {
			return st, err
		}
		empty := !st.Cordoned && st.Drain == nil && len(st.Moved) == 0
		err = c.casOrDelete(ctx, key, idx, empty, nodeStateRecord{Version: PolicyVersion, NodeState: st})
		if err == nil {
			return st, nil
		}
		if !errors.Is(err, ErrConflict) && !errors.Is(err, ErrNotFound) {
			return st, fmt.Errorf("write the state of node %s: %w", node, err)
		}
	}
	return NodeState{}, fmt.Errorf("state of node %s: too much contention: %w", node, ErrConflict)
}

// GroupRules returns every group's rule and MalformedErrors for those
// that cannot be read (their images are then refused by the planner:
// "group has no rule").
func (c *Catalog) GroupRules(ctx context.Context) (map[string]placement.GroupRule, []error, error) {
	entries, _, err := c.kv.List(ctx, c.groupPrefix())
	if err != nil {
		return nil, nil, fmt.Errorf("list groups: %w", err)
	}
	out := map[string]placement.GroupRule{}
	var bad []error
	for _, e := range entries {
		var r groupRecord
		if err := json.Unmarshal(e.Value, &r); err != nil {
			bad = append(bad, &MalformedError{Key: e.Key, Err: err})
			continue
		}
		if r.Version != PolicyVersion {
			bad = append(bad, &MalformedError{Key: e.Key, Err: fmt.Errorf("unknown group version %d", r.Version)})
			continue
		}
		if err := r.GroupRule.Validate(); err != nil {
			bad = append(bad, &MalformedError{Key: e.Key, Err: err})
			continue
		}
		out[strings.TrimPrefix(e.Key, c.groupPrefix())] = r.GroupRule
	}
	return out, bad, nil
}

// SetGroupRule stores (or, with nil, removes) a group's rule.
func (c *Catalog) SetGroupRule(ctx context.Context, name string, g *placement.GroupRule) error {
	if !placement.ValidGroupName(name) {
		return fmt.Errorf("%w: group %q: want 1-64 letters, digits, '.', '_' or '-'", ErrInvalid, name)
	}
	key := c.groupKey(name)
	if g != nil {
		if err := g.Validate(); err != nil {
			return fmt.Errorf("%w: %v", ErrInvalid, err)
		}
		data, err := json.Marshal(groupRecord{Version: PolicyVersion, GroupRule: *g})
		if err != nil {
			return err
		}
		return c.put(ctx, key, data)
	}
	e, err := c.kv.Get(ctx, key)
	if errors.Is(err, ErrNotFound) {
		return fmt.Errorf("%w: no group %s", ErrGroupNotFound, name)
	}
	if err != nil {
		return fmt.Errorf("group %s: %w", name, err)
	}
	if err := c.kv.DeleteCAS(ctx, key, e.ModifyIndex); err != nil && !errors.Is(err, ErrNotFound) {
		return fmt.Errorf("delete group %s: %w", name, err)
	}
	return nil
}

// GroupImages returns the images of every group named in groups, each
// with its locations and the copies it wants. It lists the image
// policies (one read) and reads the record of each member: a cost paid
// only by the plans of grouped images, which run when something they
// depend on moves.
func (c *Catalog) GroupImages(ctx context.Context, groups ...string) (map[string][]placement.GroupImage, error) {
	want := map[string]bool{}
	for _, g := range groups {
		if g != "" {
			want[g] = true
		}
	}
	out := map[string][]placement.GroupImage{}
	if len(want) == 0 {
		return out, nil
	}
	prefix := c.prefix + "policies/images/"
	entries, _, err := c.kv.List(ctx, prefix)
	if err != nil {
		return nil, fmt.Errorf("list image policies: %w", err)
	}
	for _, e := range entries {
		var r imagePolicyRecord
		if json.Unmarshal(e.Value, &r) != nil || r.Version != PolicyVersion || !want[r.Group] {
			continue
		}
		name := strings.TrimPrefix(e.Key, prefix)
		img, _, err := c.GetImage(ctx, name)
		if errors.Is(err, ErrImageNotFound) || errors.Is(err, ErrNotFound) {
			continue // a policy left by a deleted image
		}
		if err != nil {
			return nil, fmt.Errorf("group %s: image %s: %w", r.Group, name, err)
		}
		is := placement.ImageState{Locations: img.Locations, Policy: r.ImagePolicy}
		out[r.Group] = append(out[r.Group], placement.GroupImage{Name: name, Locations: img.Locations, Copies: placement.Copies(is)})
	}
	for g := range out {
		sort.Slice(out[g], func(i, j int) bool { return out[g][i].Name < out[g][j].Name })
	}
	return out, nil
}

// casOrDelete is the write step of a read-modify-write of the record at
// key read with index idx (0: there was none): an empty record is deleted
// (nothing to do when there was none), any other is written as JSON, both
// with check-and-set.
func (c *Catalog) casOrDelete(ctx context.Context, key string, idx uint64, empty bool, record any) error {
	if empty {
		if idx == 0 {
			return nil
		}
		return c.kv.DeleteCAS(ctx, key, idx)
	}
	data, err := json.Marshal(record)
	if err != nil {
		return err
	}
	return c.kv.CAS(ctx, key, data, idx)
}
