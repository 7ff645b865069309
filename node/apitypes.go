package node

import (
	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/placement"
)

// The placement package's types as the API carries them.

func apiImagePolicy(p placement.ImagePolicy) api.ImagePolicy {
	out := api.ImagePolicy{Replicas: p.Replicas, Locations: p.Locations, PreferLabels: p.PreferLabels, SpreadBy: p.SpreadBy,
		Group: p.Group, Locality: string(p.Locality), AllowRemote: p.AllowRemote}
	if r := p.Relocate; r != nil {
		out.Relocate = &api.Relocation{To: r.To, From: r.From, Started: r.Started}
	}
	return out
}

func apiSyncPolicy(p placement.SyncPolicy) api.SyncPolicy {
	out := api.SyncPolicy{TZ: p.TZ, MaxRate: p.MaxRate}
	for _, w := range p.Windows {
		out.Windows = append(out.Windows, api.Window{Start: w.Start, End: w.End})
	}
	for _, a := range p.AllOf {
		out.AllOf = append(out.AllOf, apiSyncPolicy(a))
	}
	return out
}

func apiSyncPolicies(m map[string]placement.SyncPolicy) map[string]api.SyncPolicy {
	out := make(map[string]api.SyncPolicy, len(m))
	for k, v := range m {
		out[k] = apiSyncPolicy(v)
	}
	return out
}

func apiActions(as []placement.Action) []api.Action {
	if as == nil {
		return nil
	}
	out := make([]api.Action, len(as))
	for i, a := range as {
		out[i] = api.Action{Kind: string(a.Kind), Image: a.Image, Node: a.Node, From: a.From, To: a.To, Rate: a.Rate,
			Deadline: a.Deadline, Until: a.Until, Count: a.Count, Reason: a.Reason}
	}
	return out
}
