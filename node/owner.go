package node

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/membership"
	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/cluster/peer"
	"github.com/ukai-storage/ukai/node/route"
	"github.com/ukai-storage/ukai/node/served"
	"github.com/ukai-storage/ukai/ownership"
	"github.com/ukai-storage/ukai/placement"
	"github.com/ukai-storage/ukai/target/scsi"
)

// Ownership. One node at a time does an image's I/O: the node whose
// session holds the image's ownership lock (package ownership has the
// rule, docs/ownership.md the design). A node takes the lock on the first
// I/O it is asked to do (or to synchronize or verify) when it is free;
// forwards the I/O to the holder while the holder lives (package route
// runs that loop; acquire below is its Host.Acquire); and destroys
// the session of a holder the membership saw die, so that the store
// frees the lock after its lock delay. Each change of owner increments
// the image's generation, which every request to a peer copy carries, so
// a copy refuses a stale owner. The owner gives the image up after it has
// had no iSCSI session and no sync for idleRelease.

const (
	idleRelease = 5 * time.Second
	// acquireBackoff spaces the attempts on a free lock the store
	// refuses (its lock delay runs): each attempt is a Raft write.
	acquireBackoff = time.Second
)

// errNotOwner is I/O on a node that is not the image's owner.
func errNotOwner(owner string) error { return route.ErrNotOwner(owner) }

// alive reports whether a node is alive in the membership (always true
// without gossip, where this node is the only one).
func (n *Node) alive(node string) bool {
	if node == n.cfg.Node.Name || n.members == nil {
		return true
	}
	m, ok := n.members.Member(node)
	return ok && m.State == membership.StateAlive
}

// controlClient is the data-transport client of a live node, for the
// control calls (peer.Control).
func (n *Node) controlClient(node string) (*peer.Client, error) {
	if _, err := n.peerMember(node); err != nil {
		return nil, err
	}
	c := n.peerClient(node)
	if c == nil {
		return nil, fmt.Errorf("node %s has no data transport address", node)
	}
	return c, nil
}

// peerMember returns a live node's membership entry.
func (n *Node) peerMember(node string) (membership.Member, error) {
	if n.members == nil {
		return membership.Member{}, fmt.Errorf("%w: no node %s (this node runs alone, without gossip)", meta.ErrNodeNotFound, node)
	}
	m, ok := n.members.Member(node)
	if !ok {
		return membership.Member{}, fmt.Errorf("%w: no node %s in the cluster", meta.ErrNodeNotFound, node)
	}
	if m.State != membership.StateAlive {
		return membership.Member{}, fmt.Errorf("node %s is %s", node, m.State)
	}
	return m, nil
}

