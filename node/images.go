package node

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/placement"
	"github.com/ukai-storage/ukai/target/lun"
	"github.com/ukai-storage/ukai/target/scsi"
)

// served is an image this node exports.
type served struct {
	img meta.Image
	vol *lun.Volume
	lu  *scsi.LU
}

// watch reconciles whenever image records change, and retries with
// backoff while the store is unreachable.
func (n *Node) watch(ctx context.Context) {
	var idx uint64
	backoff := time.Second
	for ctx.Err() == nil {
		err := n.reconcile(ctx)
		n.noteStore(err)
		if err != nil && ctx.Err() == nil {
			if !errors.Is(err, meta.ErrUnavailable) {
				n.log.Warn("reconcile failed", "err", err)
			}
			sleep(ctx, backoff)
			backoff = min(2*backoff, 30*time.Second)
			continue
		}
		backoff = time.Second
		next, err := n.kv.Watch(ctx, n.cat.ImagesPrefix(), idx)
		if err != nil {
			if ctx.Err() == nil {
				n.noteStore(err)
				sleep(ctx, backoff)
				backoff = min(2*backoff, 30*time.Second)
			}
			continue
		}
		idx = next
	}
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

func (n *Node) imagePath(img meta.Image) string {
	return filepath.Join(n.imgDir, img.ID+".img")
}

// recordPath is the image record cached beside the data file, so the node
// can serve its images at start while the metadata store is unreachable.
func (n *Node) recordPath(id string) string { return filepath.Join(n.imgDir, id+".json") }

func (n *Node) cacheRecord(img meta.Image) error {
	b, err := json.Marshal(img)
	if err != nil {
		return err
	}
	tmp := n.recordPath(img.ID) + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("cache record of %s: %w", img.Name, err)
	}
	return os.Rename(tmp, n.recordPath(img.ID))
}

// exportCached exports every image whose record is cached in the data dir.
func (n *Node) exportCached() {
	files, _ := filepath.Glob(filepath.Join(n.imgDir, "*.json"))
	for _, f := range files {
		var img meta.Image
		b, err := os.ReadFile(f)
		if err == nil {
			err = json.Unmarshal(b, &img)
		}
		if err == nil {
			err = img.Validate()
		}
		if err != nil {
			n.log.Warn("ignoring unreadable cached image record", "file", f, "err", err)
			continue
		}
		n.reconMu.Lock()
		if err := n.export(img); err != nil {
			n.log.Warn("cannot export cached image", "image", img.Name, "err", err)
		}
		n.reconMu.Unlock()
	}
}

// reconcile makes the served set match the catalog: images with a copy
// on this node are exported; images whose record is gone are withdrawn,
// and their local file is removed only when the image was deleted on
// purpose (a tombstone exists). It changes nothing when the catalog cannot
// be read.
func (n *Node) reconcile(ctx context.Context) error {
	n.reconMu.Lock()
	defer n.reconMu.Unlock()
	imgs, _, bad, err := n.cat.ListImages(ctx)
	if err != nil {
		return err
	}
	for _, b := range bad {
		n.log.Warn("skipping unreadable image record", "err", b)
	}
	want := map[string]meta.Image{}
	for _, img := range imgs {
		for _, loc := range img.Locations {
			if loc == n.cfg.Node.Name {
				want[img.Name] = img
			}
		}
	}
	var errs []error
	n.mu.RLock()
	var gone []*served
	for name, s := range n.served {
		if w, ok := want[name]; !ok || w.ID != s.img.ID {
			gone = append(gone, s)
		}
	}
	n.mu.RUnlock()
	for _, s := range gone {
		deleted, err := n.cat.Tombstoned(ctx, s.img.ID)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		errs = append(errs, n.withdraw(s, deleted))
	}
	for _, img := range want {
		n.mu.RLock()
		_, ok := n.served[img.Name]
		n.mu.RUnlock()
		if !ok {
			errs = append(errs, n.export(img))
		}
	}
	return errors.Join(errs...)
}

// export opens the local copy of img and publishes its target. The caller
// holds reconMu.
func (n *Node) export(img meta.Image) error {
	n.mu.RLock()
	_, ok := n.served[img.Name]
	n.mu.RUnlock()
	if ok {
		return nil
	}
	c, err := lun.OpenFile(n.imagePath(img), img.Size)
	if err != nil {
		return fmt.Errorf("image %s: %w", img.Name, err)
	}
	vol, err := lun.NewVolume(img.Size, img.BlockSize, c)
	if err != nil {
		c.Close()
		return fmt.Errorf("image %s: %w", img.Name, err)
	}
	var devID [16]byte
	if b, err := hex.DecodeString(img.ID); err == nil {
		copy(devID[:], b)
	}
	lu, err := scsi.NewLU(scsi.Config{
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
	}, vol, n.log.With("image", img.Name))
	if err != nil {
		vol.Close()
		return fmt.Errorf("image %s: %w", img.Name, err)
	}
	if err := n.cacheRecord(img); err != nil {
		vol.Close()
		return err
	}
	n.mu.Lock()
	n.served[img.Name] = &served{img: img, vol: vol, lu: lu}
	n.mu.Unlock()
	n.log.Info("image exported", "image", img.Name, "id", img.ID, "iqn", n.iqn(img.Name), "size", img.Size, "block_size", img.BlockSize)
	return nil
}

