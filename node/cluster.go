package node

import (
	"context"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/membership"
	"github.com/ukai-storage/ukai/cluster/meta"
)

// diskSpace returns the capacity and free bytes of the data dir.
func (n *Node) diskSpace() (int64, int64) {
	var st unix.Statfs_t
	if err := unix.Statfs(n.cfg.Node.DataDir, &st); err != nil {
		return 0, 0
	}
	return int64(st.Blocks) * st.Bsize, int64(st.Bavail) * st.Bsize
}

func (n *Node) gossipMeta() membership.NodeMeta {
	capacity, free := n.diskSpace()
	return membership.NodeMeta{
		API: n.apiLn.Addr().String(), ISCSI: n.iscsiAdvertise(), Port: n.port, Peer: n.peerAddr(),
		Labels: n.cfg.Node.Labels, Capacity: capacity, Free: free, Version: n.version,
	}
}

// iscsiAdvertise is the portal address initiators use.
func (n *Node) iscsiAdvertise() string {
	if n.cfg.ISCSI.Advertise != "" {
		return n.cfg.ISCSI.Advertise
	}
	return n.target.Addr().String()
}

func (n *Node) peerAddr() string {
	if n.peerSrv == nil {
		return ""
	}
	if n.cfg.Peer.Advertise != "" {
		return n.cfg.Peer.Advertise
	}
	return n.peerSrv.Addr().String()
}

// joinCluster starts gossip and joins the seeds. A name already used by a
// live node is fatal; seeds that do not answer are not (a node restarting
// while its seeds are down must still serve): it keeps trying in the
// background (reconnect).
func (n *Node) joinCluster(ctx context.Context) (*membership.Agent, error) {
	g := n.cfg.Gossip
	key, _ := g.Key() // validated with the config
	a, err := membership.New(ctx, membership.Config{
		Name: n.cfg.Node.Name, Bind: g.Bind, Advertise: g.Advertise, SecretKey: key,
		ProbeInterval: g.ProbeInterval, ProbeTimeout: g.ProbeTimeout, GossipInterval: g.GossipInterval,
		SuspicionMult: g.SuspicionMult, Logger: n.log.With("component", "gossip"),
	}, n.gossipMeta())
	if err != nil {
		return nil, fmt.Errorf("gossip: %w", err)
	}
	if len(g.Join) > 0 {
		jctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := a.Rejoin(jctx, g.Join...)
		cancel()
		var nc *membership.NameConflictError
		if errors.As(err, &nc) {
			a.Shutdown()
			return nil, fmt.Errorf("gossip: %w", err)
		}
		if err != nil {
			n.log.Error("no gossip seed answered; running alone and retrying", "seeds", g.Join, "err", err)
		}
	}
	return a, nil
}

// reconnect keeps the cluster whole: while no other node is alive it
// retries the seeds, and it retries nodes seen dead, so that a node that
// restarts (with or without seeds of its own) is found again.
func (n *Node) reconnect(ctx context.Context) {
	every(ctx, 3*time.Second, func() {
		var targets []string
		aliveOthers := 0
		for _, m := range n.members.Members() {
			switch {
			case m.Name == n.cfg.Node.Name:
			case m.State == membership.StateAlive:
				aliveOthers++
			case m.State == membership.StateDead && m.Addr != "":
				targets = append(targets, m.Addr)
			}
		}
		if aliveOthers == 0 {
			targets = append(targets, n.cfg.Gossip.Join...)
		}
		for _, addr := range targets {
			jctx, cancel := context.WithTimeout(ctx, time.Second)
			err := n.members.Rejoin(jctx, addr)
			cancel()
			var nc *membership.NameConflictError
			if errors.As(err, &nc) {
				n.log.Error("gossip name conflict", "err", err)
			}
		}
	})
}