// acquire makes this node the owner of s's image, or says who is.
func (n *Node) acquire(ctx context.Context, s *served.Image) error {
	if n.mayServe(s) {
		return nil
	}
	n.ownMu.Lock()
	defer n.ownMu.Unlock()
	if n.mayServe(s) {
		return nil
	}
	rec := s.Record()
	self := n.cfg.Node.Name
	in := ownership.Input{
		Self:           self,
		Session:        n.session.Ensure(ctx),
		StoreReachable: true,
		OnlyLocalCopy:  onlyLocalCopy(rec, self) && (rec.Owner == "" || rec.Owner == self),
	}
	if in.Session == "" && !in.OnlyLocalCopy {
		// Wait whatever the lock says: no store read (a node cut from
		// the store answers at once).
		return notReady(errNoSession)
	}
	var err error
	in.LockSession, in.LockNode, err = n.cat.OwnershipLock(ctx, rec.ID)
	switch {
	case errors.Is(err, meta.ErrUnavailable):
		in.StoreReachable = false
	case err != nil:
		return notReady(fmt.Errorf("take ownership: %w", err))
	}
	in.HolderDead = in.LockNode != "" && n.dead(in.LockNode)
	// An image attached to another live node: a free lock is left to it
	// for a while (ownership.Yield), counted from when this node first
	// saw the lock free so.
	// While this node's own release of the image runs, the hold has not
	// begun: the release drains I/O and flushes (up to 10 s and more)
	// before it frees the lock, and a hold that ran out meanwhile let the
	// node's own I/O take the image back.
	if p := rec.Attached; (in.LockSession == "" || in.LockSession == in.Session) && p != "" && p != self && n.alive(p) {
		if s.PinSince.IsZero() || s.PinTo != p || s.Releasing.Load() {
			s.PinSince, s.PinTo = time.Now(), p
		}
		in.PinnedTo, in.PinWaited = p, time.Since(s.PinSince)
	}
	act := ownership.Decide(in)
	if act != ownership.Yield {
		s.PinSince, s.PinTo = time.Time{}, ""
	}
	if act == ownership.Acquire || act == ownership.Take {
		if err := n.strictRefuses(ctx, rec); err != nil {
			if act == ownership.Take && errors.Is(err, errStrict) {
				// Held by this node's session (the policy became strict
				// meanwhile): let a node with a copy have it.
				if rerr := n.cat.ReleaseOwnership(context.WithoutCancel(ctx), rec.ID, self, in.Session); rerr != nil {
					n.log.Warn("cannot release the ownership lock of an image strict locality keeps from this node", "image", rec.Name, "err", rerr)
				}
			}
			return notReady(err)
		}
	}
	switch act {
	case ownership.Offline:
		s.OwnedGen.Store(rec.Generation)
		s.Offline.Store(true)
		s.SetOwned(true)
		n.log.Warn("metadata store unreachable: serving the image's only copy without recording ownership", "image", rec.Name)
		return nil
	case ownership.Wait:
		if !in.StoreReachable {
			return notReady(fmt.Errorf("take ownership: the metadata store is unreachable"))
		}
		return notReady(errNoSession)
	case ownership.Forward:
		return errNotOwner(in.LockNode)
	case ownership.Yield:
		return errNotOwner(in.PinnedTo)
	case ownership.Break:
		if err := n.kv.DestroySession(ctx, in.LockSession); err != nil {
			return notReady(fmt.Errorf("free the ownership lock of dead node %s: %w", in.LockNode, err))
		}
		n.log.Warn("destroyed the ownership session of a node the membership saw die: its locks are free after the lock delay",
			"image", rec.Name, "node", in.LockNode, "session", in.LockSession)
		return errNotOwner(in.LockNode)
	case ownership.Acquire:
		if time.Now().Before(s.NextAcquire) {
			return errNotOwner(in.LockNode)
		}
		ok, err := n.cat.AcquireOwnership(ctx, rec.ID, self, in.Session)
		if err != nil {
			return notReady(fmt.Errorf("take ownership: %w", err))
		}
		if !ok {
			s.NextAcquire = time.Now().Add(acquireBackoff)
			return errNotOwner(in.LockNode)
		}
	case ownership.Take:
	default:
		return notReady(fmt.Errorf("take ownership: unexpected decision %v", act))
	}
	if err := n.take(ctx, s, in.Session); err != nil {
		// A lock held without owning would keep everyone else out (they
		// forward to the holder): let it go. Chaos seed 110: a takeover
		// whose record write failed left its lock held, and the image
		// could not be verified through any other node.
		s.SetOwned(false)
		if rerr := n.cat.ReleaseOwnership(context.WithoutCancel(ctx), rec.ID, self, in.Session); rerr != nil {
			n.log.Warn("cannot release the ownership lock of an image this node failed to take", "image", rec.Name, "err", rerr)
		}
		return err
	}
	return nil
}

