package node

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/ukai-storage/ukai/cluster/membership"
	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/placement"
	"github.com/ukai-storage/ukai/target/scsi"
)

// Ownership. One node at a time does an image's I/O: its owner, named in
// the record. A node takes ownership on the first I/O it is asked to do
// (or to synchronize or verify) when the image has no owner, or its owner
// is this node, or its owner is dead or gone in the membership; each change
// of owner increments the image's generation, which every request to a
// peer copy carries, so a copy refuses a stale owner. The owner gives the
// image up after it has had no iSCSI session and no sync for idleRelease.
// I/O arriving at another node while a live owner exists gets NOT READY
// (the owner issue replaces this with forwarding and explicit handover).

const idleRelease = 5 * time.Second

// errNotOwner is I/O on a node that is not the image's owner.
func errNotOwner(owner string) error {
	return &scsi.SenseError{Key: scsi.SenseNotReady, ASC: 0x04, ASCQ: 0x0a,
		Err: fmt.Errorf("image is served by node %s", owner)}
}

// alive reports whether a node is alive in the membership (always true
// without gossip, where this node is the only one).
func (n *Node) alive(node string) bool {
	if node == n.cfg.Node.Name || n.members == nil {
		return true
	}
	m, ok := n.members.Member(node)
	return ok && m.State == membership.StateAlive
}

// peerMember returns a live node's membership entry.
func (n *Node) peerMember(node string) (membership.Member, error) {
	if n.members == nil {
		return membership.Member{}, fmt.Errorf("node %s is unknown: this node runs without gossip", node)
	}
	m, ok := n.members.Member(node)
	if !ok {
		return membership.Member{}, fmt.Errorf("%w: node %s is not in the cluster", meta.ErrInvalid, node)
	}
	if m.State != membership.StateAlive {
		return membership.Member{}, fmt.Errorf("node %s is %s", node, m.State)
	}
	return m, nil
}

// acquire makes this node the owner of s's image, or says who is.
func (n *Node) acquire(ctx context.Context, s *served) error {
	if s.owned.Load() {
		return nil
	}
	n.ownMu.Lock()
	defer n.ownMu.Unlock()
	if s.owned.Load() {
		return nil
	}
	name := s.record().Name
	if rec := s.record(); len(rec.Locations) == 1 && rec.Locations[0] == n.cfg.Node.Name && (rec.Owner == "" || rec.Owner == n.cfg.Node.Name) {
		// This node holds the only copy: it may serve it even while the
		// metadata store is unreachable (no other copy can diverge).
		if err := n.cat.KV().Ping(ctx); err != nil {
			s.owned.Store(true)
			n.log.Warn("metadata store unreachable: serving the image's only copy without recording ownership", "image", name)
			return nil
		}
	}
	img, err := n.cat.UpdateImage(ctx, name, func(i *meta.Image) error {
		if i.Owner != "" && i.Owner != n.cfg.Node.Name && n.alive(i.Owner) {
			return errNotOwner(i.Owner)
		}
		if i.Owner != n.cfg.Node.Name {
			i.Owner = n.cfg.Node.Name
			i.Generation++
		}
		return nil
	})
	if err != nil {
		var se *scsi.SenseError
		if errors.As(err, &se) {
			return err
		}
		return &scsi.SenseError{Key: scsi.SenseNotReady, ASC: 0x04, ASCQ: 0x00, Err: fmt.Errorf("take ownership: %w", err)}
	}
	// Fresh block maps and peer references with the new generation.
	n.reconMu.Lock()
	err = n.apply(ctx, s, img, true)
	n.reconMu.Unlock()
	if err != nil {
		return &scsi.SenseError{Key: scsi.SenseNotReady, ASC: 0x04, ASCQ: 0x00, Err: err}
	}
	s.owned.Store(true)
	n.log.Info("took ownership of image", "image", name, "generation", img.Generation)
	return nil
}

// releaseIdle gives up ownership of images with no session and no sync.
func (n *Node) releaseIdle(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	idle := map[string]time.Time{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		active := map[string]bool{}
		for _, si := range n.target.Sessions() {
			active[si.Target] = true
		}
		n.mu.RLock()
		var owned []*served
		for _, s := range n.served {
			if s.owned.Load() {
				owned = append(owned, s)
			}
		}
		n.mu.RUnlock()
		for _, s := range owned {
			img := s.record()
			if active[n.iqn(img.Name)] || s.busy.Load() > 0 {
				delete(idle, img.ID)
				continue
			}
			since, ok := idle[img.ID]
			if !ok {
				idle[img.ID] = time.Now()
				continue
			}
			if time.Since(since) < idleRelease {
				continue
			}
			delete(idle, img.ID)
			n.release(ctx, s)
		}
	}
}

// release flushes the copies and clears the owner.
func (n *Node) release(ctx context.Context, s *served) {
	n.ownMu.Lock()
	defer n.ownMu.Unlock()
	name := s.record().Name
	if err := s.vol.Flush(ctx); err != nil {
		n.log.Warn("flush before releasing ownership failed; keeping it", "image", name, "err", err)
		return
	}
	s.owned.Store(false)
	_, err := n.cat.UpdateImage(ctx, name, func(i *meta.Image) error {
		if i.Owner != n.cfg.Node.Name {
			return errSkip
		}
		i.Owner = ""
		return nil
	})
	if err != nil && !errors.Is(err, errSkip) {
		n.log.Warn("cannot release ownership", "image", name, "err", err)
		return
	}
	n.log.Info("released ownership of idle image", "image", name)
}

var errSkip = errors.New("nothing to do")

// gate is the scsi.Backend of an exported image: it makes sure this node
// owns the image, then passes the I/O to the replicated volume.
type gate struct {
	n *Node
	s *served
}

func (g *gate) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := g.n.acquire(ctx, g.s); err != nil {
		return err
	}
	return g.s.vol.ReadAt(ctx, p, off)
}

func (g *gate) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := g.n.acquire(ctx, g.s); err != nil {
		return err
	}
	return g.s.vol.WriteAt(ctx, p, off, fua)
}

func (g *gate) Flush(ctx context.Context) error {
	if err := g.n.acquire(ctx, g.s); err != nil {
		return err
	}
	return g.s.vol.Flush(ctx)
}

func (g *gate) Unmap(ctx context.Context, off, length int64) error {
	if err := g.n.acquire(ctx, g.s); err != nil {
		return err
	}
	return g.s.vol.Unmap(ctx, off, length)
}

// mapStore records block states of one image in the catalog.
type mapStore struct {
	n *Node
	s *served
}

func (m *mapStore) SetBlockStates(ctx context.Context, node string, blocks []int64, st placement.SyncState) error {
	return m.n.cat.SetBlockStates(ctx, m.s.record(), node, blocks, st)
}
