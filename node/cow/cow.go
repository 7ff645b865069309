// Package cow is copy-on-write for snapshots, as the origin's owner runs
// it. A snapshot is an image of its own (a record with Origin, its own
// copies, its own block maps) that starts empty: its copy-on-write map
// (the block map of meta.CowNode) says every block is still the origin's.
// Before the origin's owner changes a block for the first time after the
// snapshot, it reads the block (it holds it: the write is waiting in the
// volume's BeforeWrite), writes it to the snapshot's copies, and records
// the block as the snapshot's in the map; only then does the write go on
// (Preserve). Reading the snapshot takes each block from the snapshot
// when the map says so, else from the origin (Read).
//
// It owns the origin owner's cache of its snapshots' copy-on-write maps
// and the rule that a block is preserved once per snapshot, before it
// changes. Taking ownership of the snapshots, and serving them, is the
// node's (Host).
//
// Lock order: a write holds the origin's block locks, then Maps.mu (in
// Preserve); Maps.mu is held while the snapshot's volume is written (its
// own block locks) and while the catalog is read or written. Read and
// Hole take Maps.mu only around map lookups, never across a volume read.
package cow

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/placement"
	"github.com/ukai-storage/ukai/target/scsi"
)

// ErrGone: the snapshot no longer exists (deleted, or unlisted by its
// origin): nothing is preserved into it any more.
var ErrGone = errors.New("snapshot no longer exists")

// NotReady is the error of a write that needs a snapshot this node does
// not own (yet): NOT READY, which the initiator retries, and the node
// takes ownership of the snapshots before the retry holds any block.
func NotReady(name string) error {
	return &scsi.SenseError{Key: scsi.SenseNotReady, ASC: 0x04, ASCQ: 0x01,
		Err: fmt.Errorf("snapshot %s is not ready on this node yet", name)}
}

// Image is a served image (an origin or a snapshot) as this package uses
// it.
type Image interface {
	Record() meta.Image
	// ReadAt and WriteAt go through the image's volume.
	ReadAt(ctx context.Context, p []byte, off int64) error
	WriteAt(ctx context.Context, p []byte, off int64, fua bool) error
	// ReadHeld reads blocks whose locks the caller holds (an origin's
	// write, in its BeforeWrite).
	ReadHeld(ctx context.Context, p []byte, off int64) error
	// Hole says whether block b reads as zeros without reading it (this
	// node's copy is in sync there and holds a hole); false when in doubt.
	Hole(b int64) bool
}

// Host is the node: which snapshots it serves, and whether it owns them.
type Host interface {
	// Snapshot is the snapshot ref as this node serves it, nil when it
	// does not (yet).
	Snapshot(ref meta.SnapshotRef) Image
	// Ready says whether this node may do I/O on img now (it owns it).
	Ready(img Image) bool
	// Hold keeps img owned (busy) until the returned func is called.
	Hold(img Image) (release func())
}

// Maps is one origin's cache of its snapshots' copy-on-write maps, on its
// owner. The zero value is not usable: see New.
type Maps struct {
	cat  *meta.Catalog
	host Host
	mu   sync.Mutex // serializes preserving: once per block and snapshot
	maps map[string]*placement.BlockMap
}

// New returns an empty cache.
func New(cat *meta.Catalog, host Host) *Maps {
	return &Maps{cat: cat, host: host}
}

// Reset drops the cache (ownership changed: the maps are read again).
func (m *Maps) Reset() {
	m.mu.Lock()
	m.maps = nil
	m.mu.Unlock()
}

// Unlisting runs fn between two preservations (a snapshot being removed
// from the origin's record); when fn says so, snapshot id's map is
// forgotten.
func (m *Maps) Unlisting(id string, fn func() (forget bool, err error)) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	forget, err := fn()
	if forget {
		delete(m.maps, id)
	}
	return err
}

// mapLocked returns the copy-on-write map of snapshot sn (cached); the
// caller holds mu.
func (m *Maps) mapLocked(ctx context.Context, sn Image) (*placement.BlockMap, error) {
	rec := sn.Record()
	if bm, ok := m.maps[rec.ID]; ok {
		return bm, nil
	}
	bm, err := m.cat.BlockMap(ctx, rec, meta.CowNode)
	if err != nil {
		return nil, fmt.Errorf("copy-on-write map of snapshot %s: %w", rec.Name, err)
	}
	if m.maps == nil {
		m.maps = map[string]*placement.BlockMap{}
	}
	m.maps[rec.ID] = bm
	return bm, nil
}

