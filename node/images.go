package node

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"reflect"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/cluster/peer"
	"github.com/ukai-storage/ukai/node/cow"
	"github.com/ukai-storage/ukai/node/served"
	"github.com/ukai-storage/ukai/placement"
	"github.com/ukai-storage/ukai/target/lun"
	"github.com/ukai-storage/ukai/target/scsi"
)

// newServed returns img as served here, before its copies and volume are
// set up.
func (n *Node) newServed(img meta.Image) *served.Image {
	return served.New(img, cow.New(n.cat, cowHost{n}))
}

// resyncEvery is how often the node lists every record (reconcile) on
// top of its doorbells: a safety net, and how a node that serves an image
// the record does not name (a login without a copy) hears of changes its
// I/O path did not bring.
const resyncEvery = 10 * time.Minute

// watch keeps the served set in line with the catalog (meta.Follow): a
// full reconcile at start and every resyncEvery, and in between a read of
// each record whose doorbell rang (package reconcile).
func (n *Node) watch(ctx context.Context) {
	meta.Follow(ctx, meta.FollowConfig{
		Catalog: n.cat,
		Node:    n.cfg.Node.Name,
		Resync:  resyncEvery,
		Full:    n.recon.Full,
		Changed: n.recon.Refresh,
		Result: func(err error) {
			n.noteStore(err)
			if err != nil && ctx.Err() == nil && !errors.Is(err, meta.ErrUnavailable) {
				n.log.Warn("reconcile failed", "err", err)
			}
		},
	})
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

func (n *Node) iqn(image string) string { return n.cfg.ISCSI.IQNPrefix + ":" + image }

// removeCopy removes the data file and cached record of image id; files
// already gone are not an error.
func (n *Node) removeCopy(id string) error {
	if n.peerSrv != nil {
		n.peerSrv.Forget(id) // its fence goes with the copy
	}
	return n.dir.Remove(id)
}

// exportCached exports every image whose record is cached in the data dir
// (images this node holds a copy of).
func (n *Node) exportCached(ctx context.Context) {
	imgs, bad := n.dir.CachedRecords()
	for _, err := range bad {
		n.log.Warn("ignoring unreadable cached image record", "err", err)
	}
	for _, img := range imgs {
		n.recon.Do(func() {
			if err := n.export(ctx, img, true); err != nil {
				n.log.Warn("cannot export cached image", "image", img.Name, "err", err)
			}
		})
	}
}

// withdrawChecked withdraws a served image whose record is gone, removing
// its local copy only if a tombstone says it was deleted on purpose. An
// image in the trash keeps its copy and loses its cached record (a restart
// must not export it again); the trash sweep removes the copy once it is
// purged.
func (n *Node) withdrawChecked(ctx context.Context, s *served.Image) error {
	id := s.Record().ID
	// The trash first: an entry means the data is wanted, whatever else
	// the store holds.
	trashed, err := n.cat.Trashed(ctx, id)
	if err != nil {
		return err
	}
	if trashed {
		err := n.withdraw(s, false, true)
		if s.Local != nil {
			err = errors.Join(err, n.dir.Forget(id))
		}
		return err
	}
	deleted, err := n.cat.Tombstoned(ctx, id)
	if err != nil {
		return err
	}
	return n.withdraw(s, deleted, false)
}

// exportLazily exports an image this node neither holds a copy of nor
// owns, when it is first needed here (an iSCSI login, an operation): its
// record is read and the image served from then on.
func (n *Node) exportLazily(ctx context.Context, name string) (*served.Image, error) {
	if err := n.recon.ExportLazily(ctx, name); err != nil {
		return nil, err
	}
	if s := n.images.Get(name); s != nil {
		return s, nil
	}
	return nil, fmt.Errorf("%q: %w", name, meta.ErrImageNotFound)
}

// openLocal opens this node's copy of img, creating it when the node is a
// new location. A copy whose file is missing while the block map says it
// holds in-sync blocks was lost (disk replaced, file removed): it is
// recorded out of sync everywhere before an empty file takes its place, so
// zeros are never served as data.
func (n *Node) openLocal(ctx context.Context, img meta.Image) (*lun.FileCopy, error) {
	c, err := n.dir.Open(img.ID, img.Size)
	if err == nil || !errors.Is(err, os.ErrNotExist) {
		return c, err
	}
	bm, err := n.cat.BlockMap(ctx, img, n.cfg.Node.Name)
	if err != nil {
		return nil, err
	}
	if held := bm.Len() - bm.Count(placement.OutOfSync); held > 0 {
		path, _ := n.dir.ImagePath(img.ID)
		n.log.Error("the copy of an image this node should hold is missing: recording it out of sync", "image", img.Name, "file", path, "in_sync_blocks", held)
		all := make([]int64, bm.Len())
		for i := range all {
			all[i] = int64(i)
		}
		if err := n.cat.SetBlockStates(ctx, img, n.cfg.Node.Name, all, placement.OutOfSync); err != nil {
			return nil, err
		}
	}
	return n.dir.Create(img.ID, img.Size)
}

// export starts serving img. With cached (start-up from the data dir,
// maybe without the catalog) only the local copy is used until the
// catalog is readable. The caller holds the reconciler's lock.
func (n *Node) export(ctx context.Context, img meta.Image, cached bool) error {
	if n.images.Get(img.Name) != nil {
		return nil
	}
	s := n.newServed(img)
	if img.HasLocation(n.cfg.Node.Name) {
		var err error
		if cached {
			s.Local, err = n.dir.Open(img.ID, img.Size)
		} else {
			s.Local, err = n.openLocal(ctx, img)
		}
		if err != nil {
			return fmt.Errorf("image %s: %w", img.Name, err)
		}
		if err := n.dir.CacheRecord(img); err != nil {
			s.Local.Close()
			return err
		}
	}
	reps, maps, err := n.replicas(ctx, s, img, cached)
	if err != nil {
		if s.Local != nil {
			s.Local.Close()
		}
		return fmt.Errorf("image %s: %w", img.Name, err)
	}
	s.Vol, err = lun.NewVolume(lun.Config{
		Size: img.Size, BlockSize: img.BlockSize, MinCopies: img.MinCopies,
		CopyTimeout: n.cfg.Peer.Timeout, Alive: n.alive, Log: n.log.With("image", img.Name),
		BeforeWrite: func(ctx context.Context, blocks []int64) error { return n.beforeWrite(ctx, s, blocks) },
	}, reps, maps, &mapStore{n: n, s: s})
	if err != nil {
		if s.Local != nil {
			s.Local.Close()
		}
		return fmt.Errorf("image %s: %w", img.Name, err)
	}
	s.Act = n.newActivity(s)
	var devID [16]byte
	if b, err := hex.DecodeString(img.ID); err == nil {
		copy(devID[:], b)
	}
	s.LU, err = scsi.NewLU(scsi.Config{
		Size:                  img.Size,
		LogicalBlockSize:      meta.SectorSize,
		OptimalTransferBlocks: uint32(img.BlockSize / meta.SectorSize),
		Serial:                img.ID,
		DeviceID:              devID,
		ThinProvisioning:      true,
		WriteCache:            true,
		MaxUnmapBlocks:        uint32(min(img.Size/meta.SectorSize, 1<<22)),
		MaxWriteSameBlocks:    uint32(min(img.Size/meta.SectorSize, 1<<22)),
		MaxTransferBlocks:     (32 << 20) / meta.SectorSize,
		ALUA:                  aluaSource{n, s},
		Remote:                n.router.Remote(s),
	}, n.metrics.Backend(img.Name, n.router.Backend(s)), n.log.With("image", img.Name))
	if err != nil {
		s.Close()
		return fmt.Errorf("image %s: %w", img.Name, err)
	}
	s.PathsChanged = n.pathsWatcher(s)
	if cached {
		// Exported from the cache, maybe without the catalog: not owned
		// (acquire decides: only an image whose only copy is here may be
		// served without the catalog), and the first reconcile rebuilds
		// the copies and maps from the catalog.
		s.FromCache = true
	}
	n.images.Add(s)
	iqn := n.iqn(img.Name)
	if img.IsSnapshot() {
		iqn = "" // not a target
	}
	n.log.Info("image exported", "image", img.Name, "id", img.ID, "iqn", iqn, "locations", img.Locations, "local_copy", s.Local != nil)
	return nil
}

// apply brings a served image in line with a changed record: new or
// removed locations, a new owner or generation, a new min_copies. With
// force (or when the image was exported from its cached record) the
// replicas and block maps are rebuilt from the catalog even if the record
// did not change.
func (n *Node) apply(ctx context.Context, s *served.Image, img meta.Image, force bool) error {
	old := s.Record()
	if img.ID != old.ID {
		// Another image under the same name (deleted and created again):
		// reconcile withdraws this one and serves that one; a caller that
		// read the record by name must not graft it onto this one.
		return fmt.Errorf("image %s: the record read is another image (id %s, serving %s)", img.Name, img.ID, old.ID)
	}
	if img.Rev != 0 && old.Rev != 0 && img.Rev < old.Rev && img.ID == old.ID {
		return nil // older than what this node holds (read before a change it made)
	}
	same := old.Generation == img.Generation && old.Owner == img.Owner && old.MinCopies == img.MinCopies &&
		slices.Equal(old.Locations, img.Locations) && old.SyncPaused == img.SyncPaused && old.Size == img.Size
	if !force && !s.FromCache && same {
		// Nothing to rebuild, but the record is kept: what it says beyond
		// copies and owner (snapshots, the node it is attached to) is
		// read from it. Before, only a change of snapshots was kept, and
		// an owner attached to after it took the image still released it
		// when idle.
		s.SetRecord(img)
		return nil
	}
	hasLocal := img.HasLocation(n.cfg.Node.Name)
	switch {
	case hasLocal && s.Local == nil:
		c, err := n.openLocal(ctx, img)
		if err != nil {
			return fmt.Errorf("image %s: %w", img.Name, err)
		}
		s.Local = c
	case !hasLocal && s.Local != nil:
		// This node's copy was removed from the image (relocation): once
		// the volume no longer uses it, the file goes.
		defer func(c *lun.FileCopy, id string) {
			s.Vol.Drain()
			c.Close()
			n.removeCopy(id)
		}(s.Local, img.ID)
		s.Local = nil
	}
	if hasLocal {
		if err := n.dir.CacheRecord(img); err != nil {
			return err
		}
	}
	if img.Owner != n.cfg.Node.Name && s.Owned() {
		n.log.Warn("ownership of the image moved to another node", "image", img.Name, "owner", img.Owner)
		s.SetOwned(false)
		if !s.Offline.Load() {
			// The record deposed this node (its copy was removed, with a
			// new generation the copies now require): the lock must go
			// too, or nobody could take the image. After a takeover the
			// lock is the taker's already, and this does nothing.
			if err := n.cat.ReleaseOwnership(ctx, img.ID, n.cfg.Node.Name, s.Session()); err != nil {
				n.log.Warn("cannot release the ownership lock of an image this node no longer owns; it is freed when its session ends", "image", img.Name, "err", err)
			}
		}
	}
	// The version first, then the maps: out-of-sync records the volume
	// makes while the maps are read survive their install.
	at := s.Vol.MapVersion()
	reps, maps, err := n.replicas(ctx, s, img, false)
	if err != nil {
		return fmt.Errorf("image %s: %w", img.Name, err)
	}
	s.Vol.SetMinCopies(img.MinCopies)
	if img.Size > s.Vol.Size() {
		// Grown online: the copies' files are longer already.
		if s.Local != nil {
			if err := s.Local.Grow(img.Size); err != nil {
				return fmt.Errorf("image %s: %w", img.Name, err)
			}
		}
		if err := s.Vol.Grow(img.Size, reps, maps, at); err != nil {
			return fmt.Errorf("image %s: %w", img.Name, err)
		}
		if err := s.LU.Resize(img.Size); err != nil {
			return fmt.Errorf("image %s: %w", img.Name, err)
		}
		n.log.Info("image grown", "image", img.Name, "size", img.Size)
	} else if err := s.Vol.SetReplicas(reps, maps, at); err != nil {
		return fmt.Errorf("image %s: %w", img.Name, err)
	}
	s.SetRecord(img)
	s.FromCache = false
	return nil
}

// applyNow applies img to s outside a reconcile pass (a takeover, a
// fresher record read on the I/O path), under the reconciler's lock.
func (n *Node) applyNow(ctx context.Context, s *served.Image, img meta.Image, force bool) error {
	var err error
	n.recon.Do(func() { err = n.apply(ctx, s, img, force) })
	return err
}

// withdraw ends the sessions of an image that left the catalog and closes
// its copies. With deleted (the image has a tombstone) the local data file
// and cached record are removed; otherwise they are kept and the loss of
// the record is reported.
func (n *Node) withdraw(s *served.Image, deleted, trashed bool) error {
	img := s.Record()
	n.images.Remove(s)
	n.target.DropTarget(n.iqn(img.Name))
	n.metrics.Forget(img.Name)
	err := s.Close()
	if s.Local != nil {
		if deleted {
			err = errors.Join(err, n.removeCopy(img.ID))
			n.log.Info("image deleted", "image", img.Name, "id", img.ID)
		} else if trashed {
			n.log.Info("image in the trash: its target is withdrawn, its data kept until it is purged", "image", img.Name, "id", img.ID)
		} else {
			n.log.Error("the record of an image this node holds vanished without a delete; its target is withdrawn, its data kept",
				"image", img.Name, "id", img.ID)
		}
	}
	if err != nil {
		return fmt.Errorf("withdraw image %s: %w", img.Name, err)
	}
	return nil
}

// LookupTarget implements iscsi.Targets: an image not served here yet is
// exported on its first login.
func (n *Node) LookupTarget(iqn string) (*scsi.LU, bool) {
	name, ok := strings.CutPrefix(iqn, n.cfg.ISCSI.IQNPrefix+":")
	if !ok || meta.ValidateName(name) != nil {
		return nil, false
	}
	s := n.images.Get(name)
	if s == nil {
		ctx, cancel := context.WithTimeout(context.Background(), lazyExportTimeout)
		defer cancel()
		var err error
		if s, err = n.exportLazily(ctx, name); err != nil {
			if !errors.Is(err, meta.ErrImageNotFound) {
				n.log.Warn("cannot export image for a login", "image", name, "err", err)
			}
			return nil, false
		}
	}
	if s.Record().IsSnapshot() {
		return nil, false
	}
	return s.LU, true
}

// lazyExportTimeout bounds the catalog reads of an export on login.
const lazyExportTimeout = 10 * time.Second

// TargetNames implements iscsi.Targets: every image of the catalog (read
// now: discovery is rare, and images created elsewhere reach this node's
// own list only when they concern it), or, with the store unreachable,
// the images this node knows of.
func (n *Node) TargetNames() []string {
	set := map[string]bool{}
	ctx, cancel := context.WithTimeout(context.Background(), lazyExportTimeout)
	defer cancel()
	if imgs, _, _, err := n.cat.ListImages(ctx); err == nil {
		for _, img := range imgs {
			set[img.Name] = !img.IsSnapshot()
		}
	} else {
		for name, k := range n.recon.Known() {
			set[name] = !k.Snapshot
		}
		for _, s := range n.images.List(false) {
			set[s.Record().Name] = !s.Record().IsSnapshot()
		}
	}
	out := make([]string, 0, len(set))
	for name, target := range set {
		if target {
			out = append(out, n.iqn(name))
		}
	}
	sort.Strings(out)
	return out
}

// CreateImage implements api.Service. Every location prepares its sparse
// file first (through its control API), then the block maps (all in sync:
// every copy is zeros) and the record are written, then the image is
// exported here; the other nodes export it when they see the record.
func (n *Node) CreateImage(ctx context.Context, req api.CreateImageRequest) (api.Image, error) {
	if req.Source != "" {
		return n.CopyImage(ctx, req, nil)
	}
	return n.createImage(ctx, req)
}

// CopyImage implements api.Service: an image from req.Source, progress
// (when not nil) called as the source's data is copied.
func (n *Node) CopyImage(ctx context.Context, req api.CreateImageRequest, progress func(api.CopyProgress)) (api.Image, error) {
	if err := meta.ValidateName(req.Name); err != nil {
		return api.Image{}, err
	}
	if err := meta.ValidateRecordName(req.Source); err != nil {
		return api.Image{}, fmt.Errorf("source: %w", err)
	}
	return n.createCopy(ctx, req, progress)
}

func (n *Node) createImage(ctx context.Context, req api.CreateImageRequest) (api.Image, error) {
	if req.BlockSize == 0 {
		req.BlockSize = meta.DefaultBlockSize
	}
	if err := meta.ValidateName(req.Name); err != nil {
		return api.Image{}, err
	}
	if err := meta.ValidateGeometry(req.Size, req.BlockSize); err != nil {
		return api.Image{}, err
	}
	locs := req.Locations
	if len(locs) == 0 {
		locs = []string{n.cfg.Node.Name}
	}
	if req.MinCopies == 0 {
		req.MinCopies = 1
	}
	img := meta.Image{
		Version: meta.RecordVersion, ID: meta.NewImageID(), Name: req.Name, Size: req.Size,
		BlockSize: req.BlockSize, Locations: locs, MinCopies: req.MinCopies, Generation: 1,
	}
	if err := img.Validate(); err != nil {
		return api.Image{}, err
	}
	if _, _, err := n.cat.GetImage(ctx, img.Name); err == nil {
		return api.Image{}, fmt.Errorf("image %q: %w", img.Name, meta.ErrImageExists)
	} else if !errors.Is(err, meta.ErrImageNotFound) {
		return api.Image{}, err
	}
	for _, loc := range locs {
		if err := n.prepareCopyOn(ctx, loc, img); err != nil {
			return api.Image{}, err
		}
	}
	created, err := n.cat.CreateImage(ctx, img, placement.InSync)
	if err != nil {
		return api.Image{}, err
	}
	if _, err := n.recon.Refresh(ctx, created.Name); err != nil {
		n.log.Warn("reconcile after create", "err", err)
	}
	return n.GetImage(ctx, created.Name, api.BlockView{})
}

// prepareCopyOn makes node create its empty copy of img.
func (n *Node) prepareCopyOn(ctx context.Context, node string, img meta.Image) error {
	var err error
	if node == n.cfg.Node.Name {
		err = n.PrepareCopy(ctx, img.ID, img.Size)
	} else {
		var c *peer.Client
		if c, err = n.controlClient(node); err == nil {
			err = c.PrepareCopy(ctx, img.ID, img.Size)
		}
	}
	switch {
	case err == nil:
		return nil
	case errors.Is(err, lun.ErrTooLarge), errors.Is(err, peer.ErrBadRequest) && strings.Contains(err.Error(), lun.ErrTooLarge.Error()):
		// The operator's input (a size the node cannot hold): a 400, in
		// words, not a server's file path.
		return fmt.Errorf("%w: size %s on %s: %v", meta.ErrInvalid, meta.FormatSize(img.Size), node, lun.ErrTooLarge)
	}
	return fmt.Errorf("prepare the copy on %s: %w", node, err)
}

// PrepareCopy implements peer.Control: create this node's empty sparse copy
// of a new image (idempotent for the same size). A size the file system
// cannot hold is the caller's bad request.
func (n *Node) PrepareCopy(_ context.Context, id string, size int64) error {
	err := n.dir.Prepare(id, size)
	if errors.Is(err, lun.ErrTooLarge) {
		return fmt.Errorf("%w: %v", peer.ErrBadRequest, err)
	}
	return err
}

// ListImages implements api.Service.
func (n *Node) ListImages(ctx context.Context) (api.ImageList, error) {
	imgs, _, bad, err := n.cat.ListImages(ctx)
	if err != nil {
		return api.ImageList{}, err
	}
	var out api.ImageList
	for _, b := range bad {
		out.Problems = append(out.Problems, b.Error())
	}
	for _, img := range imgs {
		ai, err := n.describe(ctx, img, api.BlockView{})
		if err != nil {
			out.Problems = append(out.Problems, err.Error())
			continue
		}
		out.Images = append(out.Images, ai)
	}
	return out, nil
}

// GetImage implements api.Service.
func (n *Node) GetImage(ctx context.Context, name string, blocks api.BlockView) (api.Image, error) {
	if err := meta.ValidateRecordName(name); err != nil {
		return api.Image{}, err
	}
	img, err := n.lookupRecord(ctx, name)
	if err != nil {
		return api.Image{}, err
	}
	return n.describe(ctx, img, blocks)
}

func (n *Node) describe(ctx context.Context, img meta.Image, blocks api.BlockView) (api.Image, error) {
	// The record the maps were read with is the one described (a location
	// may have gone meanwhile).
	img, byLoc, err := n.cat.LocationMaps(ctx, img)
	if err != nil {
		return api.Image{}, err
	}
	out := api.Image{
		Name: img.Name, ID: img.ID, Size: img.Size, BlockSize: img.BlockSize, Blocks: img.Blocks(),
		Created: img.Created, IQN: n.iqn(img.Name), MinCopies: img.MinCopies,
		Owner: img.Owner, Attached: img.Attached, Generation: img.Generation, SyncPaused: img.SyncPaused,
		QoS: describeQoS(img.QoS),
	}
	if img.IsSnapshot() {
		out.SnapshotOf = img.Origin.Name
		out.IQN = ""
	}
	for _, sn := range img.Snapshots {
		if _, short, ok := meta.SplitSnapshotName(sn.Name); ok && meta.HiddenSnapshot(short) {
			continue
		}
		out.Snapshots = append(out.Snapshots, sn.Name)
	}
	if pol, _, err := n.cat.ImagePolicy(ctx, img.Name); err == nil && !reflect.DeepEqual(pol, placement.ImagePolicy{}) {
		ap := apiImagePolicy(pol)
		out.Policy = &ap
	}
	out.Plan = apiActions(n.exec.LastPlan(img.Name))
	out.Exports = n.exportInfos(img.Name)
	maps := make([]*placement.BlockMap, len(img.Locations))
	for i, loc := range img.Locations {
		bm := byLoc[loc]
		maps[i] = bm
		out.Locations = append(out.Locations, api.Location{
			Node: loc, OutOfSync: bm.Count(placement.OutOfSync), Syncing: bm.Count(placement.Syncing),
		})
	}
	if blocks.Runs {
		out.Runs = []api.BlockRun{}
		for _, r := range placement.Runs(img.Blocks(), maps, blocks.Cells) {
			states := make(map[string]int, len(maps))
			for i, loc := range img.Locations {
				states[loc] = int(r.States[i])
			}
			out.Runs = append(out.Runs, api.BlockRun{First: r.First, Last: r.Last, States: states})
		}
	}
	if blocks.Full {
		out.BlockMap = make([]map[string]api.BlockState, img.Blocks())
		for b := range out.BlockMap {
			m := make(map[string]api.BlockState, len(maps))
			for i, loc := range img.Locations {
				m[loc] = api.BlockState{SyncStatus: int(maps[i].Get(int64(b)))}
			}
			out.BlockMap[b] = m
		}
	}
	return out, nil
}

// DeleteImage implements api.Service: into the trash, to be purged after
// trash.defer (see package trash), or, with now (or a defer of 0), at
// once: the record goes first (the image disappears for everyone), then
// the local export and file.
func (n *Node) DeleteImage(ctx context.Context, name string, now bool) error {
	if image, short, ok := meta.SplitSnapshotName(name); ok {
		return fmt.Errorf("%w: %s is a snapshot of %s: delete it with 'ukai snapshot delete %s'", meta.ErrInvalid, name, image, meta.SnapshotName(image, short))
	}
	if err := meta.ValidateName(name); err != nil {
		return err
	}
	img, idx, err := n.cat.GetImage(ctx, name)
	if err != nil {
		return err
	}
	if img.IsSnapshot() {
		// Deleting an image must not take a snapshot with it by name
		// (issue 21): snapshots go only through snapshot delete.
		return fmt.Errorf("%w: %s is a snapshot of %s: delete it with 'ukai snapshot delete %s'", meta.ErrInvalid, name, img.Origin.Name, meta.SnapshotName(img.Origin.Name, name))
	}
	if len(img.Snapshots) > 0 {
		names := make([]string, len(img.Snapshots))
		for i, sn := range img.Snapshots {
			names[i] = sn.Name
			if !strings.Contains(sn.Name, meta.SnapshotSep) {
				names[i] = meta.SnapshotName(name, sn.Name)
			}
		}
		return fmt.Errorf("%w: image %q has snapshots (%s): delete them first", meta.ErrConflict, name, strings.Join(names, ", "))
	}
	if now || n.cfg.Trash.Defer == 0 {
		if err := n.cat.DeleteImage(ctx, img, idx); err != nil {
			return err
		}
	} else {
		t := time.Now()
		if _, err := n.cat.TrashImage(ctx, img, idx, t, t.Add(n.cfg.Trash.Defer)); err != nil {
			return err
		}
		n.log.Info("image moved to the trash", "image", name, "id", img.ID, "purge_after", t.Add(n.cfg.Trash.Defer))
	}
	_, err = n.recon.Refresh(ctx, name)
	return err
}

// reconHost is the node's served set as package reconcile changes it
// (every call with the reconciler's lock held).
type reconHost struct{ n *Node }

func (h reconHost) served(name string) *served.Image { return h.n.images.Get(name) }

func (h reconHost) ServedID(name string) string {
	if s := h.served(name); s != nil {
		return s.Record().ID
	}
	return ""
}

func (h reconHost) ServedNames() []string {
	return h.n.images.Names()
}

func (h reconHost) Export(ctx context.Context, img meta.Image) error {
	return h.n.export(ctx, img, false)
}

func (h reconHost) Apply(ctx context.Context, img meta.Image) error {
	if s := h.served(img.Name); s != nil {
		return h.n.apply(ctx, s, img, false)
	}
	return h.n.export(ctx, img, false)
}

func (h reconHost) Withdraw(ctx context.Context, name string) error {
	if s := h.served(name); s != nil {
		return h.n.withdrawChecked(ctx, s)
	}
	return nil
}
