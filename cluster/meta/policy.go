package meta

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/ukai-storage/ukai/placement"
)

// Operator decisions live beside the metadata:
//
//	<prefix>policies/images/<name>        ImagePolicy (replicas, locations, labels, relocation)
//	<prefix>policies/sync/default         SyncPolicy for everything
//	<prefix>policies/sync/nodes/<node>    SyncPolicy for syncs from or to a node (its cap is per node)
//	<prefix>policies/sync/images/<name>   SyncPolicy of one image
//
// Each value is JSON with a "version" field; unknown versions are reported
// with their key and never rewritten.

// PolicyVersion is the policy record format.
const PolicyVersion = 1

type imagePolicyRecord struct {
	Version int `json:"version"`
	placement.ImagePolicy
}

type syncPolicyRecord struct {
	Version int `json:"version"`
	placement.SyncPolicy
}

// SyncScope names whose sync policy: "default", "nodes/<node>" or
// "images/<image>".
type SyncScope string

// Sync policy scopes.
func DefaultScope() SyncScope           { return "default" }
func NodeScope(node string) SyncScope   { return SyncScope("nodes/" + node) }
func ImageScope(image string) SyncScope { return SyncScope("images/" + image) }

// PoliciesPrefix is the key prefix of the operator's decisions, for watches.
func (c *Catalog) PoliciesPrefix() string { return c.prefix + "policies/" }

func (c *Catalog) imagePolicyKey(name string) string { return c.prefix + "policies/images/" + name }
func (c *Catalog) syncPolicyKey(s SyncScope) string  { return c.prefix + "policies/sync/" + string(s) }

// ImagePolicy returns the image's policy (zero when none) and its index.
func (c *Catalog) ImagePolicy(ctx context.Context, name string) (placement.ImagePolicy, uint64, error) {
	e, err := c.kv.Get(ctx, c.imagePolicyKey(name))
	if errors.Is(err, ErrNotFound) {
		return placement.ImagePolicy{}, 0, nil
	}
	if err != nil {
		return placement.ImagePolicy{}, 0, fmt.Errorf("read policy of %q: %w", name, err)
	}
	var r imagePolicyRecord
	if err := json.Unmarshal(e.Value, &r); err != nil {
		return placement.ImagePolicy{}, 0, &MalformedError{Key: e.Key, Err: err}
	}
	if r.Version != PolicyVersion {
		return placement.ImagePolicy{}, 0, &MalformedError{Key: e.Key, Err: fmt.Errorf("unknown policy version %d", r.Version)}
	}
	return r.ImagePolicy, e.ModifyIndex, nil
}

// UpdateImagePolicy applies fn to the image's policy with check-and-set.
func (c *Catalog) UpdateImagePolicy(ctx context.Context, name string, fn func(*placement.ImagePolicy) error) (placement.ImagePolicy, error) {
	for range maxCASRetries {
		p, idx, err := c.ImagePolicy(ctx, name)
		if err != nil {
			return p, err
		}
		if err := fn(&p); err != nil {
			return p, err
		}
		data, err := json.Marshal(imagePolicyRecord{Version: PolicyVersion, ImagePolicy: p})
		if err != nil {
			return p, err
		}
		err = c.kv.CAS(ctx, c.imagePolicyKey(name), data, idx)
		if err == nil {
			return p, nil
		}
		if !errors.Is(err, ErrConflict) {
			return p, fmt.Errorf("write policy of %q: %w", name, err)
		}
	}
	return placement.ImagePolicy{}, fmt.Errorf("policy of %q: too much contention: %w", name, ErrConflict)
}

// SyncPolicy returns the sync policy of a scope; ok is false when none is
// set.
func (c *Catalog) SyncPolicy(ctx context.Context, s SyncScope) (p placement.SyncPolicy, ok bool, err error) {
	e, err := c.kv.Get(ctx, c.syncPolicyKey(s))
	if errors.Is(err, ErrNotFound) {
		return p, false, nil
	}
	if err != nil {
		return p, false, fmt.Errorf("read sync policy %s: %w", s, err)
	}
	var r syncPolicyRecord
	if err := json.Unmarshal(e.Value, &r); err != nil {
		return p, false, &MalformedError{Key: e.Key, Err: err}
	}
	if r.Version != PolicyVersion {
		return p, false, &MalformedError{Key: e.Key, Err: fmt.Errorf("unknown policy version %d", r.Version)}
	}
	return r.SyncPolicy, true, nil
}

