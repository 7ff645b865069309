package meta

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"

	"github.com/ukai-storage/ukai/placement"
)

// maxCASRetries bounds read-modify-write loops under contention.
const maxCASRetries = 64

// UpdateImage applies fn to the current record of name and writes it back
// with check-and-set, retrying when another writer got there first. fn may
// be called several times and must not have side effects; an error from
// fn aborts the update and is returned as is.
func (c *Catalog) UpdateImage(ctx context.Context, name string, fn func(*Image) error) (Image, error) {
	for range maxCASRetries {
		img, idx, err := c.GetImage(ctx, name)
		if err != nil {
			return Image{}, err
		}
		before := img
		before.Locations = slices.Clone(img.Locations)
		if err := fn(&img); err != nil {
			return Image{}, err
		}
		if err := img.Validate(); err != nil {
			return Image{}, err
		}
		data, err := json.Marshal(img)
		if err != nil {
			return Image{}, err
		}
		err = c.kv.CASTouch(ctx, c.imageKey(name), data, idx, c.bells(before, img))
		if err == nil {
			img.Rev = idx + 1 // the store's new index is at least this
			return img, nil
		}
		if !errors.Is(err, ErrConflict) {
			return Image{}, fmt.Errorf("update image %q: %w", name, err)
		}
	}
	return Image{}, fmt.Errorf("update image %q: too much contention: %w", name, ErrConflict)
}

// put writes data at key whatever its current value, through
// check-and-set on the index it read (retried when another writer got in
// between), so it never lands on a key it did not see.
func (c *Catalog) put(ctx context.Context, key string, data []byte) error {
	for range maxCASRetries {
		var idx uint64
		e, err := c.kv.Get(ctx, key)
		switch {
		case err == nil:
			idx = e.ModifyIndex
		case !errors.Is(err, ErrNotFound):
			return fmt.Errorf("read %s: %w", key, err)
		}
		err = c.kv.CAS(ctx, key, data, idx)
		if err == nil {
			return nil
		}
		if !errors.Is(err, ErrConflict) {
			return fmt.Errorf("write %s: %w", key, err)
		}
	}
	return fmt.Errorf("%s: too much contention: %w", key, ErrConflict)
}

// SetBlockStates sets blocks of node's copy of img to state s, chunk by
// chunk with check-and-set. It returns once the change is stored: callers
// rely on that to acknowledge a write only after its failed copies are
// recorded out of sync.
func (c *Catalog) SetBlockStates(ctx context.Context, img Image, node string, blocks []int64, s placement.SyncState) error {
	return c.setBlockStates(ctx, img, node, blocks, s, nil)
}

// ErrNotOwner: an owner-only record was refused because the image's
// record names another owner or generation.
var ErrNotOwner = errors.New("no longer the image's owner")

// errCopyGone: the record no longer lists the copy a record was for.
var errCopyGone = errors.New("the copy is no longer a location of the image")

// SetBlockStatesOwned is SetBlockStates for the owner of the day: each
// chunk is written in one atomic step with a check that the image's
// record is unchanged since it was read naming owner at generation gen
// (KV.CASGuarded), and ErrNotOwner once it names another. A new owner's
// takeover changes the record before the new owner reads the maps, so a
// former owner's record either lands before that read or not at all
// (chaos seeds 11 and 101: a former owner declared in sync a copy the new
// owner was leaving out of its writes, and marked out of sync the copies
// refusing its stale generation). A copy that left the image needs no
// out-of-sync record (the caller's record may be older than the removal);
// an in-sync one is refused.
func (c *Catalog) SetBlockStatesOwned(ctx context.Context, img Image, node string, blocks []int64, s placement.SyncState, owner string, gen uint64) error {
	guard := func(ctx context.Context) (string, uint64, error) {
		cur, idx, err := c.GetImage(ctx, img.Name)
		if err != nil {
			return "", 0, err
		}
		if cur.ID != img.ID || cur.Owner != owner || cur.Generation != gen {
			return "", 0, fmt.Errorf("%q: owner %q generation %d, not %q generation %d: %w", img.Name, cur.Owner, cur.Generation, owner, gen, ErrNotOwner)
		}
		if !cur.HasLocation(node) {
			return "", 0, fmt.Errorf("%q on %s: %w", img.Name, node, errCopyGone)
		}
		return c.imageKey(img.Name), idx, nil
	}
	err := c.setBlockStates(ctx, img, node, blocks, s, guard)
	if s == placement.OutOfSync && errors.Is(err, errCopyGone) {
		return nil
	}
	return err
}