// withdraw ends the sessions of an image that left the catalog and closes
// its copy. With deleted (the image has a tombstone) the data file and
// cached record are removed; otherwise they are kept and the loss of the
// record is reported.
func (n *Node) withdraw(s *served, deleted bool) error {
	n.mu.Lock()
	if n.served[s.img.Name] == s {
		delete(n.served, s.img.Name)
	}
	n.mu.Unlock()
	n.target.DropTarget(n.iqn(s.img.Name))
	err := s.vol.Close()
	if deleted {
		for _, p := range []string{n.imagePath(s.img), n.recordPath(s.img.ID)} {
			if rerr := os.Remove(p); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
				err = errors.Join(err, rerr)
			}
		}
		n.log.Info("image deleted", "image", s.img.Name, "id", s.img.ID)
	} else {
		n.log.Error("the record of an image this node holds vanished without a delete; its target is withdrawn, its data kept",
			"image", s.img.Name, "id", s.img.ID, "file", n.imagePath(s.img))
	}
	if err != nil {
		return fmt.Errorf("withdraw image %s: %w", s.img.Name, err)
	}
	return nil
}

// LookupTarget implements iscsi.Targets.
func (n *Node) LookupTarget(iqn string) (*scsi.LU, bool) {
	n.mu.RLock()
	defer n.mu.RUnlock()
	for name, s := range n.served {
		if n.iqn(name) == iqn {
			return s.lu, true
		}
	}
	return nil, false
}

// TargetNames implements iscsi.Targets.
func (n *Node) TargetNames() []string {
	n.mu.RLock()
	defer n.mu.RUnlock()
	out := make([]string, 0, len(n.served))
	for name := range n.served {
		out = append(out, n.iqn(name))
	}
	sort.Strings(out)
	return out
}

// CreateImage implements api.Service: the local sparse file first, then the
// record, then the export.
func (n *Node) CreateImage(ctx context.Context, req api.CreateImageRequest) (api.Image, error) {
	if req.BlockSize == 0 {
		req.BlockSize = meta.DefaultBlockSize
	}
	if err := meta.ValidateName(req.Name); err != nil {
		return api.Image{}, err
	}
	if err := meta.ValidateGeometry(req.Size, req.BlockSize); err != nil {
		return api.Image{}, err
	}
	img := meta.Image{
		Version:   meta.RecordVersion,
		ID:        meta.NewImageID(),
		Name:      req.Name,
		Size:      req.Size,
		BlockSize: req.BlockSize,
		Locations: []string{n.cfg.Node.Name},
		MinCopies: 1,
	}
	if _, _, err := n.cat.GetImage(ctx, img.Name); err == nil {
		return api.Image{}, fmt.Errorf("image %q: %w", img.Name, meta.ErrImageExists)
	}
	f, err := lun.CreateFile(n.imagePath(img), img.Size)
	if err != nil {
		return api.Image{}, err
	}
	f.Close()
	created, err := n.cat.CreateImage(ctx, img, placement.InSync)
	if err != nil {
		os.Remove(n.imagePath(img))
		return api.Image{}, err
	}
	n.reconMu.Lock()
	err = n.export(created)
	n.reconMu.Unlock()
	if err != nil {
		return api.Image{}, err
	}
	return n.GetImage(ctx, created.Name, false)
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
		ai, err := n.describe(ctx, img, false)
		if err != nil {
			out.Problems = append(out.Problems, err.Error())
			continue
		}
		out.Images = append(out.Images, ai)
	}
	return out, nil
}

// GetImage implements api.Service.
func (n *Node) GetImage(ctx context.Context, name string, blocks bool) (api.Image, error) {
	if err := meta.ValidateName(name); err != nil {
		return api.Image{}, err
	}
	img, _, err := n.cat.GetImage(ctx, name)
	if err != nil {
		return api.Image{}, err
	}
	return n.describe(ctx, img, blocks)
}

func (n *Node) describe(ctx context.Context, img meta.Image, blocks bool) (api.Image, error) {
	out := api.Image{
		Name: img.Name, ID: img.ID, Size: img.Size, BlockSize: img.BlockSize, Blocks: img.Blocks(),
		Created: img.Created, IQN: n.iqn(img.Name), MinCopies: img.MinCopies,
	}
	maps := make([]*placement.BlockMap, len(img.Locations))
	for i, loc := range img.Locations {
		bm, err := n.cat.BlockMap(ctx, img, loc)
		if err != nil {
			return api.Image{}, err
		}
		maps[i] = bm
		out.Locations = append(out.Locations, api.Location{
			Node: loc, OutOfSync: bm.Count(placement.OutOfSync), Syncing: bm.Count(placement.Syncing),
		})
	}
	if blocks {
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

// DeleteImage implements api.Service: the record goes first (the image
// disappears for everyone), then the local export and file.
func (n *Node) DeleteImage(ctx context.Context, name string) error {
	if err := meta.ValidateName(name); err != nil {
		return err
	}
	img, idx, err := n.cat.GetImage(ctx, name)
	if err != nil {
		return err
	}
	if err := n.cat.DeleteImage(ctx, img, idx); err != nil {
		return err
	}
	return n.reconcile(ctx)
}