// Preserve copies blocks of origin into every snapshot that still shares
// them with it, before they change. The caller (the origin volume's
// BeforeWrite) holds the blocks: no write to them runs meanwhile.
func (m *Maps) Preserve(ctx context.Context, origin Image, blocks []int64) error {
	img := origin.Record()
	if len(img.Snapshots) == 0 {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	// Read again under the lock: a delete may have unlisted one meanwhile.
	for _, ref := range origin.Record().Snapshots {
		err := m.preserveInto(ctx, origin, ref, blocks)
		if err != nil && !m.stillListed(ctx, img.Name, ref.ID) {
			continue // deleted meanwhile: nothing to keep
		}
		if err != nil {
			return fmt.Errorf("preserve blocks for snapshot %s: %w", ref.Name, err)
		}
	}
	return nil
}

// stillListed re-reads the origin's record: is the snapshot still one of
// its snapshots? (Yes when in doubt.)
func (m *Maps) stillListed(ctx context.Context, origin string, id string) bool {
	img, _, err := m.cat.GetImage(ctx, origin)
	return err != nil || img.HasSnapshot(id)
}

func (m *Maps) preserveInto(ctx context.Context, origin Image, ref meta.SnapshotRef, blocks []int64) error {
	sn := m.host.Snapshot(ref)
	if sn == nil {
		return NotReady(ref.Name)
	}
	bm, err := m.mapLocked(ctx, sn)
	if err != nil {
		return err
	}
	var todo []int64
	for _, b := range blocks {
		if b < bm.Len() && bm.Get(b) != placement.InSync && !slices.Contains(todo, b) {
			todo = append(todo, b)
		}
	}
	if len(todo) == 0 {
		return nil
	}
	if !m.host.Ready(sn) {
		return NotReady(ref.Name)
	}
	defer m.host.Hold(sn)()
	snap := sn.Record()
	buf := make([]byte, snap.BlockSize)
	for _, b := range todo {
		off := b * snap.BlockSize
		p := buf[:min(snap.BlockSize, snap.Size-off)]
		if err := origin.ReadHeld(ctx, p, off); err != nil {
			return fmt.Errorf("read block %d: %w", b, err)
		}
		if scsi.AllZero(p) {
			continue // the snapshot's copies are zeros there already
		}
		if err := sn.WriteAt(ctx, p, off, true); err != nil {
			return fmt.Errorf("write block %d: %w", b, err)
		}
	}
	if err := m.cat.SetBlockStates(ctx, snap, meta.CowNode, todo, placement.InSync); err != nil {
		return err
	}
	for _, b := range todo {
		bm.Set(b, placement.InSync)
	}
	return nil
}

// Held returns the blocks snapshot sn holds itself (preserved: the origin
// changed them since), in order. The others are still the origin's.
func (m *Maps) Held(ctx context.Context, sn Image) ([]int64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	bm, err := m.mapLocked(ctx, sn)
	if err != nil {
		return nil, err
	}
	var out []int64
	for b := range bm.Len() {
		if bm.Get(b) == placement.InSync {
			out = append(out, b)
		}
	}
	return out, nil
}

// preserved says whether block b of snapshot sn is the snapshot's own
// (preserved), not the origin's.
func (m *Maps) preserved(ctx context.Context, sn Image, b int64) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	bm, err := m.mapLocked(ctx, sn)
	if err != nil {
		return false, err
	}
	return bm.Get(b) == placement.InSync, nil
}

// Hole says whether block b of snapshot sn of origin is all zeros as far
// as this node's copies tell, without reading it (clones of thin images
// copy only their data). False when in doubt.
func (m *Maps) Hole(ctx context.Context, origin, sn Image, b int64) bool {
	mine, err := m.preserved(ctx, sn, b)
	if err != nil {
		return false
	}
	if mine {
		return sn.Hole(b)
	}
	// Still the origin's: a hole there now; if the block got preserved
	// meanwhile, the snapshot's copy decides.
	if !origin.Hole(b) {
		return false
	}
	mine, err = m.preserved(ctx, sn, b)
	return err == nil && (!mine || sn.Hole(b))
}

// Read reads p at off of snapshot sn of origin as it was when taken.
// owned says whether this node still owns the origin as it did when the
// read started (else another node may be changing it, unseen by this
// cache); it returns the error to fail the read with.
func (m *Maps) Read(ctx context.Context, origin, sn Image, p []byte, off int64, owned func() error) error {
	snap := sn.Record()
	if off < 0 || off+int64(len(p)) > snap.Size {
		return fmt.Errorf("%w: range %d+%d outside snapshot %s (size %d)", meta.ErrInvalid, off, len(p), snap.Name, snap.Size)
	}
	own := func(b int64) (bool, error) {
		if err := owned(); err != nil {
			return false, err
		}
		// The snapshot is still one of the origin's snapshots (else
		// nothing is preserved into it any more).
		if !origin.Record().HasSnapshot(snap.ID) {
			return false, fmt.Errorf("%w: %s", ErrGone, snap.Name)
		}
		return m.preserved(ctx, sn, b)
	}
	for done := 0; done < len(p); {
		o := off + int64(done)
		b := o / snap.BlockSize
		l := int(min(int64(len(p)-done), (b+1)*snap.BlockSize-o))
		q := p[done : done+l]
		mine, err := own(b)
		if err != nil {
			return err
		}
		if !mine {
			if err := origin.ReadAt(ctx, q, o); err != nil {
				return err
			}
			// A block is preserved before the origin changes it: if the
			// map still says "origin's" after the read, the read saw the
			// data as it was at the snapshot.
			if mine, err = own(b); err != nil {
				return err
			}
		}
		if mine {
			if err := sn.ReadAt(ctx, q, o); err != nil {
				return err
			}
		}
		done += l
	}
	return nil
}
