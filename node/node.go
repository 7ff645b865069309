package node

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/placement"
	"github.com/ukai-storage/ukai/target/iscsi"
	"github.com/ukai-storage/ukai/target/lun"
	"github.com/ukai-storage/ukai/target/scsi"
)

// Node is one running ukai daemon.
type Node struct {
	cfg     Config
	log     *slog.Logger
	version string
	started time.Time

	kv  meta.KV
	cat *meta.Catalog

	target  *iscsi.Server
	apiLn   net.Listener
	apiSrv  *http.Server
	imgDir  string
	reconMu sync.Mutex // one reconcile at a time

	mu     sync.RWMutex
	served map[string]*served // by image name
}

// served is an image this node exports.
type served struct {
	img meta.Image
	vol *lun.Volume
	lu  *scsi.LU
}

// New opens the node's stores and binds its listeners; nothing is served
// until Run. Errors name the configuration key at fault.
func New(cfg Config, log *slog.Logger, version string) (*Node, error) {
	n := &Node{cfg: cfg, log: log, version: version, started: time.Now(), served: map[string]*served{}}
	n.imgDir = filepath.Join(cfg.Node.DataDir, "images")
	if err := os.MkdirAll(n.imgDir, 0o700); err != nil {
		return nil, fmt.Errorf("node.data_dir: %w", err)
	}
	kv, err := meta.OpenBolt(filepath.Join(cfg.Node.DataDir, "meta.db"))
	if err != nil {
		return nil, fmt.Errorf("metadata.backend embedded: %w", err)
	}
	n.kv = kv
	n.cat = meta.NewCatalog(kv, "ukai/")

	n.target, err = iscsi.NewServer(iscsi.Config{Listen: cfg.ISCSI.Listen, Logger: log.With("component", "iscsi")}, n)
	if err == nil {
		err = n.target.Listen()
	}
	if err != nil {
		kv.Close()
		return nil, fmt.Errorf("iscsi.listen %s: %w", cfg.ISCSI.Listen, err)
	}
	n.apiLn, err = net.Listen("tcp", cfg.API.Listen)
	if err != nil {
		n.target.Close(context.Background())
		kv.Close()
		return nil, fmt.Errorf("api.listen %s: %w", cfg.API.Listen, err)
	}
	n.apiSrv = &http.Server{
		Handler:           api.NewHandler(n, version, log.With("component", "api")),
		ReadHeaderTimeout: 10 * time.Second,
	}
	return n, nil
}

// ISCSIAddr and APIAddr are the bound addresses.
func (n *Node) ISCSIAddr() net.Addr { return n.target.Addr() }

// APIAddr is the bound control API address.
func (n *Node) APIAddr() net.Addr { return n.apiLn.Addr() }

// Run serves until ctx ends, then shuts down: iSCSI sessions are closed,
// image files synced and closed, the store closed.
func (n *Node) Run(ctx context.Context) error {
	if err := n.reconcile(ctx); err != nil {
		n.log.Error("initial reconcile failed", "err", err)
	}
	errc := make(chan error, 3)
	go func() { errc <- n.target.Serve(ctx) }()
	go func() {
		if err := n.apiSrv.Serve(n.apiLn); !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("api: %w", err)
			return
		}
		errc <- nil
	}()
	go n.watch(ctx)
	n.log.Info("ukai node serving", "version", n.version, "iscsi", n.target.Addr().String(), "api", n.apiLn.Addr().String(), "data_dir", n.cfg.Node.DataDir)

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
		n.log.Error("a listener failed; shutting down", "err", runErr)
	}
	return errors.Join(runErr, n.shutdown())
}

func (n *Node) shutdown() error {
	n.log.Info("shutting down")
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	err := n.apiSrv.Shutdown(ctx)
	err = errors.Join(err, n.target.Close(ctx))
	n.mu.Lock()
	for name, s := range n.served {
		if cerr := s.vol.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("close image %s: %w", name, cerr))
		}
		delete(n.served, name)
	}
	n.mu.Unlock()
	err = errors.Join(err, n.kv.Close())
	n.log.Info("stopped", "err", err)
	return err
}

