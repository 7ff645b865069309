package node

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/placement"
)

// syncWorkers is how many blocks one sync copies at a time.
const syncWorkers = 4

// servedByName returns the served image of that name, or ErrImageNotFound.
func (n *Node) servedByName(ctx context.Context, name string) (*served, error) {
	if err := meta.ValidateName(name); err != nil {
		return nil, err
	}
	n.mu.RLock()
	s, ok := n.served[name]
	n.mu.RUnlock()
	if ok {
		return s, nil
	}
	// Maybe just created elsewhere: reconcile once.
	if err := n.reconcile(ctx); err != nil {
		return nil, err
	}
	n.mu.RLock()
	s, ok = n.served[name]
	n.mu.RUnlock()
	if !ok {
		return nil, fmt.Errorf("%q: %w", name, meta.ErrImageNotFound)
	}
	return s, nil
}

// remoteOwner returns the API client of the image's owner when a live
// node other than this one owns it: operations on the image's data run
// there.
func (n *Node) remoteOwner(ctx context.Context, name string) (*api.Client, error) {
	img, _, err := n.cat.GetImage(ctx, name)
	if err != nil {
		return nil, err
	}
	if img.Owner == "" || img.Owner == n.cfg.Node.Name || !n.alive(img.Owner) {
		return nil, nil
	}
	m, err := n.peerMember(img.Owner)
	if err != nil {
		return nil, nil
	}
	return api.NewClient(m.Meta.API), nil
}

// SyncImage implements api.Service: copy the out-of-sync blocks in
// [from, to) of every live location from an in-sync copy, reporting
// progress; or pause/resume the background synchronizer. It runs on the
// image's owner (forwarded there when another live node owns it).
func (n *Node) SyncImage(ctx context.Context, name string, req api.SyncRequest, progress func(api.SyncProgress)) error {
	if req.Pause || req.Resume {
		if req.Pause && req.Resume {
			return fmt.Errorf("%w: pause and resume together", meta.ErrInvalid)
		}
		_, err := n.cat.UpdateImage(ctx, name, func(i *meta.Image) error {
			i.SyncPaused = req.Pause
			return nil
		})
		return err
	}
	if c, err := n.remoteOwner(ctx, name); err != nil {
		return err
	} else if c != nil {
		return c.SyncImage(ctx, name, req, progress)
	}
	s, err := n.servedByName(ctx, name)
	if err != nil {
		return err
	}
	return n.syncServed(ctx, s, req.FromBlock, req.ToBlock, progress)
}

type syncJob struct {
	block int64
	node  string
}

func (n *Node) syncServed(ctx context.Context, s *served, from, to int64, progress func(api.SyncProgress)) error {
	s.busy.Add(1)
	defer s.busy.Add(-1)
	if err := n.acquire(ctx, s); err != nil {
		return err
	}
	img := s.record()
	blocks := img.Blocks()
	if to == 0 {
		to = blocks
	}
	if from < 0 || to > blocks || from >= to {
		return fmt.Errorf("%w: block range [%d, %d) outside the image's %d blocks", meta.ErrInvalid, from, to, blocks)
	}
	maps := s.vol.MapsSnapshot()
	var jobs []syncJob
	var skipped []string
	for _, loc := range img.Locations {
		if !n.alive(loc) {
			skipped = append(skipped, loc)
			continue
		}
		for b := from; b < to; b++ {
			if maps[loc].Get(b) != placement.InSync {
				jobs = append(jobs, syncJob{b, loc})
			}
		}
	}
	start := time.Now()
	var done, copied, bytes atomic.Int64
	var mu sync.Mutex
	var errs []error
	last := time.Time{}
	report := func(j syncJob, final bool) {
		mu.Lock()
		defer mu.Unlock()
		if !final && time.Since(last) < 200*time.Millisecond && done.Load() != int64(len(jobs)) {
			return
		}
		last = time.Now()
		el := time.Since(start).Seconds()
		p := api.SyncProgress{Node: j.node, Block: j.block, Done: done.Load(), Total: int64(len(jobs)),
			Copied: copied.Load(), Bytes: bytes.Load(), ElapsedSec: el}
		if el > 0 {
			p.RateBps = float64(p.Bytes) / el
		}
		if final {
			p.Final = true
			for _, m := range s.vol.MapsSnapshot() {
				p.OutOfSync += m.Count(placement.OutOfSync) + m.Count(placement.Syncing)
			}
			if len(errs) > 0 {
				p.Error = fmt.Sprintf("%d blocks failed, first: %v", len(errs), errs[0])
			}
			if len(skipped) > 0 && p.Error == "" {
				p.Error = fmt.Sprintf("skipped the copies on dead nodes %v", skipped)
			}
		}
		if progress != nil {
			progress(p)
		}
	}
	ch := make(chan syncJob)
	var wg sync.WaitGroup
	for range syncWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range ch {
				res, err := s.vol.SyncBlock(ctx, j.block, j.node)
				if err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				} else if res.Copied {
					copied.Add(1)
					bytes.Add(res.Bytes)
				}
				done.Add(1)
				report(j, false)
			}
		}()
	}
	for _, j := range jobs {
		select {
		case ch <- j:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
	}
	close(ch)
	wg.Wait()
	report(syncJob{}, true)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if len(errs) > 0 {
		return fmt.Errorf("sync of %q: %d of %d blocks failed: %w", img.Name, len(errs), len(jobs), errors.Join(errs[:min(len(errs), 3)]...))
	}
	return nil
}