// take records this node as the owner of an image whose lock its session
// holds (a new owner raises the generation), brings the copies in line
// and starts serving. The caller holds ownMu.
func (n *Node) take(ctx context.Context, s *served.Image, session string) error {
	name, id := s.Record().Name, s.Record().ID
	self := n.cfg.Node.Name
	var previous string
	var raised bool
	// Never below a generation this node has seen for the image, and
	// always through a check-and-set write, even when the record already
	// names this node: a store that has just restarted can answer a read
	// with a record older than what it acknowledged, which a check-and-set
	// cannot pass (chaos seed 121: Consul, killed and restarted, answered
	// generation 13 to a node that had taken the image with 14 a few
	// seconds before; it served with 13, and its copies, which had seen
	// 14, refused every write for 2.5 minutes).
	seen := max(s.OwnedGen.Load(), s.Record().Generation, n.pstore.Floor(id))
	if n.peerSrv != nil {
		seen = max(seen, n.peerSrv.Generation(id))
	}
	img, err := n.cat.UpdateImage(ctx, name, func(i *meta.Image) error {
		if i.ID != id {
			// Deleted and created again under the same name: the lock
			// held is the old image's, which is not this record's.
			return fmt.Errorf("%w (created again as %s)", meta.ErrImageNotFound, i.ID)
		}
		previous = i.Owner
		raised = i.Generation < seen
		if i.Owner != self || raised {
			i.Owner = self
			i.Generation = max(i.Generation, seen) + 1
		}
		return nil
	})
	if err != nil {
		return notReady(fmt.Errorf("take ownership: %w", err))
	}
	s.OwnedGen.Store(img.Generation)
	// The session first: the reconciliation below writes to the local
	// copy, which checks it (ownCopy).
	s.SetSession(session)
	// Fresh block maps and peer references with the new generation.
	err = n.applyNow(ctx, s, img, true)
	if err != nil {
		return notReady(err)
	}
	// Whatever a former owner (or this node, before a release) sent to
	// the copies lands before this, or never.
	if bad := s.Vol.FenceAll(ctx); len(bad) > 0 {
		n.log.Warn("took the image without fencing the copies on some nodes (unreachable): writes a former owner sent them may still land; the reconciliation records its logged blocks out of sync there", "image", name, "nodes", bad)
	}
	// A raised generation means the store had lost track of what this
	// node saw: another owner may have come and gone in between.
	if raised || mustReconcile(previous, self, s.EverOwned) {
		// The last owner may have died with writes in flight: make the
		// copies agree on the blocks it was writing before serving I/O.
		if err := s.Act.Reconcile(ctx); err != nil {
			return notReady(fmt.Errorf("reconcile the previous owner's writes: %w", err))
		}
	}
	s.Cow.Reset()
	s.EverOwned = true
	s.Offline.Store(false)
	s.SetOwned(true)
	n.log.Info("took ownership of image", "image", name, "generation", img.Generation, "previous_owner", previous)
	return nil
}

// errNoSession: the node cannot take anything (Decide's Wait).
var errNoSession = errors.New("take ownership: this node has no valid ownership session (the metadata store does not answer its renewals)")

// notReady is a retryable NOT READY for err.
func notReady(err error) error {
	return &scsi.SenseError{Key: scsi.SenseNotReady, ASC: 0x04, ASCQ: 0x00, Err: err}
}

// dead says whether the membership saw node die (dead or left; unknown
// and suspected nodes are not dead).
func (n *Node) dead(node string) bool {
	if n.members == nil || node == n.cfg.Node.Name {
		return false
	}
	m, ok := n.members.Member(node)
	return ok && (m.State == membership.StateDead || m.State == membership.StateLeft)
}

// mustReconcile says whether a node taking an image must first make the
// copies agree on the blocks of the stored activity log: always, unless
// this process owned it last and nobody took it since (its own failed
// writes are in its volume's suspects). A clean release is no exception:
// it keeps the log when blocks could not be made to agree or writes came
// in while it flushed (activity.Log.Clear), and the successor is the one to
// repair them. An empty log costs one metadata read.
func mustReconcile(previous, self string, everOwned bool) bool {
	return previous != self || !everOwned
}

// sessionLost fences every image owned under a session the store
// invalidated.
func (n *Node) sessionLost(id string) {
	for _, s := range n.servedImages(true) {
		if s.Session() == id && !s.Offline.Load() {
			n.log.Error("ownership session lost: stopping I/O on the image", "image", s.Record().Name)
			s.SetOwned(false)
		}
	}
}

