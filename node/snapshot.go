package node

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/node/cow"
	"github.com/ukai-storage/ukai/node/served"
	"github.com/ukai-storage/ukai/placement"
	"github.com/ukai-storage/ukai/target/scsi"
)

// Snapshots: creating, listing, deleting and cloning them, on the
// origin's owner. What a snapshot is and how blocks are preserved into it
// before they change is package cow's (see its doc).

// The copy-on-write rules live in package cow; the node serves it the
// images (cowImage) and their ownership (cowHost).

// cowImage is a served image as package cow sees it.
type cowImage struct {
	n *Node
	s *served.Image
}

func (c cowImage) Record() meta.Image { return c.s.Record() }
func (c cowImage) ReadAt(ctx context.Context, p []byte, off int64) error {
	return c.s.Vol.ReadAt(ctx, p, off)
}
func (c cowImage) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	return c.s.Vol.WriteAt(ctx, p, off, fua)
}
func (c cowImage) ReadHeld(ctx context.Context, p []byte, off int64) error {
	return c.s.Vol.ReadHeld(ctx, p, off)
}

// Hole: this node's copy is in sync at block b and holds a hole there.
func (c cowImage) Hole(b int64) bool {
	img := c.s.Record()
	if c.s.Local == nil || c.s.Vol.State(c.n.cfg.Node.Name, b) != placement.InSync {
		return false
	}
	off := b * img.BlockSize
	return c.s.Local.Hole(off, min(img.BlockSize, img.Size-off))
}

// cowHost is the node as package cow's Host.
type cowHost struct{ n *Node }

func (h cowHost) Snapshot(ref meta.SnapshotRef) cow.Image {
	if sn := h.n.servedSnapshot(ref); sn != nil {
		return cowImage{h.n, sn}
	}
	return nil
}
func (h cowHost) Ready(img cow.Image) bool { return h.n.mayServe(img.(cowImage).s) }
func (h cowHost) Hold(img cow.Image) func() {
	s := img.(cowImage).s
	s.BeginBusy()
	return func() { s.EndBusy() }
}

// preserve copies blocks of s into its snapshots before they change (the
// volume's BeforeWrite; see cow.Maps.Preserve).
func (n *Node) preserve(ctx context.Context, s *served.Image, blocks []int64) error {
	return s.Cow.Preserve(ctx, cowImage{n, s}, blocks)
}

// readSnapshot reads p at off of snapshot sn of s as it was when taken.
// This node owns s, and must still own it with the same generation at
// every block.
func (n *Node) readSnapshot(ctx context.Context, s, sn *served.Image, p []byte, off int64) error {
	gen := s.Record().Generation
	return s.Cow.Read(ctx, cowImage{n, s}, cowImage{n, sn}, p, off, func() error {
		if !n.mayServe(s) || s.Record().Generation != gen {
			return errNotOwner(s.Record().Owner)
		}
		return nil
	})
}

// snapshotHole says whether block b of snapshot sn of s is zeros without
// reading it (cow.Maps.Hole).
func (n *Node) snapshotHole(ctx context.Context, s, sn *served.Image, b int64) bool {
	return s.Cow.Hole(ctx, cowImage{n, s}, cowImage{n, sn}, b)
}

// servedSnapshot returns the served snapshot of ref as this node has it,
// without reconciling (the caller may hold blocks of the origin).
func (n *Node) servedSnapshot(ref meta.SnapshotRef) *served.Image {
	if sn := n.images.Get(ref.Name); sn != nil && sn.Record().ID == ref.ID {
		return sn
	}
	return nil
}

// ensureSnapshots makes this node own the snapshots of s (which it owns)
// before a write to s takes its blocks, so preserving never waits for
// ownership with blocks held.
func (n *Node) ensureSnapshots(ctx context.Context, s *served.Image) error {
	for _, ref := range s.Record().Snapshots {
		sn := n.servedSnapshot(ref)
		if sn != nil && n.mayServe(sn) {
			continue
		}
		sn, err := n.snapshotServed(ctx, ref)
		if errors.Is(err, cow.ErrGone) {
			continue
		}
		if err != nil {
			return err
		}
		if err := n.acquireWait(ctx, sn); err != nil {
			return notReady(err)
		}
	}
	return nil
}

