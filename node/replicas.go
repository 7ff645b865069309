package node

import (
	"context"
	"errors"
	"fmt"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/cluster/peer"
	"github.com/ukai-storage/ukai/node/admit"
	"github.com/ukai-storage/ukai/node/served"
	"github.com/ukai-storage/ukai/placement"
	"github.com/ukai-storage/ukai/target/lun"
)

// replicas builds the volume's view of img: one replica per location (the
// local file, or the peer copy through the data transport) and the block
// maps from the catalog. With cached (catalog maybe unreachable) only the
// local copy is used, with the map it had: in sync.
func (n *Node) replicas(ctx context.Context, s *served.Image, img meta.Image, cached bool) ([]*lun.Replica, map[string]*placement.BlockMap, error) {
	var reps []*lun.Replica
	maps := map[string]*placement.BlockMap{}
	ref := peer.Ref{ID: img.ID, Gen: img.Generation}
	for _, loc := range img.Locations {
		if cached && loc != n.cfg.Node.Name {
			continue
		}
		if cached {
			maps[loc] = placement.NewBlockMap(img.Blocks(), placement.InSync)
		} else {
			bm, err := n.cat.BlockMap(ctx, img, loc)
			if err != nil {
				return nil, nil, err
			}
			maps[loc] = bm
		}
		if loc == n.cfg.Node.Name {
			reps = append(reps, &lun.Replica{Node: loc, Copy: ownCopy{admit.SharedCopy{FileCopy: s.Local}, n, s, img.ID}, Local: true})
			continue
		}
		c := n.peerClient(loc)
		if c == nil {
			reps = append(reps, &lun.Replica{Node: loc, Copy: unreachableCopy{node: loc}})
			continue
		}
		reps = append(reps, &lun.Replica{Node: loc, Copy: remoteCopy{Copy: peer.RemoteCopy(c, ref), c: c, ref: ref, bs: img.BlockSize}, RTT: c.RTT})
	}
	return reps, maps, nil
}

// ownCopy is the owner's view of its local copy. Its writes and unmaps
// pass the checks a peer's would, at the moment they land rather than when
// the I/O began: the session the node owns the image with must still be
// valid by its own clock, and the copy's gate (peer.Server.Admit) must not
// have seen a newer owner. A write passes the owner's checks once, at the
// start (acquire); it may then wait (a block lock, the activity log's
// record, a paused process) while the image changes hands. Chaos seed 111
// saw such a write land on the deposed owner's copy after the new owner
// had written the block there, a copy recorded in sync: a read 3 s after
// two newer acknowledged writes returned the older value. Refused, the
// write fails and the copy is recorded out of sync, which the deposed
// owner's records cannot be: it is not acknowledged.
//
// Fence fences the same gate, so that a sync or reconcile into the copy
// waits for, and then refuses, writes a former owner sent to it.
type ownCopy struct {
	admit.SharedCopy
	n  *Node
	s  *served.Image
	id string // the image's id (a served image keeps it)
}

// errDeposed refuses a local write of a node that may no longer own the
// image.
var errDeposed = errors.New("this node's ownership session is no longer valid")

// ref is the copy as the owner writes it: the generation it took the
// image with.
func (o ownCopy) ref() peer.Ref {
	return peer.Ref{ID: o.id, Gen: o.s.OwnedGen.Load()}
}

func (o ownCopy) admit(ctx context.Context) (leave func(), err error) {
	if !o.s.Offline.Load() && !o.n.session.Valid(o.s.Session()) {
		return nil, fmt.Errorf("local copy of %s: %w", o.s.Record().Name, errDeposed)
	}
	if o.n.peerSrv == nil {
		return func() {}, nil
	}
	leave, err = o.n.peerSrv.Admit(ctx, o.ref())
	if err != nil {
		return nil, fmt.Errorf("local copy of %s: %w", o.s.Record().Name, err)
	}
	return leave, nil
}

func (o ownCopy) WriteAt(ctx context.Context, p []byte, off int64, durable bool) error {
	leave, err := o.admit(ctx)
	if err != nil {
		return err
	}
	defer leave()
	return o.SharedCopy.WriteAt(ctx, p, off, durable)
}

func (o ownCopy) Unmap(ctx context.Context, off, n int64) error {
	leave, err := o.admit(ctx)
	if err != nil {
		return err
	}
	defer leave()
	return o.SharedCopy.Unmap(ctx, off, n)
}

func (o ownCopy) Fence(ctx context.Context) error {
	if o.n.peerSrv == nil {
		return nil
	}
	return o.n.peerSrv.Fence(ctx, o.ref())
}

// remoteCopy adds block checksums computed on the peer.
type remoteCopy struct {
	lun.Copy
	c   *peer.Client
	ref peer.Ref
	bs  int64
}

// Fence implements lun.Fencer (the peer copy's epoch).
func (r remoteCopy) Fence(ctx context.Context) error {
	if f, ok := r.Copy.(lun.Fencer); ok {
		return f.Fence(ctx)
	}
	return nil
}

func (r remoteCopy) Checksum(ctx context.Context, off, n int64) ([32]byte, error) {
	if off%r.bs != 0 || n > r.bs {
		return [32]byte{}, fmt.Errorf("checksum of %d+%d is not one block", off, n)
	}
	sums, err := r.c.Checksums(ctx, r.ref, off/r.bs, off/r.bs+1)
	if err != nil {
		return [32]byte{}, err
	}
	if len(sums) != 1 {
		return [32]byte{}, fmt.Errorf("peer returned %d checksums for one block", len(sums))
	}
	return sums[0], nil
}

// unreachableCopy stands for a location whose node is not known to the
// membership (no data address): every request fails, so the volume
// records it out of sync rather than waiting.
type unreachableCopy struct{ node string }

var errUnknownPeer = errors.New("no data address known for the node (not in the membership, or peer.listen unset)")

func (u unreachableCopy) ReadAt(context.Context, []byte, int64) error { return u.err() }
func (u unreachableCopy) WriteAt(context.Context, []byte, int64, bool) error {
	return u.err()
}
func (u unreachableCopy) Sync(context.Context) error                { return u.err() }
func (u unreachableCopy) Unmap(context.Context, int64, int64) error { return u.err() }
func (u unreachableCopy) Close() error                              { return nil }
func (u unreachableCopy) err() error                                { return fmt.Errorf("%s: %w", u.node, errUnknownPeer) }

// peerClient returns the data-transport client of a node, or nil when its
// address is unknown.
func (n *Node) peerClient(node string) *peer.Client {
	if n.members == nil {
		return nil
	}
	m, ok := n.members.Member(node)
	if !ok || m.Meta.Peer == "" {
		return nil
	}
	n.peersMu.Lock()
	defer n.peersMu.Unlock()
	if c, ok := n.peers[m.Meta.Peer]; ok {
		return c
	}
	c := peer.NewClient(m.Meta.Peer, peer.ClientConfig{TLS: n.sec.peerClient, Timeout: n.cfg.Peer.Timeout, Logger: n.log.With("component", "peer", "peer", node)})
	n.peers[m.Meta.Peer] = c
	return c
}

// servedByID returns the served image with that id, or nil.
func (n *Node) servedByID(id string) *served.Image {
	return n.images.ByID(id)
}

// isMember says whether name is a node of the membership (alive or not).
func (n *Node) isMember(name string) bool {
	if n.members == nil {
		return false
	}
	_, ok := n.members.Member(name)
	return ok
}