// settleOffline turns an image served offline (its only copy here, taken
// while the store was unreachable) into a recorded ownership once the
// store and the session are back; if another node holds the lock, the
// image is fenced.
func (n *Node) settleOffline(ctx context.Context, s *served.Image) {
	n.ownMu.Lock()
	defer n.ownMu.Unlock()
	if !s.Offline.Load() {
		return
	}
	session := n.session.Ensure(ctx)
	if session == "" {
		return
	}
	rec := s.Record()
	ok, err := n.cat.AcquireOwnership(ctx, rec.ID, n.cfg.Node.Name, session)
	if err != nil {
		return // still offline
	}
	if !ok {
		n.log.Error("another node holds the ownership lock of an image served offline here: stopping I/O", "image", rec.Name)
		s.Offline.Store(false)
		s.SetOwned(false)
		return
	}
	err = n.take(ctx, s, session)
	switch {
	case errors.Is(err, meta.ErrImageNotFound):
		// Deleted (or created again as another image) while served
		// offline: its I/O stops, and the lock taken on its id goes.
		n.log.Error("an image served offline was deleted meanwhile: stopping I/O", "image", rec.Name, "err", err)
		s.Offline.Store(false)
		s.SetOwned(false)
		if rerr := n.cat.ReleaseOwnership(context.WithoutCancel(ctx), rec.ID, n.cfg.Node.Name, session); rerr != nil {
			n.log.Warn("cannot release the ownership lock of a deleted image; it goes with the session", "image", rec.Name, "err", rerr)
		}
	case err != nil:
		n.log.Warn("cannot record the ownership of an image served offline; still offline", "image", rec.Name, "err", err)
	}
}

