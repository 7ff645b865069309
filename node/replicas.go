package node

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/cluster/peer"
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
			reps = append(reps, &lun.Replica{Node: loc, Copy: ownCopy{localCopy{s.Local}, n, s, img.ID}, Local: true})
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
	localCopy
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
	return o.localCopy.WriteAt(ctx, p, off, durable)
}

func (o ownCopy) Unmap(ctx context.Context, off, n int64) error {
	leave, err := o.admit(ctx)
	if err != nil {
		return err
	}
	defer leave()
	return o.localCopy.Unmap(ctx, off, n)
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

// peerStore is the node's side of the data transport: its local copies,
// by image id, with a generation floor per image.
type peerStore struct {
	n      *Node
	mu     sync.Mutex
	floors map[string]uint64
	// refresh serializes the catalog reads that check a generation newer
	// than this node's record (one at a time per node: a peer that sends
	// made-up generations costs one read at a time, not one each).
	refresh sync.Mutex
	// latest is the generation and owner of the newest record current
	// read, by id (guarded by mu): at most one per copy this node holds.
	latest map[string]meta.Image
}

// Open implements peer.Store. Reads need the image's generation or a
// newer one. Writes, unmaps, syncs and fences need more: the generation
// the image's record holds and, when the caller's certificate names it,
// the record's owner. A generation newer than this node's record is
// checked against the catalog (a new owner writes before this node saw
// its record), never taken on its word: the floor only rises to what the
// catalog says, so a made-up generation can neither land a write nor
// fence the real owner off.
func (p *peerStore) Open(ctx context.Context, ref peer.Ref, caller peer.Caller, a peer.Access) (peer.Local, error) {
	s := p.n.servedByID(ref.ID)
	if s == nil || s.Local == nil {
		return peer.Local{}, fmt.Errorf("image %s: %w", ref.ID, peer.ErrNoCopy)
	}
	img := s.Record()
	if seen, ok := p.seen(ref.ID); ok && seen.Generation > img.Generation {
		// The catalog said so before the watch brought the record here.
		img.Generation, img.Owner = seen.Generation, seen.Owner
	}
	if a == peer.AccessWrite && (ref.Gen > img.Generation || caller.Node != "" && caller.Node != img.Owner) {
		cur, err := p.current(ctx, img)
		if err != nil {
			return peer.Local{}, fmt.Errorf("image %s: generation %d from %s is not this node's record's (%d), and the catalog cannot say: %w (%v)",
				ref.ID, ref.Gen, callerName(caller), img.Generation, peer.ErrForbidden, err)
		}
		img.Generation, img.Owner = max(img.Generation, cur.Generation), cur.Owner
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	floor := max(p.floors[ref.ID], img.Generation)
	if ref.Gen < floor {
		return peer.Local{}, fmt.Errorf("image %s: generation %d, this copy has seen %d: %w", ref.ID, ref.Gen, floor, peer.ErrStaleGeneration)
	}
	if a == peer.AccessWrite {
		switch {
		case ref.Gen != img.Generation:
			return peer.Local{}, fmt.Errorf("image %s: generation %d from %s, the record holds %d: %w", ref.ID, ref.Gen, callerName(caller), img.Generation, peer.ErrForbidden)
		case caller.Node != "" && caller.Node != img.Owner:
			return peer.Local{}, fmt.Errorf("image %s: %s is not its owner (%q): %w", ref.ID, callerName(caller), img.Owner, peer.ErrForbidden)
		}
		p.floors[ref.ID] = ref.Gen
	}
	// The file may be longer than the record says: an online grow
	// extends the copies before the record.
	return peer.Local{Copy: localCopy{s.Local}, Size: max(img.Size, s.Local.Size()), BlockSize: img.BlockSize}, nil
}

// current reads img's record from the catalog, one read at a time, and
// remembers it (so that the writes of a new owner that arrive before this
// node's watch brings its record need one read, not one each).
func (p *peerStore) current(ctx context.Context, img meta.Image) (meta.Image, error) {
	p.refresh.Lock()
	defer p.refresh.Unlock()
	if seen, ok := p.seen(img.ID); ok && seen.Generation > img.Generation {
		return seen, nil // read while this caller waited
	}
	cur, _, err := p.n.cat.GetImage(ctx, img.Name)
	if err != nil {
		return meta.Image{}, err
	}
	if cur.ID != img.ID {
		return meta.Image{}, fmt.Errorf("image %q is now id %s", img.Name, cur.ID)
	}
	p.mu.Lock()
	if p.latest == nil {
		p.latest = map[string]meta.Image{}
	}
	if old, ok := p.latest[cur.ID]; !ok || old.Generation <= cur.Generation {
		p.latest[cur.ID] = meta.Image{ID: cur.ID, Generation: cur.Generation, Owner: cur.Owner}
	}
	p.mu.Unlock()
	return cur, nil
}

// seen returns the newest record of id the catalog gave current.
func (p *peerStore) seen(id string) (meta.Image, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	img, ok := p.latest[id]
	return img, ok
}

func callerName(c peer.Caller) string {
	if c.Node != "" {
		return "node " + c.Node + " (" + c.Addr + ")"
	}
	return c.Addr
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

// peerFloor is the newest generation a peer request for image id carried
// to this node's copy (0: none).
func (n *Node) peerFloor(id string) uint64 {
	n.pstore.mu.Lock()
	defer n.pstore.mu.Unlock()
	return n.pstore.floors[id]
}
