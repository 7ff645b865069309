package node

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/cluster/peer"
	"github.com/ukai-storage/ukai/placement"
	"github.com/ukai-storage/ukai/target/lun"
)

// replicas builds the volume's view of img: one replica per location (the
// local file, or the peer copy through the data transport) and the block
// maps from the catalog. With cached (catalog maybe unreachable) only the
// local copy is used, with the map it had: in sync.
func (n *Node) replicas(ctx context.Context, s *served, img meta.Image, cached bool) ([]*lun.Replica, map[string]*placement.BlockMap, error) {
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
			reps = append(reps, &lun.Replica{Node: loc, Copy: localCopy{s.local}, Local: true})
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

// localCopy shares the node's file between the volume and the peer
// server: closing the volume's replica does not close the file.
type localCopy struct{ *lun.FileCopy }

func (localCopy) Close() error { return nil }

// remoteCopy adds block checksums computed on the peer.
type remoteCopy struct {
	lun.Copy
	c   *peer.Client
	ref peer.Ref
	bs  int64
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

// peerStore is the node's side of the data transport: its local copies,
// by image id, with a generation floor per image.
type peerStore struct {
	n      *Node
	mu     sync.Mutex
	floors map[string]uint64
}

// Open implements peer.Store.
func (p *peerStore) Open(ref peer.Ref) (peer.Local, error) {
	p.n.mu.RLock()
	var s *served
	for _, c := range p.n.served {
		if c.record().ID == ref.ID {
			s = c
			break
		}
	}
	p.n.mu.RUnlock()
	if s == nil || s.local == nil {
		return peer.Local{}, fmt.Errorf("image %s: %w", ref.ID, peer.ErrNoCopy)
	}
	img := s.record()
	p.mu.Lock()
	defer p.mu.Unlock()
	floor := max(p.floors[ref.ID], img.Generation)
	if ref.Gen < floor {
		return peer.Local{}, fmt.Errorf("image %s: generation %d, this copy has seen %d: %w", ref.ID, ref.Gen, floor, peer.ErrStaleGeneration)
	}
	p.floors[ref.ID] = ref.Gen
	// The file may be longer than the record says: an online grow
	// extends the copies before the record.
	return peer.Local{Copy: localCopy{s.local}, Size: max(img.Size, s.local.Size()), BlockSize: img.BlockSize}, nil
}

// peerFloor is the newest generation a peer request for image id carried
// to this node's copy (0: none).
func (n *Node) peerFloor(id string) uint64 {
	n.pstore.mu.Lock()
	defer n.pstore.mu.Unlock()
	return n.pstore.floors[id]
}
