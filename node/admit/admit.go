// Package admit decides which data-transport requests this node's copies
// admit (peer.Store): the rule that keeps a stale owner, or a peer that
// lies, from writing a copy or fencing the real owner off.
//
// Reads need the image's generation or a newer one. Writes, unmaps,
// syncs and fences need more: the generation the image's record holds
// and, when the caller's certificate names it, the record's owner. A
// generation newer than this node's record is checked against the
// catalog (a new owner writes before this node saw its record), never
// taken on its word: the floor only rises to what the catalog says, so a
// made-up generation can neither land a write nor fence the real owner
// off.
//
// Lock order: refresh (one catalog read at a time) → mu; mu is a leaf.
package admit

import (
	"context"
	"fmt"
	"sync"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/cluster/peer"
	"github.com/ukai-storage/ukai/node/served"
	"github.com/ukai-storage/ukai/target/lun"
)

// Records reads image records (*meta.Catalog).
type Records interface {
	GetImage(ctx context.Context, name string) (meta.Image, uint64, error)
}

// Store is this node's side of the data transport: its local copies, by
// image id, with a generation floor per image.
type Store struct {
	images  *served.Set
	records Records

	// refresh serializes the catalog reads that check a generation newer
	// than this node's record (one at a time per node: a peer that sends
	// made-up generations costs one read at a time, not one each).
	refresh sync.Mutex

	mu     sync.Mutex
	floors map[string]uint64 // by id: the newest generation a write carried
	// latest is the generation and owner of the newest record current
	// read, by id: at most one per copy this node holds.
	latest map[string]meta.Image
}

// New returns the store of the copies of images.
func New(images *served.Set, records Records) *Store {
	return &Store{images: images, records: records, floors: map[string]uint64{}, latest: map[string]meta.Image{}}
}

// SharedCopy shares the node's file between the volume and the peer
// server: closing it (a volume's replica, a peer request) does not close
// the file.
type SharedCopy struct{ *lun.FileCopy }

// Close does nothing: the file is the served image's.
func (SharedCopy) Close() error { return nil }

// Open implements peer.Store (see the package comment for the rule).
func (p *Store) Open(ctx context.Context, ref peer.Ref, caller peer.Caller, a peer.Access) (peer.Local, error) {
	s := p.images.ByID(ref.ID)
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
	return peer.Local{Copy: SharedCopy{s.Local}, Size: max(img.Size, s.Local.Size()), BlockSize: img.BlockSize}, nil
}

// Floor is the newest generation a peer write for image id carried to
// this node's copy (0: none).
func (p *Store) Floor(id string) uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.floors[id]
}

// current reads img's record from the catalog, one read at a time, and
// remembers it (so that the writes of a new owner that arrive before this
// node's watch brings its record need one read, not one each).
func (p *Store) current(ctx context.Context, img meta.Image) (meta.Image, error) {
	p.refresh.Lock()
	defer p.refresh.Unlock()
	if seen, ok := p.seen(img.ID); ok && seen.Generation > img.Generation {
		return seen, nil // read while this caller waited
	}
	cur, _, err := p.records.GetImage(ctx, img.Name)
	if err != nil {
		return meta.Image{}, err
	}
	if cur.ID != img.ID {
		return meta.Image{}, fmt.Errorf("image %q is now id %s", img.Name, cur.ID)
	}
	p.mu.Lock()
	if old, ok := p.latest[cur.ID]; !ok || old.Generation <= cur.Generation {
		p.latest[cur.ID] = meta.Image{ID: cur.ID, Generation: cur.Generation, Owner: cur.Owner}
	}
	p.mu.Unlock()
	return cur, nil
}

// seen returns the newest record of id the catalog gave current.
func (p *Store) seen(id string) (meta.Image, bool) {
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