// SetSyncPolicy stores (or, with nil, removes) the sync policy of a scope.
func (c *Catalog) SetSyncPolicy(ctx context.Context, s SyncScope, p *placement.SyncPolicy) error {
	key := c.syncPolicyKey(s)
	if p != nil {
		data, err := json.Marshal(syncPolicyRecord{Version: PolicyVersion, SyncPolicy: *p})
		if err != nil {
			return err
		}
		return c.put(ctx, key, data)
	}
	for range maxCASRetries {
		e, err := c.kv.Get(ctx, key)
		if errors.Is(err, ErrNotFound) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("sync policy %s: %w", s, err)
		}
		err = c.kv.DeleteCAS(ctx, key, e.ModifyIndex)
		if err == nil || errors.Is(err, ErrNotFound) {
			return nil
		}
		if !errors.Is(err, ErrConflict) {
			return fmt.Errorf("delete sync policy %s: %w", s, err)
		}
	}
	return fmt.Errorf("sync policy %s: too much contention: %w", s, ErrConflict)
}

// SyncPolicies returns every sync policy: default (if set), per node, per
// image, and MalformedErrors for values that cannot be read.
func (c *Catalog) SyncPolicies(ctx context.Context) (def *placement.SyncPolicy, nodes, images map[string]placement.SyncPolicy, bad []error, err error) {
	entries, _, err := c.kv.List(ctx, c.prefix+"policies/sync/")
	if err != nil {
		return nil, nil, nil, nil, fmt.Errorf("list sync policies: %w", err)
	}
	nodes, images = map[string]placement.SyncPolicy{}, map[string]placement.SyncPolicy{}
	for _, e := range entries {
		var r syncPolicyRecord
		if err := json.Unmarshal(e.Value, &r); err != nil || r.Version != PolicyVersion {
			if err == nil {
				err = fmt.Errorf("unknown policy version %d", r.Version)
			}
			bad = append(bad, &MalformedError{Key: e.Key, Err: err})
			continue
		}
		scope := e.Key[len(c.prefix+"policies/sync/"):]
		switch {
		case scope == "default":
			p := r.SyncPolicy
			def = &p
		case len(scope) > 6 && scope[:6] == "nodes/":
			nodes[scope[6:]] = r.SyncPolicy
		case len(scope) > 7 && scope[:7] == "images/":
			images[scope[7:]] = r.SyncPolicy
		default:
			bad = append(bad, &MalformedError{Key: e.Key, Err: errors.New("unknown sync policy scope")})
		}
	}
	return def, nodes, images, bad, nil
}

// UpdateSyncPolicy applies fn to a scope's sync policy with check-and-set
// (fn sees the zero policy when there is none, or when the stored one
// cannot be read: it is reported and replaced). A policy left with
// nothing in it is deleted. fn's error is returned as is.
func (c *Catalog) UpdateSyncPolicy(ctx context.Context, s SyncScope, fn func(p *placement.SyncPolicy) error) (placement.SyncPolicy, error) {
	key := c.syncPolicyKey(s)
	for range maxCASRetries {
		var p placement.SyncPolicy
		var idx uint64
		e, err := c.kv.Get(ctx, key)
		switch {
		case errors.Is(err, ErrNotFound):
		case err != nil:
			return p, fmt.Errorf("sync policy %s: %w", s, err)
		default:
			idx = e.ModifyIndex
			var r syncPolicyRecord
			if err := json.Unmarshal(e.Value, &r); err != nil || r.Version != PolicyVersion {
				c.reportMalformed(key, fmt.Errorf("sync policy replaced: %v (version %d)", err, r.Version))
			} else {
				p = r.SyncPolicy
			}
		}
		if err := fn(&p); err != nil {
			return p, err
		}
		empty := len(p.Windows) == 0 && p.MaxRate == 0 && p.TZ == "" && len(p.AllOf) == 0
		err = c.casOrDelete(ctx, key, idx, empty, syncPolicyRecord{Version: PolicyVersion, SyncPolicy: p})
		if err == nil {
			return p, nil
		}
		if !errors.Is(err, ErrConflict) && !errors.Is(err, ErrNotFound) {
			return p, fmt.Errorf("write sync policy %s: %w", s, err)
		}
	}
	return placement.SyncPolicy{}, fmt.Errorf("sync policy %s: too much contention: %w", s, ErrConflict)
}

// NodeKnown says whether a node ever started in this cluster: it holds a
// target port number (ports.go), handed out on its first start.
func (c *Catalog) NodeKnown(ctx context.Context, node string) (bool, error) {
	entries, _, err := c.kv.List(ctx, c.portPrefix())
	if err != nil {
		return false, fmt.Errorf("list the nodes: %w", err)
	}
	for _, e := range entries {
		if string(e.Value) == node {
			return true, nil
		}
	}
	return false, nil
}