// watch reconciles whenever image records change.
func (n *Node) watch(ctx context.Context) {
	var idx uint64
	for ctx.Err() == nil {
		next, err := n.kv.Watch(ctx, n.cat.ImagesPrefix(), idx)
		if err != nil {
			if ctx.Err() == nil {
				n.log.Warn("metadata watch failed; retrying", "err", err)
				sleep(ctx, time.Second)
			}
			continue
		}
		idx = next
		if err := n.reconcile(ctx); err != nil && ctx.Err() == nil {
			n.log.Warn("reconcile failed", "err", err)
		}
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

// reconcile makes the served set match the catalog: images with a copy
// on this node are exported; images gone from the catalog are withdrawn
// and their local file removed.
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
		errs = append(errs, n.withdraw(s))
	}
	for _, img := range want {
		n.mu.RLock()
		_, ok := n.served[img.Name]
		n.mu.RUnlock()
		if ok {
			continue
		}
		if err := n.export(img, false); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// export opens (or, with create, creates) the local copy of img and
// publishes its target.
func (n *Node) export(img meta.Image, create bool) error {
	var c *lun.FileCopy
	var err error
	if create {
		c, err = lun.CreateFile(n.imagePath(img), img.Size)
	} else {
		c, err = lun.OpenFile(n.imagePath(img), img.Size)
	}
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
		MaxTransferBlocks:     (64 << 20) / meta.SectorSize,
	}, vol, n.log.With("image", img.Name))
	if err != nil {
		vol.Close()
		return fmt.Errorf("image %s: %w", img.Name, err)
	}
	n.mu.Lock()
	n.served[img.Name] = &served{img: img, vol: vol, lu: lu}
	n.mu.Unlock()
	n.log.Info("image exported", "image", img.Name, "iqn", n.iqn(img.Name), "size", img.Size, "block_size", img.BlockSize)
	return nil
}

// withdraw ends the sessions of an image that left the catalog, closes its
// copy and removes the file.
func (n *Node) withdraw(s *served) error {
	n.mu.Lock()
	if n.served[s.img.Name] == s {
		delete(n.served, s.img.Name)
	}
	n.mu.Unlock()
	n.target.DropTarget(n.iqn(s.img.Name))
	err := s.vol.Close()
	if rerr := os.Remove(n.imagePath(s.img)); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		err = errors.Join(err, rerr)
	}
	n.log.Info("image withdrawn", "image", s.img.Name, "id", s.img.ID)
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
	n.mu.RLock()
	_, ok := n.served[created.Name]
	n.mu.RUnlock()
	if !ok {
		err = n.export(created, false)
	}
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

// NodeInfo implements api.Service.
func (n *Node) NodeInfo(context.Context) (api.Node, error) {
	out := api.Node{
		Name: n.cfg.Node.Name, Version: n.version, Labels: n.cfg.Node.Labels,
		APIAddr: n.apiLn.Addr().String(), ISCSIAddr: n.target.Addr().String(),
		IQNPrefix: n.cfg.ISCSI.IQNPrefix, Metadata: n.cfg.Metadata.Backend, StartedAt: n.started,
		Images: []string{}, Sessions: []api.Session{},
	}
	var st unix.Statfs_t
	if err := unix.Statfs(n.cfg.Node.DataDir, &st); err == nil {
		out.Capacity = int64(st.Blocks) * st.Bsize
		out.Free = int64(st.Bavail) * st.Bsize
	}
	n.mu.RLock()
	for name := range n.served {
		out.Images = append(out.Images, name)
	}
	n.mu.RUnlock()
	sort.Strings(out.Images)
	for _, s := range n.target.Sessions() {
		if s.Discovery {
			continue
		}
		out.Sessions = append(out.Sessions, api.Session{
			Initiator: s.InitiatorName, ISID: s.ISID, Target: s.Target, Remote: s.RemoteAddr,
			Commands: s.Commands, BytesIn: s.BytesIn, BytesOut: s.BytesOut,
		})
	}
	return out, nil
}