// snapshotServed returns the served snapshot of ref.
func (n *Node) snapshotServed(ctx context.Context, ref meta.SnapshotRef) (*served.Image, error) {
	sn, err := n.servedByName(ctx, ref.Name)
	if errors.Is(err, meta.ErrImageNotFound) {
		return nil, cow.ErrGone
	}
	if err != nil {
		return nil, err
	}
	if sn.Record().ID != ref.ID {
		return nil, cow.ErrGone
	}
	return sn, nil
}

// acquireWait takes ownership of s, waiting up to takeoverWait for another
// owner to let go or for its lease to run out.
func (n *Node) acquireWait(ctx context.Context, s *served.Image) error {
	return n.acquireWaitUnless(ctx, s, func(error) bool { return false })
}

// acquireWaitUnless is acquireWait that gives up at once on an error stop
// says is final.
func (n *Node) acquireWaitUnless(ctx context.Context, s *served.Image, stop func(error) bool) error {
	deadline := time.Now().Add(takeoverWait)
	for {
		err := n.acquire(ctx, s)
		if err == nil {
			return nil
		}
		if stop(err) || time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("take ownership of %s: %w", s.Record().Name, err)
		}
		sleep(ctx, 200*time.Millisecond)
		if img, _, rerr := n.cat.GetImage(ctx, s.Record().Name); rerr == nil {
			_ = n.applyNow(ctx, s, img, false)
		}
	}
}

// ownSnapshot makes this node own snapshot sn (fresh block maps) for
// reading it, and marks it busy; done ends that.
func (n *Node) ownSnapshot(ctx context.Context, sn *served.Image) (done func(), err error) {
	sn.BeginBusy()
	if err := n.acquireWait(ctx, sn); err != nil {
		sn.EndBusy()
		return nil, err
	}
	return func() { sn.EndBusy() }, nil
}

// ownOrigin makes this node the owner of image name (it must not be a
// snapshot) for an operation on its snapshots, and marks it busy; done
// ends that.
func (n *Node) ownOrigin(ctx context.Context, name string) (s *served.Image, done func(), err error) {
	s, err = n.servedByName(ctx, name)
	if err != nil {
		return nil, nil, err
	}
	if s.Record().IsSnapshot() {
		return nil, nil, fmt.Errorf("%w: %q is a snapshot", meta.ErrInvalid, name)
	}
	s.BeginBusy()
	if err := n.acquireWait(ctx, s); err != nil {
		s.EndBusy()
		return nil, nil, err
	}
	return s, func() { s.EndBusy() }, nil
}

// CreateSnapshot implements api.Service. It runs on the image's owner
// (forwarded there when another live node owns it, else this node takes
// ownership). I/O to the image pauses only while the snapshot is added to
// the image's record (one check-and-set).
func (n *Node) CreateSnapshot(ctx context.Context, image string, req api.SnapshotRequest) (api.Snapshot, error) {
	if err := meta.ValidateName(image); err != nil {
		return api.Snapshot{}, err
	}
	if err := meta.ValidateSnapshotName(req.Name); err != nil {
		return api.Snapshot{}, err
	}
	if c, err := n.remoteOwner(ctx, image); err != nil {
		return api.Snapshot{}, err
	} else if c != nil {
		return c.CreateSnapshot(ctx, image, req)
	}
	s, done, err := n.ownOrigin(ctx, image)
	if err != nil {
		return api.Snapshot{}, err
	}
	defer done()
	return n.snapshot(ctx, s, req.Name)
}