func (c *Catalog) setBlockStates(ctx context.Context, img Image, node string, blocks []int64, s placement.SyncState, guard guardFunc) error {
	byChunk := map[int][]int64{}
	for _, b := range blocks {
		if b < 0 || b >= img.Blocks() {
			return fmt.Errorf("%w: block %d outside image %q", ErrInvalid, b, img.Name)
		}
		ch := int(b / placement.ChunkBlocks)
		byChunk[ch] = append(byChunk[ch], b)
	}
	for ch, bs := range byChunk {
		if err := c.updateChunk(ctx, img, node, ch, guard, func(m *placement.BlockMap) {
			for _, b := range bs {
				m.Set(b, s)
			}
		}); err != nil {
			return err
		}
	}
	return nil
}

// guardFunc returns the key and index a chunk write is conditioned on,
// or why it must not happen.
type guardFunc func(context.Context) (key string, index uint64, err error)

func (c *Catalog) updateChunk(ctx context.Context, img Image, node string, ch int, guard guardFunc, fn func(*placement.BlockMap)) error {
	key := c.chunkKey(img.ID, node, ch)
	for range maxCASRetries {
		// The guard first: it may say the write is not to be made at all
		// (another owner, a copy that left the image), before the chunk
		// is looked for. The write below checks both indexes at once.
		var gkey string
		var gidx uint64
		if guard != nil {
			var err error
			if gkey, gidx, err = guard(ctx); err != nil {
				return err
			}
		}
		e, err := c.kv.Get(ctx, key)
		if err != nil {
			if errors.Is(err, ErrNotFound) {
				return &MalformedError{Key: key, Err: errors.New("block map chunk missing")}
			}
			return fmt.Errorf("read block map of %q on %s: %w", img.Name, node, err)
		}
		// The chunk keeps the length it is stored with (it may be longer
		// than img says while the image grows).
		n, err := placement.ChunkLen(e.Value)
		if err != nil {
			return &MalformedError{Key: key, Err: err}
		}
		m := placement.NewBlockMap(max(img.Blocks(), int64(ch)*placement.ChunkBlocks+n), placement.OutOfSync)
		if err := m.DecodeChunk(ch, e.Value); err != nil {
			return &MalformedError{Key: key, Err: err}
		}
		fn(m)
		if guard == nil {
			err = c.kv.CAS(ctx, key, m.EncodeChunk(ch), e.ModifyIndex)
		} else {
			err = c.kv.CASGuarded(ctx, key, m.EncodeChunk(ch), e.ModifyIndex, gkey, gidx)
		}
		if err == nil {
			return nil
		}
		if !errors.Is(err, ErrConflict) {
			return fmt.Errorf("write block map of %q on %s: %w", img.Name, node, err)
		}
	}
	return fmt.Errorf("block map of %q on %s: too much contention: %w", img.Name, node, ErrConflict)
}

// AddLocation adds node as a location of image name; its copy starts out
// of sync in every block. The block map is written before the record
// names the node, so no reader sees a location without a map.
func (c *Catalog) AddLocation(ctx context.Context, name, node string) (Image, error) {
	if !NodeNameRE.MatchString(node) {
		return Image{}, fmt.Errorf("%w: node name %q", ErrInvalid, node)
	}
	for range maxCASRetries {
		img, err := c.addLocation(ctx, name, node)
		if !errors.Is(err, errGrownMeanwhile) {
			return img, err
		}
	}
	return Image{}, fmt.Errorf("add location %s to %q: the image kept growing: %w", node, name, ErrConflict)
}

// errGrownMeanwhile: the image changed (it grew, or its record moved)
// between the new location's map and its record update; the whole step
// is redone from a fresh read.
var errGrownMeanwhile = errors.New("image grown meanwhile")