// VerifyImage implements api.Service: compare the checksums of every
// in-sync copy block by block (on the owner).
func (n *Node) VerifyImage(ctx context.Context, name string) (api.VerifyResult, error) {
	if c, err := n.remoteOwner(ctx, name); err != nil {
		return api.VerifyResult{}, err
	} else if c != nil {
		return c.VerifyImage(ctx, name)
	}
	s, err := n.servedByName(ctx, name)
	if err != nil {
		return api.VerifyResult{}, err
	}
	s.busy.Add(1)
	defer s.busy.Add(-1)
	if err := n.acquire(ctx, s); err != nil {
		return api.VerifyResult{}, err
	}
	res := api.VerifyResult{Blocks: s.vol.Blocks(), Mismatches: []api.Mismatch{}}
	unreachable := map[string]bool{}
	for b := int64(0); b < res.Blocks; b++ {
		mm, un, err := s.vol.VerifyBlock(ctx, b)
		if err != nil {
			return api.VerifyResult{}, err
		}
		for _, u := range un {
			unreachable[u] = true
		}
		if mm != nil {
			m := api.Mismatch{Block: b, Sums: map[string]string{}}
			for node, sum := range mm.Sums {
				m.Sums[node] = hex.EncodeToString(sum[:])
			}
			res.Mismatches = append(res.Mismatches, m)
		}
		inSync := 0
		for _, loc := range s.record().Locations {
			if s.vol.State(loc, b) == placement.InSync {
				inSync++
			}
		}
		if inSync >= 2 {
			res.Compared++
		}
	}
	for u := range unreachable {
		res.Unreachable = append(res.Unreachable, u)
	}
	return res, nil
}

// synchronizer brings copies back in sync in the background: for the
// images this node owns, and for unowned images whose first live location
// is this node. Paused images are left alone.
func (n *Node) synchronizer(ctx context.Context) {
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n.mu.RLock()
		var all []*served
		for _, s := range n.served {
			all = append(all, s)
		}
		n.mu.RUnlock()
		for _, s := range all {
			if ctx.Err() != nil {
				return
			}
			if s.busy.Load() > 0 || !n.shouldSync(ctx, s) {
				continue
			}
			img := s.record()
			err := n.syncServed(ctx, s, 0, 0, nil)
			if err != nil && ctx.Err() == nil {
				n.log.Warn("background sync incomplete", "image", img.Name, "err", err)
			} else if err == nil {
				n.log.Info("background sync brought every live copy in sync", "image", img.Name)
			}
		}
	}
}

// shouldSync says whether this node should synchronize s now.
func (n *Node) shouldSync(ctx context.Context, s *served) bool {
	img := s.record()
	if img.SyncPaused || len(img.Locations) < 2 {
		return false
	}
	if !s.owned.Load() {
		if img.Owner != "" && n.alive(img.Owner) {
			return false
		}
		first := ""
		for _, l := range img.Locations {
			if n.alive(l) {
				first = l
				break
			}
		}
		if first != n.cfg.Node.Name {
			return false
		}
	}
	// Is any live copy behind? Owned images know from their volume;
	// others ask the catalog.
	for _, loc := range img.Locations {
		if !n.alive(loc) {
			continue
		}
		var bm *placement.BlockMap
		if s.owned.Load() {
			bm = s.vol.MapsSnapshot()[loc]
		} else {
			var err error
			if bm, err = n.cat.BlockMap(ctx, img, loc); err != nil {
				continue
			}
		}
		if bm != nil && bm.Count(placement.InSync) != bm.Len() {
			return true
		}
	}
	return false
}

// AddLocation implements api.Service: the new copy starts out of sync and
// the synchronizer (or `ukai image sync`) fills it.
func (n *Node) AddLocation(ctx context.Context, name, node string) (api.Image, error) {
	if node != n.cfg.Node.Name {
		if _, err := n.peerMember(node); err != nil {
			return api.Image{}, fmt.Errorf("add location: %w", err)
		}
	}
	if _, err := n.cat.AddLocation(ctx, name, node); err != nil {
		return api.Image{}, err
	}
	if err := n.reconcile(ctx); err != nil {
		n.log.Warn("reconcile after location add", "err", err)
	}
	return n.GetImage(ctx, name, false)
}

// RemoveLocation implements api.Service; refused when the node holds the
// last in-sync copy of any block.
func (n *Node) RemoveLocation(ctx context.Context, name, node string) (api.Image, error) {
	if _, err := n.cat.RemoveLocation(ctx, name, node); err != nil {
		return api.Image{}, err
	}
	if err := n.reconcile(ctx); err != nil {
		n.log.Warn("reconcile after location remove", "err", err)
	}
	return n.GetImage(ctx, name, false)
}