// snapshot takes image s's snapshot short (its own name: the record is
// named image@short).
func (n *Node) snapshot(ctx context.Context, s *served.Image, short string) (api.Snapshot, error) {
	// Not while a revert rewrites the image: the snapshot would hold a
	// mix (the revert's fence makes this wait for its end).
	if err := s.Fence.Enter(ctx); err != nil {
		return api.Snapshot{}, err
	}
	defer s.Fence.Leave()
	img := s.Record()
	name := meta.SnapshotName(img.Name, short)
	if _, err := n.snapshotRecord(ctx, img.Name, short); err == nil {
		return api.Snapshot{}, fmt.Errorf("%w: %s already has a snapshot %s", meta.ErrImageExists, img.Name, short)
	} else if !errors.Is(err, meta.ErrImageNotFound) {
		return api.Snapshot{}, err
	}
	snap := meta.Image{
		Version: meta.RecordVersion, ID: meta.NewImageID(), Name: name, Size: img.Size, BlockSize: img.BlockSize,
		Locations: slices.Clone(img.Locations), MinCopies: img.MinCopies, Generation: 1,
		Origin: &meta.Origin{Name: img.Name, ID: img.ID},
	}
	for _, loc := range snap.Locations {
		if err := n.prepareCopyOn(ctx, loc, snap); err != nil {
			return api.Snapshot{}, err
		}
	}
	if err := n.cat.CreateCowMap(ctx, snap); err != nil {
		return api.Snapshot{}, err
	}
	snap, err := n.cat.CreateImage(ctx, snap, placement.InSync)
	if err != nil {
		return api.Snapshot{}, err
	}
	start := time.Now()
	var paused time.Duration
	err = s.Vol.Exclusively(func() error {
		// No write runs now: the snapshot is the image as the writes
		// acknowledged so far left it.
		held := time.Now()
		defer func() { paused = time.Since(held) }()
		rec, err := n.cat.UpdateImage(ctx, img.Name, func(i *meta.Image) error {
			if i.ID != img.ID {
				return fmt.Errorf("%q: %w", img.Name, meta.ErrImageNotFound)
			}
			if i.Owner != n.cfg.Node.Name {
				return errNotOwner(i.Owner)
			}
			i.Snapshots = append(i.Snapshots, meta.SnapshotRef{Name: snap.Name, ID: snap.ID})
			return nil
		})
		if err != nil {
			return err
		}
		s.SetSnapshots(rec)
		return nil
	})
	if err != nil {
		// The update may have landed although it reported an error (a
		// store that timed out after committing). Writes since were not
		// preserved, so such a snapshot is not the image of one instant:
		// take it off the image's record before deleting it.
		if uerr := n.unlistSnapshot(context.WithoutCancel(ctx), img.Name, snap); uerr != nil {
			n.log.Error("a failed snapshot may still be named by its image; delete it with `ukai snapshot delete`", "image", img.Name, "snapshot", snap.Name, "err", uerr)
		}
		if derr := n.cat.DeleteImage(ctx, snap, 0); derr != nil {
			n.log.Warn("cannot remove the snapshot that could not be attached to its image", "snapshot", snap.Name, "err", derr)
		}
		return api.Snapshot{}, fmt.Errorf("snapshot %s of %s: %w", snap.Name, img.Name, err)
	}
	n.log.Info("snapshot taken", "image", img.Name, "snapshot", snap.Name, "io_paused", paused, "took", time.Since(start))
	for _, name := range []string{img.Name, snap.Name} {
		if _, err := n.recon.Refresh(ctx, name); err != nil {
			n.log.Warn("reconcile after snapshot", "image", name, "err", err)
		}
	}
	d, err := n.describeSnapshot(ctx, snap)
	d.IOPausedUS = paused.Microseconds()
	return d, err
}

// snapshotRecord reads image's snapshot short: the record image@short (or,
// written before snapshots were named per image, the record short whose
// origin is image).
func (n *Node) snapshotRecord(ctx context.Context, image, short string) (meta.Image, error) {
	full := meta.SnapshotName(image, short)
	rec, _, err := n.cat.GetImage(ctx, full)
	if err == nil || !errors.Is(err, meta.ErrImageNotFound) {
		return rec, err
	}
	if meta.ValidateName(short) == nil {
		if old, _, err := n.cat.GetImage(ctx, short); err == nil && old.IsSnapshot() && old.Origin.Name == image {
			return old, nil
		}
	}
	return meta.Image{}, fmt.Errorf("no snapshot %s: %w", full, meta.ErrImageNotFound)
}

// lookupRecord reads the record name stands for: a snapshot's full name
// (vm1@s1) may stand for a record from before snapshots were named per
// image (s1).
func (n *Node) lookupRecord(ctx context.Context, name string) (meta.Image, error) {
	img, _, err := n.cat.GetImage(ctx, name)
	image, short, ok := meta.SplitSnapshotName(name)
	if !ok || !errors.Is(err, meta.ErrImageNotFound) {
		return img, err
	}
	if old, lerr := n.snapshotRecord(ctx, image, short); lerr == nil {
		return old, nil
	}
	return img, err
}

// snapshotShort is a snapshot record's own name (s1 of vm1@s1).
func snapshotShort(snap meta.Image) string {
	if _, short, ok := meta.SplitSnapshotName(snap.Name); ok {
		return short
	}
	return snap.Name
}

