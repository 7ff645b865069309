package node

import (
	"context"
	"slices"
	"sort"

	"github.com/ukai-storage/ukai/node/executor"
	"github.com/ukai-storage/ukai/node/metrics"
	"github.com/ukai-storage/ukai/placement"
)

// metricSource is what the node tells its metrics at scrape time (see
// metrics.Source). It reads only memory: the served set, the executor's
// last plans, the membership and the peer clients.
type metricSource struct{ n *Node }

// Images reports the images this node plans (executor.ShouldAct): each
// image by one node of the cluster. An owned image's counts come from its
// live maps; another's from its last plan here (unknown until one ran).
// An image nobody plans (no live owner, no live location) is reported by
// every node that serves it, all its blocks unprotected: its worst case
// must not be the one without series.
func (ms metricSource) Images() []metrics.ImageState {
	n := ms.n
	self := n.cfg.Node.Name
	var out []metrics.ImageState
	for _, s := range n.images.List(false) {
		rec := s.Record()
		owned := s.Owned()
		if rec.IsSnapshot() {
			continue
		}
		orphan := !owned && !(rec.Owner != "" && n.alive(rec.Owner)) && !slices.ContainsFunc(rec.Locations, n.alive)
		if !orphan && !executor.ShouldAct(rec, owned, self, n.alive) {
			continue
		}
		st := metrics.ImageState{Name: rec.Name, Owner: rec.Owner, Attached: rec.Attached, Size: rec.Size, BlockSize: rec.BlockSize, Wanted: len(rec.Locations)}
		if orphan {
			// No live copy: every block unprotected; the copies' own
			// counts are not known here (LocationState.Unknown).
			for _, loc := range rec.Locations {
				st.Locations = append(st.Locations, metrics.LocationState{Node: loc, Unknown: true})
			}
			st.Known, st.Unprotected = true, rec.Blocks()
			out = append(out, st)
			continue
		}
		rep, planned := n.exec.Report(rec.Name)
		if planned && rep.Wanted > 0 {
			st.Wanted = rep.Wanted
		}
		var maps map[string]*placement.BlockMap
		if owned {
			maps = s.Maps()
		}
		var live []*placement.BlockMap
		st.Known = owned || planned
		for _, loc := range rec.Locations {
			l := metrics.LocationState{Node: loc, Alive: n.alive(loc)}
			_, inReport := rep.OutOfSync[loc]
			switch bm := maps[loc]; {
			case bm != nil:
				l.OutOfSync, l.Syncing = bm.Count(placement.OutOfSync), bm.Count(placement.Syncing)
				if l.Alive {
					live = append(live, bm)
				}
			case !owned && inReport:
				l.OutOfSync, l.Syncing = rep.OutOfSync[loc], rep.Syncing[loc]
			default:
				st.Known = false // a location its maps or plan do not cover
			}
			st.Locations = append(st.Locations, l)
		}
		switch {
		case owned:
			st.Unprotected = placement.Unprotected(rec.Blocks(), live)
		case planned:
			st.Unprotected = rep.Unprotected
		}
		out = append(out, st)
	}
	return out
}

// Peers reports the peer clients, by node name.
func (ms metricSource) Peers() []metrics.PeerStats {
	n := ms.n
	names := map[string]string{}
	if n.members != nil {
		for _, m := range n.members.Members() {
			if m.Meta.Peer != "" {
				names[m.Meta.Peer] = m.Name
			}
		}
	}
	n.peersMu.Lock()
	out := make([]metrics.PeerStats, 0, len(n.peers))
	for addr, c := range n.peers {
		name := names[addr]
		if name == "" {
			name = addr
		}
		st := c.Stats()
		out = append(out, metrics.PeerStats{Peer: name, RTT: c.RTT(), Requests: st.Requests, Errors: st.Errors, SentBytes: st.SentBytes, RecvBytes: st.RecvBytes})
	}
	n.peersMu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Peer < out[j].Peer })
	return out
}

// Node reports the node's own state.
func (ms metricSource) Node() metrics.NodeStats {
	n := ms.n
	// The counters `ukai stats` shows, read the same way.
	sst, _ := n.Stats(context.Background())
	st := metrics.NodeStats{
		Members:        map[string]int{},
		Sessions:       sst.Sessions,
		Served:         sst.Images,
		Owned:          len(n.images.List(true)),
		PlannerRounds:  sst.PlacementRounds,
		PlannerActions: n.exec.Actions(),
		Settled:        sst.Settled,
		SyncBytes:      sst.SyncBytes,
		SyncCap:        n.exec.NodeCap(),
		PeerBytesIn:    sst.PeerBytesIn,
		PeerBytesOut:   sst.PeerBytesOut,
	}
	if n.members != nil {
		for _, m := range n.members.Members() {
			st.Members[string(m.State)]++
		}
	} else {
		st.Members["alive"] = 1
	}
	n.storeMu.Lock()
	st.StoreOK = n.storeOK
	n.storeMu.Unlock()
	st.SessionRenewals = n.session.Renewals()
	return st
}