// refreshMeta re-gossips the node's free space while it changes.
func (n *Node) refreshMeta(ctx context.Context) {
	last := n.gossipMeta()
	every(ctx, 30*time.Second, func() {
		m := n.gossipMeta()
		if m.Free/(64<<20) == last.Free/(64<<20) {
			return
		}
		if err := n.members.SetMeta(ctx, m); err != nil {
			n.log.Warn("cannot update gossiped metadata", "err", err)
			return
		}
		last = m
	})
}

// imagesHeld maps node name to the images with a copy on it. It returns
// nil when the catalog cannot be read.
func (n *Node) imagesHeld(ctx context.Context) map[string][]string {
	imgs, _, _, err := n.cat.ListImages(ctx)
	n.noteStore(err)
	if err != nil {
		return nil
	}
	held := map[string][]string{}
	for _, img := range imgs {
		for _, loc := range img.Locations {
			held[loc] = append(held[loc], img.Name)
		}
	}
	return held
}

// ListNodes implements api.Service: every member gossip has seen, with its
// state, or only this node when it runs without gossip.
func (n *Node) ListNodes(ctx context.Context) ([]api.Node, error) {
	held := n.imagesHeld(ctx)
	if n.members == nil {
		self, _ := n.NodeInfo(ctx)
		return []api.Node{self}, nil
	}
	var out []api.Node
	for _, m := range n.members.Members() {
		out = append(out, memberNode(m, held))
	}
	return n.withNodeStates(ctx, out), nil
}

// GetNode implements api.Service.
func (n *Node) GetNode(ctx context.Context, name string) (api.Node, error) {
	if name == n.cfg.Node.Name {
		return n.NodeInfo(ctx)
	}
	if n.members != nil {
		if m, ok := n.members.Member(name); ok {
			return n.withNodeStates(ctx, []api.Node{memberNode(m, n.imagesHeld(ctx))})[0], nil
		}
	}
	return api.Node{}, fmt.Errorf("node %q: %w", name, meta.ErrNodeNotFound)
}

func memberNode(m membership.Member, held map[string][]string) api.Node {
	out := api.Node{
		Name: m.Name, State: string(m.State), Since: m.Since, GossipAddr: m.Addr,
		APIAddr: m.Meta.API, ISCSIAddr: m.Meta.ISCSI, PeerAddr: m.Meta.Peer, Labels: m.Meta.Labels,
		Capacity: m.Meta.Capacity, Free: m.Meta.Free, Version: m.Meta.Version, Images: held[m.Name],
	}
	if held == nil {
		out.Images = nil
	} else if out.Images == nil {
		out.Images = []string{}
	}
	return out
}

// NodeInfo implements api.Service: this node, with its iSCSI sessions.
func (n *Node) NodeInfo(ctx context.Context) (api.Node, error) {
	out := api.Node{
		Name: n.cfg.Node.Name, State: "alive", Version: n.version, Labels: n.cfg.Node.Labels,
		APIAddr: n.apiLn.Addr().String(), ISCSIAddr: n.target.Addr().String(), GossipAddr: n.cfg.Gossip.Advertise, PeerAddr: n.peerAddr(),
		IQNPrefix: n.cfg.ISCSI.IQNPrefix, Metadata: n.cfg.Metadata.Backend, StartedAt: n.started, Since: n.started,
		Exported: []string{}, Sessions: []api.Session{},
	}
	if out.GossipAddr == "" {
		out.GossipAddr = n.cfg.Gossip.Bind
	}
	out.Capacity, out.Free = n.diskSpace()
	if held := n.imagesHeld(ctx); held != nil {
		out.Images = held[n.cfg.Node.Name]
		if out.Images == nil {
			out.Images = []string{}
		}
	}
	out.Exported = n.images.Names()
	for _, s := range n.target.Sessions() {
		if s.Discovery {
			continue
		}
		out.Sessions = append(out.Sessions, api.Session{
			Initiator: s.InitiatorName, ISID: s.ISID, Target: s.Target, Remote: s.RemoteAddr,
			Commands: s.Commands, BytesIn: s.BytesIn, BytesOut: s.BytesOut,
		})
	}
	return n.withNodeStates(ctx, []api.Node{out})[0], nil
}