func (c *Catalog) addLocation(ctx context.Context, name, node string) (Image, error) {
	img, idx, err := c.GetImage(ctx, name)
	if err != nil {
		return Image{}, err
	}
	if img.HasLocation(node) {
		return Image{}, fmt.Errorf("%w: %s is already a location of %q", ErrInvalid, node, name)
	}
	// Leftovers of an earlier location on that node are stale, and are
	// replaced. Every chunk is written only while the record is still the
	// one read (guarded by its index): a stale read (a Consul server
	// still replaying its log after a restart answered one, chaos seed
	// 131) that missed this node as a location must not wipe its live map
	// and write one of the old length, all out of sync. A conflict reads
	// again.
	old, _, err := c.kv.List(ctx, c.mapPrefix(img.ID, node))
	if err != nil {
		return Image{}, fmt.Errorf("add location: %w", err)
	}
	at := map[string]uint64{}
	for _, e := range old {
		at[e.Key] = e.ModifyIndex
	}
	bm := placement.NewBlockMap(img.Blocks(), placement.OutOfSync)
	for ch := range placement.NumChunks(bm.Len()) {
		key := c.chunkKey(img.ID, node, ch)
		err := c.kv.CASGuarded(ctx, key, bm.EncodeChunk(ch), at[key], c.imageKey(name), idx)
		if errors.Is(err, ErrConflict) {
			return Image{}, errGrownMeanwhile // the record or a leftover moved: start again
		}
		if err != nil {
			return Image{}, fmt.Errorf("add location %s to %q: %w", node, name, err)
		}
		delete(at, key)
	}
	for key, i := range at { // leftover chunks past the image's end
		if err := c.kv.DeleteCAS(ctx, key, i); err != nil && !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrConflict) {
			return Image{}, fmt.Errorf("add location %s to %q: %w", node, name, err)
		}
	}
	return c.UpdateImage(ctx, name, func(i *Image) error {
		if i.ID != img.ID {
			return fmt.Errorf("image %q was recreated meanwhile: %w", name, ErrConflict)
		}
		if i.Blocks() != img.Blocks() {
			// A grow ran between the map above and this update (it
			// extended only the locations it saw): a map shorter than
			// the record is malformed, and the image unusable (chaos
			// seed 104, a resize during a location add).
			return errGrownMeanwhile
		}
		if !i.HasLocation(node) {
			i.Locations = append(i.Locations, node)
		}
		return nil
	})
}

// ErrLastCopy refuses a change that would leave some block without an
// in-sync copy.
var ErrLastCopy = errors.New("would remove the last in-sync copy of a block")

// RemoveLocation removes node from image name, refused (ErrLastCopy) when
// some block would be left without an in-sync copy, or when fewer
// locations than min_copies would remain.
func (c *Catalog) RemoveLocation(ctx context.Context, name, node string) (Image, error) {
	img, err := c.UpdateImage(ctx, name, func(i *Image) error {
		if !i.HasLocation(node) {
			return fmt.Errorf("%w: %s is not a location of %q", ErrInvalid, node, name)
		}
		if len(i.Locations)-1 < i.MinCopies {
			return fmt.Errorf("%w: %q needs %d copies (min_copies); lower it or add a location first", ErrLastCopy, name, i.MinCopies)
		}
		others := make([]*placement.BlockMap, 0, len(i.Locations)-1)
		for _, l := range i.Locations {
			if l == node {
				continue
			}
			m, err := c.BlockMap(ctx, *i, l)
			if err != nil {
				return err
			}
			others = append(others, m)
		}
		for b := int64(0); b < i.Blocks(); b++ {
			ok := false
			for _, m := range others {
				if m.Get(b) == placement.InSync {
					ok = true
					break
				}
			}
			if !ok {
				return fmt.Errorf("%w: block %d of %q is in sync only on %s (synchronize another copy first)", ErrLastCopy, b, name, node)
			}
		}
		var keep []string
		for _, l := range i.Locations {
			if l != node {
				keep = append(keep, l)
			}
		}
		i.Locations = keep
		if i.Owner == node {
			i.Owner = ""
			i.Generation++
		}
		return nil
	})
	if err != nil {
		return Image{}, err
	}
	if err := c.kv.DeleteTree(ctx, c.mapPrefix(img.ID, node)); err != nil {
		return img, fmt.Errorf("delete block map of %s: %w", node, err)
	}
	return img, nil
}

