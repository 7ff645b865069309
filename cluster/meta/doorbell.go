package meta

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// Doorbells. Every change of an image record touches, in the same atomic
// write (KV.CASTouch), one key per node the change concerns:
// <prefix>doorbells/<node>/<image name>, for the nodes the record names
// before or after the change (locations, owner, attached). A node watches
// only its own doorbells (one blocking query), learns from their
// ModifyIndexes which records changed, and reads those: what a change
// costs the cluster is a few small reads on the nodes it concerns, not a
// read of every record on every node (docs/architecture.md has the
// measurements). Nodes a record does not name (a node serving an image it
// holds no copy of) learn of changes on their I/O path and from a slow
// full listing.

func (c *Catalog) bellPrefix(node string) string { return c.prefix + "doorbells/" + node + "/" }

// bells returns the doorbell keys of every node the records name.
func (c *Catalog) bells(imgs ...Image) []string {
	var nodes []string
	for _, img := range imgs {
		nodes = append(nodes, img.Locations...)
		nodes = append(nodes, img.Owner, img.Attached)
	}
	slices.Sort(nodes)
	nodes = slices.Compact(nodes)
	var out []string
	for _, n := range nodes {
		if n == "" || !NodeNameRE.MatchString(n) {
			continue
		}
		out = append(out, c.bellPrefix(n)+imgs[0].Name)
	}
	return out
}

// Doorbells returns node's doorbells (image name -> ModifyIndex) and the
// store index of the read, for WatchDoorbells.
func (c *Catalog) Doorbells(ctx context.Context, node string) (map[string]uint64, uint64, error) {
	p := c.bellPrefix(node)
	entries, idx, err := c.kv.List(ctx, p)
	if err != nil {
		return nil, 0, fmt.Errorf("list the doorbells of %s: %w", node, err)
	}
	out := make(map[string]uint64, len(entries))
	for _, e := range entries {
		name := strings.TrimPrefix(e.Key, p)
		if ValidateRecordName(name) != nil {
			c.reportMalformed(e.Key, fmt.Errorf("not a doorbell: %q is not an image name", name))
			continue
		}
		out[name] = e.ModifyIndex
	}
	return out, idx, nil
}

// WatchDoorbells blocks until one of node's doorbells rang after index
// (KV.Watch semantics).
func (c *Catalog) WatchDoorbells(ctx context.Context, node string, index uint64) (uint64, error) {
	return c.kv.Watch(ctx, c.bellPrefix(node), index)
}

// ForgetDoorbell deletes node's doorbell of image name if it has not rung
// since index (a node no longer concerned by the image).
func (c *Catalog) ForgetDoorbell(ctx context.Context, node, name string, index uint64) error {
	err := c.kv.DeleteCAS(ctx, c.bellPrefix(node)+name, index)
	if err != nil && !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrConflict) {
		return fmt.Errorf("forget the doorbell of %s on %s: %w", name, node, err)
	}
	return nil
}