// releaseIdle gives up ownership of images with no session and no sync.
func (n *Node) releaseIdle(ctx context.Context) {
	idle := map[string]time.Time{}
	every(ctx, time.Second, func() {
		active := map[string]bool{}
		for _, si := range n.target.Sessions() {
			active[si.Target] = true
		}
		for _, s := range n.servedImages(true) {
			if s.Offline.Load() {
				n.settleOffline(ctx, s)
			}
			img := s.Record()
			if active[n.iqn(img.Name)] || s.Busy() || img.Attached == n.cfg.Node.Name || n.originOwnedHere(img) {
				delete(idle, img.ID)
				if s.Vol.QuietFor(2 * time.Second) {
					s.Act.Clear(ctx)
				}
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
	})
}

// release flushes the copies, frees the ownership lock and clears the
// owner in the record. The lock goes first: once it is free, any node may
// take the image (and rewrites the record); a record still naming this
// node is only out of date. A lock that cannot be freed keeps the image
// owned here.
func (n *Node) release(ctx context.Context, s *served.Image) {
	name := s.Record().Name
	// No new I/O from here (beginIO); the I/O already past its ownership
	// check ends before the flush, so that nothing lands after the lock
	// is free. ownMu is not held while waiting: that I/O may need it (a
	// write takes the image's snapshots).
	n.ownMu.Lock()
	if !s.Owned() {
		n.ownMu.Unlock()
		return
	}
	s.SetOwned(false)
	s.Releasing.Store(true)
	defer s.Releasing.Store(false)
	n.ownMu.Unlock()
	err := waitIO(ctx, s, releaseDrain)
	n.ownMu.Lock()
	defer n.ownMu.Unlock()
	if s.Owned() {
		n.log.Info("I/O took the image again while it was being released; keeping it", "image", name)
		return
	}
	if err != nil {
		n.log.Warn("I/O still running; keeping ownership", "image", name, "err", err)
		n.keepOwned(s)
		return
	}
	start := time.Now()
	if err := s.Vol.Flush(ctx); err != nil {
		n.log.Warn("flush before releasing ownership failed; keeping it", "image", name, "err", err)
		n.keepOwned(s)
		return
	}
	s.Act.Flushed(start)
	s.Act.Clear(ctx)
	if !s.Offline.Load() {
		if err := n.cat.ReleaseOwnership(ctx, s.Record().ID, n.cfg.Node.Name, s.Session()); err != nil {
			n.log.Warn("cannot release ownership; keeping it", "image", name, "err", err)
			n.keepOwned(s)
			return
		}
	}
	s.Offline.Store(false)
	s.Cow.Reset()
	_, err = n.cat.UpdateImage(ctx, name, func(i *meta.Image) error {
		if i.Owner != n.cfg.Node.Name {
			return errSkip
		}
		i.Owner = ""
		return nil
	})
	if err != nil && !errors.Is(err, errSkip) {
		n.log.Warn("released the ownership lock; the record still names this node", "image", name, "err", err)
	}
	n.log.Info("released ownership of idle image", "image", name)
}

var errSkip = errors.New("nothing to do")

// keepOwned undoes a release that could not finish, unless the image was
// taken from this node meanwhile (a record naming another owner or
// generation was applied; a lost session is mayServe's to judge).
func (n *Node) keepOwned(s *served.Image) {
	if rec := s.Record(); rec.Owner == n.cfg.Node.Name && rec.Generation == s.OwnedGen.Load() || s.Offline.Load() {
		s.SetOwned(true)
	}
}

// releaseDrain bounds how long a release waits for the I/O in flight.
const releaseDrain = 10 * time.Second

// waitIO waits until no I/O counted in by beginIO runs on s, for at most d.
func waitIO(ctx context.Context, s *served.Image, d time.Duration) error {
	deadline := time.Now().Add(d)
	for s.InFlight() > 0 {
		if time.Now().After(deadline) {
			return fmt.Errorf("%d I/O still running after %v", s.InFlight(), d)
		}
		sleep(ctx, 5*time.Millisecond)
		if err := ctx.Err(); err != nil {
			return err
		}
	}
	return nil
}

// originOwnedHere says whether img is a snapshot whose origin this node
// owns: the snapshot stays owned with it (its owner preserves into it).
func (n *Node) originOwnedHere(img meta.Image) bool {
	if !img.IsSnapshot() {
		return false
	}
	o := n.images.Get(img.Origin.Name)
	return o != nil && o.Record().ID == img.Origin.ID && o.Owned()
}

// handoverTimeout bounds a release another node asked for: draining the
// I/O in flight (releaseDrain), the flush, and the two catalog writes.
const handoverTimeout = 30 * time.Second

// takeoverWait bounds how long an I/O waits for a dead owner's session.
const takeoverWait = 45 * time.Second

// routeHost is the node's side of routing (package route).
type routeHost struct{ n *Node }

func (h routeHost) Acquire(ctx context.Context, s *served.Image) error { return h.n.acquire(ctx, s) }

func (h routeHost) Forwarder(node string) route.Forwarder {
	if c := h.n.peerClient(node); c != nil {
		return c
	}
	return nil // not a nil *peer.Client in an interface
}

// Refresh reads the record again and applies it (a new owner, or the
// session ran out).
func (h routeHost) Refresh(ctx context.Context, s *served.Image) {
	if img, _, err := h.n.cat.GetImage(ctx, s.Record().Name); err == nil {
		_ = h.n.applyNow(ctx, s, img, false)
	}
}

func (h routeHost) Owned(s *served.Image) scsi.Backend { return ownedBackend{n: h.n, s: s} }
func (h routeHost) ByID(id string) *served.Image       { return h.n.servedByID(id) }
func (h routeHost) MayServe(s *served.Image) bool      { return h.n.mayServe(s) }
func (h routeHost) Claims(ctx context.Context, s *served.Image) bool {
	return s.Record().Attached == h.n.cfg.Node.Name || h.n.holdsLock(ctx, s)
}

// holdsLock says whether this node's session holds s's ownership lock
// without the node owning the image yet (a restart that kept its session,
// a takeover that has not finished): forwarded I/O then takes it, since
// the others forward to the lock's holder.
func (n *Node) holdsLock(ctx context.Context, s *served.Image) bool {
	sess := n.session.Current()
	if sess == "" {
		return false
	}
	ls, _, err := n.cat.OwnershipLock(ctx, s.Record().ID)
	return err == nil && ls == sess
}

// ownedBackend runs I/O on the owner's volume (its own, and forwarded).
type ownedBackend struct {
	n *Node
	s *served.Image
}

// inRange makes sure [off, off+n) is inside the image as this node knows
// it: an image grown online may be applied by the node that forwards the
// I/O before its owner (the record is read again then).
func (b ownedBackend) inRange(ctx context.Context, off, n int64) {
	if off+n <= b.s.Vol.Size() {
		return
	}
	if img, _, err := b.n.cat.GetImage(ctx, b.s.Record().Name); err == nil && img.ID == b.s.Record().ID {
		_ = b.n.applyNow(ctx, b.s, img, false)
	}
}

func (b ownedBackend) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := b.s.Fence.Enter(ctx); err != nil {
		return err
	}
	defer b.s.Fence.Leave()
	b.inRange(ctx, off, int64(len(p)))
	return b.s.Vol.ReadAt(ctx, p, off)
}

// WriteAt first makes sure this node owns the image's snapshots, so that
// preserving blocks into them never waits with blocks held.
func (b ownedBackend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := b.s.Fence.Enter(ctx); err != nil {
		return err
	}
	defer b.s.Fence.Leave()
	b.inRange(ctx, off, int64(len(p)))
	if err := b.n.ensureSnapshots(ctx, b.s); err != nil {
		return err
	}
	return b.lapsed(b.s.Vol.WriteAt(ctx, p, off, fua))
}

// lapsed turns the failure of an I/O during which this node stopped being
// allowed to serve the image (its session lapsed, a release began, a
// newer owner showed up) into NOT READY, which initiators retry (on the
// next owner, if another node took it). Otherwise a write its own copy
// refused for that reason was answered MEDIUM ERROR, "reached 0 copies",
// which they do not retry (chaos seed 113).
func (b ownedBackend) lapsed(err error) error {
	if err == nil || b.n.mayServe(b.s) {
		return err
	}
	var se *scsi.SenseError
	if errors.As(err, &se) && se.Key == scsi.SenseNotReady {
		return err
	}
	return notReady(fmt.Errorf("this node stopped owning the image during the I/O: %w", err))
}
func (b ownedBackend) Flush(ctx context.Context) error {
	if err := b.s.Fence.Enter(ctx); err != nil {
		return err
	}
	defer b.s.Fence.Leave()
	start := time.Now()
	if err := b.s.Vol.Flush(ctx); err != nil {
		return b.lapsed(err)
	}
	b.s.Act.Flushed(start)
	return nil
}
func (b ownedBackend) Unmap(ctx context.Context, off, n int64) error {
	if err := b.s.Fence.Enter(ctx); err != nil {
		return err
	}
	defer b.s.Fence.Leave()
	b.inRange(ctx, off, n)
	if err := b.n.ensureSnapshots(ctx, b.s); err != nil {
		return err
	}
	return b.lapsed(b.s.Vol.Unmap(ctx, off, n))
}

// mapStore records block states of one image in the catalog.
type mapStore struct {
	n *Node
	s *served.Image
}

// SetBlockStates records block states only while the image's record
// still names this node as the owner with the generation it took the
// image with (meta.SetBlockStatesOwned; one more metadata read per record,
// and records are made only on failures and syncs). In sync: a sync that
// finishes after a handover must not declare in sync a copy the new owner
// has been leaving out of its writes. Out of sync too: a former owner
// whose writes a copy refuses (it has seen the new owner's generation)
// is the stale one, not the copy; its record would make the new owner
// stop writing to a good copy, and a few of them left every copy of a
// block out of sync with nothing to sync from (chaos seed 101). Refused,
// the write fails and is not acknowledged, as a non-owner's must.
func (m *mapStore) SetBlockStates(ctx context.Context, node string, blocks []int64, st placement.SyncState) error {
	// No shortcut on s.owned: a takeover's reconciliation records before
	// owned is set, and writes still in flight while a release clears it
	// must record what they did; the stored record decides.
	err := m.n.cat.SetBlockStatesOwned(ctx, m.s.Record(), node, blocks, st, m.n.cfg.Node.Name, m.s.OwnedGen.Load())
	if errors.Is(err, meta.ErrNotOwner) {
		return fmt.Errorf("%w: %w", err, errNotOwner(""))
	}
	return err
}

// Attach implements api.Service: make node the image's owner now and keep
// it there until Detach (an orchestrator moving a VM calls it before the
// switchover). The request runs on the node itself; the current owner is
// asked to hand over (it flushes and lets go; its own I/O is then
// forwarded).
func (n *Node) Attach(ctx context.Context, name, node string) (api.Image, error) {
	if node != n.cfg.Node.Name {
		m, err := n.peerMember(node)
		if err != nil {
			return api.Image{}, fmt.Errorf("attach to %s: %w", node, err)
		}
		return n.apiClient(m.Meta.API).Attach(ctx, name, node)
	}
	s, err := n.servedByName(ctx, name)
	if err != nil {
		return api.Image{}, err
	}
	if err := n.strictRefuses(ctx, s.Record()); err != nil {
		return api.Image{}, fmt.Errorf("%w: attach %s to %s: %v", meta.ErrRefused, name, node, err)
	}
	if states, _, err := n.cat.NodeStates(ctx); err != nil {
		return api.Image{}, fmt.Errorf("attach %s to %s: %w", name, node, err)
	} else if st := states[node]; st.Cordoned || st.Drain != nil {
		return api.Image{}, fmt.Errorf("%w: attach %s to %s: %s is cordoned, no new owner goes there (ukai node uncordon %s)", meta.ErrRefused, name, node, node, node)
	}
	img, err := n.cat.UpdateImage(ctx, name, func(i *meta.Image) error {
		i.Attached = node
		return nil
	})
	if err != nil {
		return api.Image{}, err
	}
	// Applied at once: forwarded I/O is let in to take the image from
	// now on (routeHost.Claims).
	if img.ID == s.Record().ID {
		_ = n.applyNow(ctx, s, img, false)
	}
	if img.Owner != "" && img.Owner != n.cfg.Node.Name {
		if c, err := n.controlClient(img.Owner); err == nil {
			if err := c.Release(ctx, name); err != nil {
				n.log.Warn("the current owner did not hand over; waiting until its lock is free", "image", name, "owner", img.Owner, "err", err)
			}
		}
	}
	deadline := time.Now().Add(takeoverWait)
	for {
		err := n.acquire(ctx, s)
		if err == nil {
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return api.Image{}, fmt.Errorf("attach %s to %s: %w", name, node, err)
		}
		sleep(ctx, 200*time.Millisecond)
	}
	return n.GetImage(ctx, name, api.BlockView{})
}

// Detach implements api.Service: the image is no longer pinned; its owner
// lets it go when idle.
func (n *Node) Detach(ctx context.Context, name string) (api.Image, error) {
	if _, err := n.cat.UpdateImage(ctx, name, func(i *meta.Image) error {
		i.Attached = ""
		return nil
	}); err != nil {
		return api.Image{}, err
	}
	return n.GetImage(ctx, name, api.BlockView{})
}

// Release implements peer.Control: give up ownership of the image now (a
// handover asked by the node it is attached to).
func (n *Node) Release(ctx context.Context, name string) error {
	s, err := n.servedByName(ctx, name)
	if err != nil {
		return err
	}
	if !s.Owned() {
		return nil
	}
	// The release finishes even if the caller stops waiting (its
	// transport timeout, 2 s by default, is shorter than draining I/O
	// and flushing under load): the attaching node loops on the lock,
	// and an abandoned release kept ownership (chaos seed 120).
	if !n.handoverMu.TryRLock() {
		return fmt.Errorf("image %q: this node is shutting down; it releases its images itself", name)
	}
	defer n.handoverMu.RUnlock()
	life := n.life
	if life == nil { // a Node built by a test
		life = context.Background()
	}
	ctx, cancel := context.WithTimeout(life, handoverTimeout)
	defer cancel()
	// The record as it is now: it names the node the image is being
	// attached to, which this node's I/O then leaves the lock to
	// (ownership.Yield) instead of taking it back at once.
	routeHost{n}.Refresh(ctx, s)
	n.release(ctx, s)
	if s.Owned() {
		return fmt.Errorf("image %q: could not release ownership (a flush failed, or I/O took it again: see the node's log)", name)
	}
	// The new owner preserves blocks into the snapshots: let them go too.
	for _, ref := range s.Record().Snapshots {
		sn := n.images.Get(ref.Name)
		if sn != nil && sn.Owned() {
			n.release(ctx, sn)
		}
	}
	return nil
}

// mayServe says whether this node may do s's I/O now: it owns the image,
// the session it took the image with is still valid by this node's clock
// (renewed less than a TTL ago), and no copy has seen a newer owner's
// generation. An image whose only copy is here, taken while the metadata
// store was unreachable (offline), is not bound by the session: a newer
// owner can only reach it through this node's copy, which raises the
// generation floor and fences it.
func (n *Node) mayServe(s *served.Image) bool {
	if !s.Owned() {
		return false
	}
	img := s.Record()
	if n.pstore.Floor(img.ID) > img.Generation {
		n.log.Error("a newer owner wrote to this node's copy: fencing the image", "image", img.Name)
		s.SetOwned(false)
		return false
	}
	return s.Offline.Load() || n.session.Valid(s.Session())
}

// strictRefuses says why this node may not own (serve) img: its locality
// is strict (the image's policy, else placement.locality), this node has
// no local copy fully in sync, and the operator did not allow it
// (allow_remote). One policy read, and one block map read when the node
// holds a copy, per takeover; nothing per I/O.
func (n *Node) strictRefuses(ctx context.Context, img meta.Image) error {
	pol, _, err := n.cat.ImagePolicy(ctx, img.Name)
	var malformed *meta.MalformedError
	switch {
	case errors.As(err, &malformed):
		// An unreadable policy must not make the image unservable: the
		// node's default applies (the executor reports the record).
		pol = placement.ImagePolicy{}
	case err != nil:
		return fmt.Errorf("read the locality of %s: %w", img.Name, err)
	}
	loc := pol.Locality
	if loc == "" {
		loc = placement.Locality(n.cfg.Placement.Locality)
	}
	self := n.cfg.Node.Name
	if loc != placement.LocalityStrict || slices.Contains(pol.AllowRemote, self) {
		return nil
	}
	if slices.Contains(img.Locations, self) {
		bm, err := n.cat.BlockMap(ctx, img, self)
		if errors.As(err, &malformed) {
			// Not a copy to serve from: refused like one out of sync (a
			// lock held is let go, so that a node with a copy can serve).
			return fmt.Errorf("%w: %s's block map of %s cannot be read: %v", errStrict, self, img.Name, err)
		}
		if err != nil {
			return fmt.Errorf("read %s's block map on %s: %w", img.Name, self, err)
		}
		if bm.Count(placement.InSync) == bm.Len() {
			return nil
		}
		return fmt.Errorf("%w: %s's copy of %s has %d blocks not in sync; it is served only by a node with an in-sync copy (override: ukai image set %s --allow-remote %s)",
			errStrict, self, img.Name, bm.Len()-bm.Count(placement.InSync), img.Name, self)
	}
	return fmt.Errorf("%w: %s has no copy of %s; it is served only by a node with an in-sync copy (override: ukai image set %s --allow-remote %s)",
		errStrict, self, img.Name, img.Name, self)
}

// errStrict is a takeover strict locality refuses (not a failure to read
// what it needs: that one is retried, and a lock held stays held).
var errStrict = errors.New("locality strict")

// onlyLocalCopy says whether node holds the image's only copy.
func onlyLocalCopy(img meta.Image, node string) bool {
	return len(img.Locations) == 1 && img.Locations[0] == node
}