// CreateCowMap writes the copy-on-write map of a new snapshot: every block
// still the origin's. It is written before the origin's record names the
// snapshot.
func (c *Catalog) CreateCowMap(ctx context.Context, snap Image) error {
	bm := placement.NewBlockMap(snap.Blocks(), placement.OutOfSync)
	for ch := range placement.NumChunks(bm.Len()) {
		if err := c.kv.CAS(ctx, c.chunkKey(snap.ID, CowNode, ch), bm.EncodeChunk(ch), 0); err != nil {
			return fmt.Errorf("create the copy-on-write map of %q: %w", snap.Name, err)
		}
	}
	return nil
}

// GrowImage makes image name size bytes long (never shorter). The block
// maps grow first (the new blocks are in sync everywhere: every copy's
// file was already extended with zeros by the caller), the record last;
// readers of the old record read the longer maps up to its length.
func (c *Catalog) GrowImage(ctx context.Context, name string, size int64) (Image, error) {
	img, _, err := c.GetImage(ctx, name)
	if err != nil {
		return Image{}, err
	}
	if img.IsSnapshot() {
		return Image{}, fmt.Errorf("%w: %q is a snapshot: snapshots keep their size", ErrInvalid, name)
	}
	if err := ValidateGeometry(size, img.BlockSize); err != nil {
		return Image{}, err
	}
	if size < img.Size {
		return Image{}, fmt.Errorf("%w: %q is %s: shrinking to %s would lose data and is not supported", ErrInvalid, name, FormatSize(img.Size), FormatSize(size))
	}
	if size == img.Size {
		return img, nil
	}
	grown := img
	grown.Size = size
	blocks := grown.Blocks()
	for _, node := range img.Locations {
		for ch := range placement.NumChunks(blocks) {
			key := c.chunkKey(img.ID, node, ch)
			for i := 0; ; i++ {
				if i == maxCASRetries {
					return Image{}, fmt.Errorf("grow the block map of %q on %s: too much contention: %w", name, node, ErrConflict)
				}
				e, err := c.kv.Get(ctx, key)
				var idx uint64
				m := placement.NewBlockMap(blocks, placement.InSync)
				switch {
				case errors.Is(err, ErrNotFound):
				case err != nil:
					return Image{}, fmt.Errorf("grow the block map of %q on %s: %w", name, node, err)
				case ch >= placement.NumChunks(img.Blocks()):
					// Past the record's chunks: a stray, or left by a
					// grow that did not finish; the new blocks are in
					// sync whatever it says.
					idx = e.ModifyIndex
				default:
					idx = e.ModifyIndex
					n, err := placement.ChunkLen(e.Value)
					if err != nil {
						return Image{}, &MalformedError{Key: key, Err: err}
					}
					old := placement.NewBlockMap(max(img.Blocks(), int64(ch)*placement.ChunkBlocks+n), placement.OutOfSync)
					if err := old.DecodeChunk(ch, e.Value); err != nil {
						return Image{}, &MalformedError{Key: key, Err: err}
					}
					for b := int64(ch) * placement.ChunkBlocks; b < min(img.Blocks(), blocks); b++ {
						m.Set(b, old.Get(b))
					}
				}
				err = c.kv.CAS(ctx, key, m.EncodeChunk(ch), idx)
				if err == nil {
					break
				}
				if !errors.Is(err, ErrConflict) {
					return Image{}, fmt.Errorf("grow the block map of %q on %s: %w", name, node, err)
				}
			}
		}
	}
	return c.UpdateImage(ctx, name, func(i *Image) error {
		if i.ID != img.ID {
			return fmt.Errorf("%q: %w", name, ErrImageNotFound)
		}
		if !slicesEqual(i.Locations, img.Locations) {
			return fmt.Errorf("%w: the locations of %q changed while it was grown: try again", ErrConflict, name)
		}
		i.Size = max(i.Size, size)
		return nil
	})
}

func slicesEqual(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
