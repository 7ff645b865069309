// Package trash purges the images a node holds copies of once their time
// in the trash is up, and removes the data files of purged images. The
// trash itself (moving an image there, restoring, purging one) is the
// catalog's (meta.TrashImage, RestoreImage, PurgeImage).
//
// Each node sweeps for itself, every Config.Interval: it lists the trash
// (one read, however many images the cluster has) and purges the expired
// entries whose image it held a copy of, so that an entry is purged
// even while some of its nodes are down, without every node of the
// cluster racing for it; two locations purging the same entry at once is
// harmless (PurgeImage is idempotent). Then it removes its data files
// that have no cached record and a tombstone (one read per such file:
// purged images, also those purged while the node was down).
package trash

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/ukai-storage/ukai/cluster/meta"
)

// Catalog is what a sweep reads and changes.
type Catalog interface {
	ListTrash(ctx context.Context) ([]meta.TrashEntry, []error, error)
	PurgeImage(ctx context.Context, id string) error
	Tombstoned(ctx context.Context, id string) (bool, error)
}

// Dir is the node's data directory.
type Dir interface {
	// Uncached: ids of copies without a cached record.
	Uncached() []string
	// Remove removes id's copy.
	Remove(id string) error
}

// Config of a Sweeper.
type Config struct {
	Catalog  Catalog
	Dir      Dir
	Self     string // this node's name
	Interval time.Duration
	Now      func() time.Time // time.Now when nil
	Log      *slog.Logger
}

// Sweeper runs the sweeps of one node.
type Sweeper struct {
	cfg Config
	wg  sync.WaitGroup
}

// New returns a Sweeper.
func New(cfg Config) *Sweeper {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Sweeper{cfg: cfg}
}

// Result says what one sweep did.
type Result struct {
	Purged  []string // ids purged
	Removed []string // ids whose data file was removed
}

// Sweep purges the expired entries this node held a copy of, then
// removes the data files of purged images.
func (s *Sweeper) Sweep(ctx context.Context) (Result, error) {
	var res Result
	var errs []error
	entries, bad, err := s.cfg.Catalog.ListTrash(ctx)
	if err != nil {
		return res, err
	}
	for _, b := range bad {
		s.cfg.Log.Warn("ignoring an unreadable trash entry", "err", b)
	}
	now := s.cfg.Now()
	for _, e := range entries {
		if now.Before(e.PurgeAfter) || !e.Image.HasLocation(s.cfg.Self) {
			continue
		}
		if err := s.cfg.Catalog.PurgeImage(ctx, e.Image.ID); err != nil && !errors.Is(err, meta.ErrTrashNotFound) {
			errs = append(errs, err)
			continue
		}
		s.cfg.Log.Info("image purged from the trash", "image", e.Image.Name, "id", e.Image.ID, "deleted", e.Deleted)
		res.Purged = append(res.Purged, e.Image.ID)
	}
	for _, id := range s.cfg.Dir.Uncached() {
		gone, err := s.cfg.Catalog.Tombstoned(ctx, id)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if !gone {
			continue
		}
		if err := s.cfg.Dir.Remove(id); err != nil {
			errs = append(errs, err)
			continue
		}
		s.cfg.Log.Info("data of a purged image removed", "id", id)
		res.Removed = append(res.Removed, id)
	}
	return res, errors.Join(errs...)
}

// Start sweeps every Interval (the first at once) until ctx ends; Wait
// waits for it to stop.
func (s *Sweeper) Start(ctx context.Context) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		t := time.NewTicker(s.cfg.Interval)
		defer t.Stop()
		for {
			if _, err := s.Sweep(ctx); err != nil && ctx.Err() == nil {
				s.cfg.Log.Warn("trash sweep", "err", err)
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
}

// Wait waits for the sweeps Start began to stop.
func (s *Sweeper) Wait() { s.wg.Wait() }