func (n *Node) describeSnapshot(ctx context.Context, snap meta.Image) (api.Snapshot, error) {
	out := api.Snapshot{Name: snapshotShort(snap), FullName: meta.SnapshotName(snap.Origin.Name, snapshotShort(snap)), ID: snap.ID, Image: snap.Origin.Name, Size: snap.Size, BlockSize: snap.BlockSize, Created: snap.Created, Locations: snap.Locations}
	m, err := n.cat.BlockMap(ctx, snap, meta.CowNode)
	if err != nil {
		return api.Snapshot{}, err
	}
	out.PreservedBlocks = m.Count(placement.InSync)
	return out, nil
}

// ListSnapshots implements api.Service.
func (n *Node) ListSnapshots(ctx context.Context, image string, all bool) ([]api.Snapshot, error) {
	if err := meta.ValidateName(image); err != nil {
		return nil, err
	}
	img, _, err := n.cat.GetImage(ctx, image)
	if err != nil {
		return nil, err
	}
	out := []api.Snapshot{}
	for _, ref := range img.Snapshots {
		if _, short, _ := meta.SplitSnapshotName(ref.Name); meta.HiddenSnapshot(short) && !all {
			continue
		}
		snap, _, err := n.cat.GetImage(ctx, ref.Name)
		if err != nil || snap.ID != ref.ID {
			return nil, fmt.Errorf("snapshot %s of %s: record missing or replaced (%v)", ref.Name, image, err)
		}
		d, err := n.describeSnapshot(ctx, snap)
		if err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	return out, nil
}

// DeleteSnapshot implements api.Service: the origin stops preserving into
// the snapshot (on its owner, between two preservations), then the
// snapshot is deleted like an image.
func (n *Node) DeleteSnapshot(ctx context.Context, image, short string) error {
	if err := meta.ValidateName(image); err != nil {
		return err
	}
	// A hidden name is accepted here: a clone that died leaves its
	// temporary snapshot, which `snapshot list --all` shows.
	if err := meta.ValidateRecordName(meta.SnapshotName(image, short)); err != nil {
		return err
	}
	named := func(r meta.SnapshotRef) bool { return r.Name == meta.SnapshotName(image, short) || r.Name == short }
	snap, err := n.snapshotRecord(ctx, image, short)
	dangling := errors.Is(err, meta.ErrImageNotFound)
	switch {
	case dangling:
		// The origin may still name a snapshot whose record is gone (a
		// failed take): drop the reference.
		origin, _, oerr := n.cat.GetImage(ctx, image)
		if oerr != nil || !slices.ContainsFunc(origin.Snapshots, named) {
			return err
		}
		snap = meta.Image{Name: meta.SnapshotName(image, short), Origin: &meta.Origin{Name: image, ID: origin.ID}}
		for _, r := range origin.Snapshots {
			if named(r) {
				snap.Name, snap.ID = r.Name, r.ID
			}
		}
	case err != nil:
		return err
	}
	name := snap.Name
	if c, err := n.remoteOwner(ctx, image); err != nil && !errors.Is(err, meta.ErrImageNotFound) {
		return err
	} else if c != nil {
		return c.DeleteSnapshot(ctx, image, short)
	}
	if err := n.unlistSnapshot(ctx, image, snap); err != nil {
		return err
	}
	if dangling {
		return nil
	}
	if err := n.cat.DeleteImage(ctx, snap, 0); err != nil {
		return err
	}
	if _, err := n.recon.Refresh(ctx, image); err != nil {
		return err
	}
	_, err = n.recon.Refresh(ctx, name)
	return err
}

// unlistSnapshot removes snap from its origin's record (and from this
// node's copy of it, between two preservations).
func (n *Node) unlistSnapshot(ctx context.Context, image string, snap meta.Image) error {
	s := n.images.Get(image)
	unlist := func() (bool, error) {
		rec, err := n.cat.UpdateImage(ctx, image, func(i *meta.Image) error {
			if i.ID != snap.Origin.ID {
				return errSkip
			}
			i.Snapshots = slices.DeleteFunc(i.Snapshots, func(r meta.SnapshotRef) bool { return r.ID == snap.ID })
			return nil
		})
		switch {
		case err == nil:
			if s != nil && s.Record().ID == rec.ID {
				s.SetSnapshots(rec)
				return true, nil
			}
			return false, nil
		case errors.Is(err, errSkip), errors.Is(err, meta.ErrImageNotFound):
			return false, nil
		}
		return false, err
	}
	if s == nil {
		_, err := unlist()
		return err
	}
	return s.Cow.Unlisting(snap.ID, unlist)
}

// copyInto fills the new image dst (owned here, fresh: all zeros) from
// read, block by block, skipping blocks of zeros (hole: known to be zeros
// without reading; may be nil).
func (n *Node) copyInto(ctx context.Context, dst *served.Image, size int64, read func(p []byte, off int64) error, hole func(off, n int64) bool, progress func(api.CopyProgress)) error {
	img := dst.Record()
	buf := make([]byte, img.BlockSize)
	var told time.Time
	for off := int64(0); off < size; off += img.BlockSize {
		// At most 5 lines a second: a clone of 64 KiB blocks would send
		// thousands.
		if progress != nil && time.Since(told) >= 200*time.Millisecond {
			progress(api.CopyProgress{Done: off, Total: size})
			told = time.Now()
		}
		p := buf[:min(img.BlockSize, size-off)]
		if hole != nil && hole(off, int64(len(p))) {
			continue
		}
		if err := read(p, off); err != nil {
			return fmt.Errorf("read at %d: %w", off, err)
		}
		if scsi.AllZero(p) {
			continue
		}
		if err := dst.Vol.WriteAt(ctx, p, off, false); err != nil {
			return fmt.Errorf("write at %d: %w", off, err)
		}
	}
	return dst.Vol.Flush(ctx)
}

// createCopy creates image req.Name from req.Source, a snapshot (its
// point-in-time data) or an image (a crash-consistent clone through a
// temporary snapshot). It runs on the source's origin's owner.
func (n *Node) createCopy(ctx context.Context, req api.CreateImageRequest, progress func(api.CopyProgress)) (api.Image, error) {
	src, err := n.lookupRecord(ctx, req.Source)
	if err != nil {
		return api.Image{}, fmt.Errorf("source: %w", err)
	}
	origin := src.Name
	if src.IsSnapshot() {
		origin = src.Origin.Name
	}
	if c, err := n.remoteOwner(ctx, origin); err != nil {
		return api.Image{}, err
	} else if c != nil {
		if progress != nil {
			return c.CopyImage(ctx, req, progress)
		}
		return c.CreateImage(ctx, req)
	}
	if req.Size == 0 {
		req.Size = src.Size
	}
	if req.Size < src.Size {
		return api.Image{}, fmt.Errorf("%w: size %s is smaller than the source %q (%s)", meta.ErrInvalid, meta.FormatSize(req.Size), src.Name, meta.FormatSize(src.Size))
	}
	if req.BlockSize == 0 {
		req.BlockSize = src.BlockSize
	}
	if len(req.Locations) == 0 {
		req.Locations = src.Locations
	}
	if req.MinCopies == 0 {
		req.MinCopies = min(src.MinCopies, len(req.Locations))
	}
	s, done, err := n.ownOrigin(ctx, origin)
	if err != nil {
		return api.Image{}, err
	}
	defer done()
	sn := (*served.Image)(nil)
	if src.IsSnapshot() {
		if sn, err = n.snapshotServed(ctx, meta.SnapshotRef{Name: src.Name, ID: src.ID}); err != nil {
			return api.Image{}, fmt.Errorf("source %s: %w", src.Name, err)
		}
	} else {
		// A clone: a temporary snapshot fixes the point in time, so the
		// source stays in use meanwhile.
		// Hidden (a leading '.'): no operator can take that name, and
		// `snapshot list` shows it only with --all.
		tmp := fmt.Sprintf(".clone-%s-%s", meta.NewImageID()[:12], time.Now().UTC().Format("150405"))
		if _, err := n.snapshot(ctx, s, tmp); err != nil {
			return api.Image{}, fmt.Errorf("clone %s: %w", src.Name, err)
		}
		defer func() {
			if err := n.DeleteSnapshot(context.WithoutCancel(ctx), src.Name, tmp); err != nil {
				n.log.Warn("cannot delete the temporary snapshot of a clone", "snapshot", tmp, "err", err)
			}
		}()
		snapRec, _, err := n.cat.GetImage(ctx, meta.SnapshotName(src.Name, tmp))
		if err != nil {
			return api.Image{}, err
		}
		if sn, err = n.snapshotServed(ctx, meta.SnapshotRef{Name: snapRec.Name, ID: snapRec.ID}); err != nil {
			return api.Image{}, err
		}
	}
	snapDone, err := n.ownSnapshot(ctx, sn)
	if err != nil {
		return api.Image{}, err
	}
	defer snapDone()
	plain := req
	plain.Source = ""
	created, err := n.createImage(ctx, plain)
	if err != nil {
		return api.Image{}, err
	}
	start := time.Now()
	err = func() error {
		dst, err := n.servedByName(ctx, created.Name)
		if err != nil {
			return err
		}
		dst.BeginBusy()
		defer dst.EndBusy()
		if err := n.acquireWait(ctx, dst); err != nil {
			return err
		}
		snap := sn.Record()
		return n.copyInto(ctx, dst, src.Size, func(p []byte, off int64) error { return n.readSnapshot(ctx, s, sn, p, off) },
			func(off, length int64) bool {
				// Whole snapshot blocks only: dst may have another block size.
				if off%snap.BlockSize != 0 || length > snap.BlockSize {
					return false
				}
				return n.snapshotHole(ctx, s, sn, off/snap.BlockSize)
			}, progress)
	}()
	if err != nil {
		if derr := n.DeleteImage(context.WithoutCancel(ctx), created.Name, true); derr != nil {
			n.log.Warn("cannot delete the image whose copy failed", "image", created.Name, "err", derr)
		}
		return api.Image{}, fmt.Errorf("copy %s into %s: %w", src.Name, created.Name, err)
	}
	n.log.Info("image created from a copy", "image", created.Name, "source", src.Name, "took", time.Since(start))
	return n.GetImage(ctx, created.Name, api.BlockView{})
}

// ResizeImage implements api.Service: grow an image online. Every copy's
// file grows first, then the block maps and the record; each node then
// grows its LUN, and every initiator logged in gets a CAPACITY DATA HAS
// CHANGED unit attention.
func (n *Node) ResizeImage(ctx context.Context, name string, size int64) (api.Image, error) {
	if err := meta.ValidateName(name); err != nil {
		return api.Image{}, err
	}
	img, _, err := n.cat.GetImage(ctx, name)
	if err != nil {
		return api.Image{}, err
	}
	if img.IsSnapshot() {
		return api.Image{}, fmt.Errorf("%w: %q is a snapshot: snapshots keep their size", meta.ErrInvalid, name)
	}
	if err := meta.ValidateGeometry(size, img.BlockSize); err != nil {
		return api.Image{}, err
	}
	if size < img.Size {
		return api.Image{}, fmt.Errorf("%w: %q is %s: shrinking to %s would lose data and is not supported", meta.ErrInvalid, name, meta.FormatSize(img.Size), meta.FormatSize(size))
	}
	// On the owner, which applies the new size first: a node that learns
	// it earlier and forwards I/O beyond the old end makes the owner read
	// the record again (ownedBackend.inRange).
	if c, err := n.remoteOwner(ctx, name); err != nil {
		return api.Image{}, err
	} else if c != nil {
		return c.ResizeImage(ctx, name, size)
	}
	for _, loc := range img.Locations {
		if err := n.growCopyOn(ctx, loc, img.ID, size); err != nil {
			return api.Image{}, err
		}
	}
	if _, err := n.cat.GrowImage(ctx, name, size); err != nil {
		return api.Image{}, err
	}
	if _, err := n.recon.Refresh(ctx, name); err != nil {
		n.log.Warn("reconcile after resize", "err", err)
	}
	return n.GetImage(ctx, name, api.BlockView{})
}

func (n *Node) growCopyOn(ctx context.Context, node, id string, size int64) error {
	if node == n.cfg.Node.Name {
		return n.GrowCopy(ctx, id, size)
	}
	c, err := n.controlClient(node)
	if err != nil {
		return fmt.Errorf("grow the copy on %s: %w", node, err)
	}
	if err := c.GrowCopy(ctx, id, size); err != nil {
		return fmt.Errorf("grow the copy on %s: %w", node, err)
	}
	return nil
}

// GrowCopy implements peer.Control: extend this node's copy of image id to
// size bytes (zeros), before the record says so.
func (n *Node) GrowCopy(_ context.Context, id string, size int64) error {
	if err := meta.ValidateID(id); err != nil {
		return err
	}
	if s := n.servedByID(id); s != nil && s.Local != nil {
		return s.Local.Grow(size)
	}
	return n.dir.Grow(id, size)
}
