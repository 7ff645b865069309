package meta

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/ukai-storage/ukai/placement"
)

// Catalog errors.
var (
	ErrImageExists   = errors.New("image already exists")
	ErrImageNotFound = errors.New("image not found")
	ErrNodeNotFound  = errors.New("node not found")
)

// MalformedError reports a value under the prefix that cannot be read. It
// names the key; the value is left as it is.
type MalformedError struct {
	Key string
	Err error
}

func (e *MalformedError) Error() string {
	return fmt.Sprintf("malformed metadata at %s: %v", e.Key, e.Err)
}
func (e *MalformedError) Unwrap() error { return e.Err }

// Catalog stores image records and block maps in a KV under a prefix:
//
//	<prefix>images/<name>                      JSON Image record
//	<prefix>blockmaps/<image id>/<node>/<chunk> block map chunk (placement.EncodeChunk)
//	<prefix>tombstones/<image id>              JSON Tombstone: the image was deleted on purpose
//	<prefix>owners/<image id>                  ownership lock (meta.Locker), value: the node that took it
//	<prefix>doorbells/<node>/<name>            touched with every change of the record of name that concerns node
//
// Block maps are keyed by image id, so a recreated image never sees the
// maps of a deleted one.
type Catalog struct {
	kv     KV
	prefix string
	// report is told of values a read skipped (see OnMalformed).
	report func(*MalformedError)
}

// OnMalformed sets fn to be told of every value a read reported and
// ignored without failing (a block map chunk outside its image's record,
// a key that is not a chunk's), so that the operator sees its key. fn must
// not call the catalog. Set it before the catalog is used.
func (c *Catalog) OnMalformed(fn func(*MalformedError)) { c.report = fn }

func (c *Catalog) reportMalformed(key string, err error) {
	if c.report != nil {
		c.report(&MalformedError{Key: key, Err: err})
	}
}

// NewCatalog returns a catalog over kv; prefix is "" or ends with '/'.
func NewCatalog(kv KV, prefix string) *Catalog {
	if prefix != "" && !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	return &Catalog{kv: kv, prefix: prefix}
}

// KV returns the underlying store.
func (c *Catalog) KV() KV { return c.kv }

// ImagesPrefix is the key prefix of image records, for watches.
func (c *Catalog) ImagesPrefix() string { return c.prefix + "images/" }

func (c *Catalog) imageKey(name string) string { return c.prefix + "images/" + name }
func (c *Catalog) mapPrefix(id, node string) string {
	return c.prefix + "blockmaps/" + id + "/" + node + "/"
}
func (c *Catalog) chunkKey(id, node string, chunk int) string {
	return fmt.Sprintf("%s%06d", c.mapPrefix(id, node), chunk)
}

// maxChunkKey bounds the chunk numbers parseChunkKey accepts (far beyond
// any image: 2^20 chunks of 2^20 blocks), so that no arithmetic on one
// overflows.
const maxChunkKey = 1 << 20

// parseChunkKey parses the last part of a chunk key: exactly what
// chunkKey writes ("%06d"), nothing else.
func parseChunkKey(s string) (int, bool) {
	if len(s) < 6 || len(s) > 7 {
		return 0, false
	}
	ch := 0
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
		ch = ch*10 + int(s[i]-'0')
	}
	if ch > maxChunkKey || fmt.Sprintf("%06d", ch) != s {
		return 0, false
	}
	return ch, true
}

// NewImageID returns a fresh random image id.
func NewImageID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// CreateImage stores a new image whose locations all start with the given
// state. It writes the block maps first and the record last, so a reader
// never sees an image without its maps; a crash in between leaves only
// unreferenced maps under a fresh id.
func (c *Catalog) CreateImage(ctx context.Context, img Image, initial placement.SyncState) (Image, error) {
	img.Version = RecordVersion
	if img.ID == "" {
		img.ID = NewImageID()
	}
	if img.Created.IsZero() {
		img.Created = time.Now().UTC().Truncate(time.Second)
	}
	if img.MinCopies == 0 {
		img.MinCopies = 1
	}
	if err := img.Validate(); err != nil {
		return Image{}, err
	}
	if _, err := c.kv.Get(ctx, c.imageKey(img.Name)); err == nil {
		return Image{}, fmt.Errorf("%q: %w", img.Name, ErrImageExists)
	} else if !errors.Is(err, ErrNotFound) {
		return Image{}, fmt.Errorf("create image %q: %w", img.Name, err)
	}
	bm := placement.NewBlockMap(img.Blocks(), initial)
	for _, node := range img.Locations {
		for ch := range placement.NumChunks(bm.Len()) {
			if err := c.kv.CAS(ctx, c.chunkKey(img.ID, node, ch), bm.EncodeChunk(ch), 0); err != nil {
				return Image{}, fmt.Errorf("create image %q: block map of %s: %w", img.Name, node, err)
			}
		}
	}
	data, err := json.Marshal(img)
	if err != nil {
		return Image{}, err
	}
	if err := c.kv.CASTouch(ctx, c.imageKey(img.Name), data, 0, c.bells(img)); err != nil {
		_ = c.kv.DeleteTree(ctx, c.prefix+"blockmaps/"+img.ID+"/")
		if errors.Is(err, ErrConflict) {
			return Image{}, fmt.Errorf("%q: %w", img.Name, ErrImageExists)
		}
		return Image{}, fmt.Errorf("create image %q: %w", img.Name, err)
	}
	return img, nil
}

// ImageFromEntry decodes an entry listed under ImagesPrefix (a
// *MalformedError naming its key when it is not a valid record of the
// image its key names).
func (c *Catalog) ImageFromEntry(e Entry) (Image, error) {
	img, err := decodeImage(e.Value)
	if err == nil && c.imageKey(img.Name) != e.Key {
		err = fmt.Errorf("record names image %q", img.Name)
	}
	if err != nil {
		return Image{}, &MalformedError{Key: e.Key, Err: err}
	}
	img.Rev = e.ModifyIndex
	return img, nil
}

// GetImage returns the record of name and its ModifyIndex.
func (c *Catalog) GetImage(ctx context.Context, name string) (Image, uint64, error) {
	e, err := c.kv.Get(ctx, c.imageKey(name))
	if errors.Is(err, ErrNotFound) {
		return Image{}, 0, fmt.Errorf("%q: %w", name, ErrImageNotFound)
	}
	if err != nil {
		return Image{}, 0, fmt.Errorf("read image %q: %w", name, err)
	}
	img, err := decodeImage(e.Value)
	if err != nil {
		return Image{}, 0, &MalformedError{Key: e.Key, Err: err}
	}
	if img.Name != name {
		return Image{}, 0, &MalformedError{Key: e.Key, Err: fmt.Errorf("record names image %q", img.Name)}
	}
	img.Rev = e.ModifyIndex
	return img, e.ModifyIndex, nil
}

// ListImages returns every readable image record in name order, the store
// index of the read, and one MalformedError per record that cannot be read.
func (c *Catalog) ListImages(ctx context.Context) ([]Image, uint64, []error, error) {
	entries, idx, err := c.kv.List(ctx, c.ImagesPrefix())
	if err != nil {
		return nil, 0, nil, fmt.Errorf("list images: %w", err)
	}
	var imgs []Image
	var bad []error
	for _, e := range entries {
		img, err := c.ImageFromEntry(e)
		if err != nil {
			bad = append(bad, err)
			continue
		}
		imgs = append(imgs, img)
	}
	return imgs, idx, bad, nil
}

// Tombstone records that an image id was deleted by an operator. Nodes
// delete their copy of an image only when its record is gone AND its
// tombstone exists: a record that vanishes without one (metadata lost or
// restored from an old backup) never costs data.
type Tombstone struct {
	Name    string    `json:"name"`
	Deleted time.Time `json:"deleted"`
}

func (c *Catalog) tombstoneKey(id string) string { return c.prefix + "tombstones/" + id }

// Tombstoned reports whether image id was deleted on purpose.
func (c *Catalog) Tombstoned(ctx context.Context, id string) (bool, error) {
	_, err := c.kv.Get(ctx, c.tombstoneKey(id))
	if errors.Is(err, ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read tombstone of image id %s: %w", id, err)
	}
	return true, nil
}

// DeleteImage writes the image's tombstone, removes the record (checked
// against index when non-zero), then the block maps.
func (c *Catalog) DeleteImage(ctx context.Context, img Image, index uint64) error {
	if index == 0 {
		e, err := c.kv.Get(ctx, c.imageKey(img.Name))
		if errors.Is(err, ErrNotFound) {
			return fmt.Errorf("%q: %w", img.Name, ErrImageNotFound)
		}
		if err != nil {
			return fmt.Errorf("delete image %q: %w", img.Name, err)
		}
		index = e.ModifyIndex
	}
	ts, err := json.Marshal(Tombstone{Name: img.Name, Deleted: time.Now().UTC()})
	if err != nil {
		return err
	}
	wrote := true
	if err := c.kv.CAS(ctx, c.tombstoneKey(img.ID), ts, 0); errors.Is(err, ErrConflict) {
		wrote = false
	} else if err != nil {
		return fmt.Errorf("delete image %q: write tombstone: %w", img.Name, err)
	}
	if err := c.kv.CASTouch(ctx, c.imageKey(img.Name), nil, index, c.bells(img)); err != nil {
		// A tombstone on a live image would have its copies removed by
		// the next trash sweep: take it back unless the record is gone
		// after all (a store that timed out may have deleted it).
		if live, _, gerr := c.GetImage(ctx, img.Name); wrote && gerr == nil && live.ID == img.ID {
			if e, gerr := c.kv.Get(ctx, c.tombstoneKey(img.ID)); gerr == nil {
				_ = c.kv.DeleteCAS(ctx, c.tombstoneKey(img.ID), e.ModifyIndex)
			}
		}
		if errors.Is(err, ErrNotFound) {
			return fmt.Errorf("%q: %w", img.Name, ErrImageNotFound)
		}
		return fmt.Errorf("delete image %q: %w", img.Name, err)
	}
	if err := c.kv.DeleteTree(ctx, c.prefix+"blockmaps/"+img.ID+"/"); err != nil {
		return fmt.Errorf("delete block maps of %q: %w", img.Name, err)
	}
	// The operator's decisions, exports and the activity log go with the
	// image: a new image of the same name starts with none.
	if err := c.kv.DeleteTree(ctx, c.exportPrefix(img.Name)); err != nil {
		return fmt.Errorf("delete exports of %q: %w", img.Name, err)
	}
	for _, key := range []string{c.imagePolicyKey(img.Name), c.syncPolicyKey(ImageScope(img.Name)), c.activityKey(img.ID), c.ownerKey(img.ID)} {
		if e, err := c.kv.Get(ctx, key); err == nil {
			if err := c.kv.DeleteCAS(ctx, key, e.ModifyIndex); err != nil && !errors.Is(err, ErrNotFound) {
				return fmt.Errorf("delete %s: %w", key, err)
			}
		}
	}
	return nil
}

// LocationMaps returns the block map of each of img's locations, and the
// record they were read with. A record read a moment ago may list a
// location removed since, whose maps are gone: a missing chunk then read as
// "malformed metadata" (chaos seed 117 failed an `image relocate` so; a CI
// run failed `image info` so while a replica count went down). When a map
// cannot be read the record is read again and, if it changed, the maps
// with it (three rounds at most), to tell a location removed meanwhile from
// a map really malformed. A record that is gone or now names another image
// (deleted, recreated) is not followed: the error stands.
func (c *Catalog) LocationMaps(ctx context.Context, img Image) (Image, map[string]*placement.BlockMap, error) {
	for attempt := 0; ; attempt++ {
		maps := make(map[string]*placement.BlockMap, len(img.Locations))
		var merr error
		for _, loc := range img.Locations {
			bm, err := c.BlockMap(ctx, img, loc)
			if err != nil {
				merr = err
				break
			}
			maps[loc] = bm
		}
		var malformed *MalformedError
		if merr == nil || !errors.As(merr, &malformed) || attempt == 2 {
			return img, maps, merr
		}
		fresh, _, err := c.GetImage(ctx, img.Name)
		if err != nil || fresh.ID != img.ID || fresh.Rev == img.Rev {
			return img, maps, merr
		}
		img = fresh
	}
}

// BlockMap reads the block map of node's copy of img. A map stored longer
// than the record says (an image being grown: the maps grow first, the
// record last) is read up to the record's length.
//
// The record sizes the map, never a key: a chunk past the record's last
// one is not read. The run of full chunks a grow in progress leaves right
// after it is expected; any other (a chunk number no grow explains, a key
// that is not a chunk's) is reported to OnMalformed and ignored. A chunk
// inside the record that is missing or malformed fails the read: it is
// never taken as in sync.
func (c *Catalog) BlockMap(ctx context.Context, img Image, node string) (*placement.BlockMap, error) {
	prefix := c.mapPrefix(img.ID, node)
	entries, _, err := c.kv.List(ctx, prefix)
	if err != nil {
		return nil, fmt.Errorf("read block map of %q on %s: %w", img.Name, node, err)
	}
	blocks := img.Blocks()
	want := placement.NumChunks(blocks)
	stored := blocks
	chunks := map[int][]byte{}
	full := map[int]bool{} // chunk covers ChunkBlocks blocks (for the grow check)
	var beyond []Entry
	for _, e := range entries {
		ch, ok := parseChunkKey(strings.TrimPrefix(e.Key, prefix))
		if !ok {
			c.reportMalformed(e.Key, errors.New("not a block map chunk key: ignored"))
			continue
		}
		n, err := placement.ChunkLen(e.Value)
		if ch >= want {
			if err == nil && n == placement.ChunkBlocks {
				full[ch] = true
			}
			beyond = append(beyond, e)
			continue
		}
		if err != nil {
			return nil, &MalformedError{Key: e.Key, Err: err}
		}
		full[ch] = n == placement.ChunkBlocks
		stored = max(stored, int64(ch)*placement.ChunkBlocks+n)
		chunks[ch] = e.Value
	}
	for _, e := range beyond {
		ch, _ := parseChunkKey(strings.TrimPrefix(e.Key, prefix))
		grown := want > 0
		for k := want - 1; grown && k < ch; k++ {
			grown = full[k]
		}
		if !grown {
			c.reportMalformed(e.Key, fmt.Errorf("block map chunk %d beyond the %d chunks of the image's %d blocks: ignored", ch, want, blocks))
		}
	}
	bm := placement.NewBlockMap(stored, placement.OutOfSync)
	for ch, v := range chunks {
		if err := bm.DecodeChunk(ch, v); err != nil {
			return nil, &MalformedError{Key: c.chunkKey(img.ID, node, ch), Err: err}
		}
	}
	for ch := range want {
		if _, ok := chunks[ch]; !ok {
			// A missing chunk is never taken as in sync.
			return nil, &MalformedError{Key: c.chunkKey(img.ID, node, ch), Err: errors.New("block map chunk missing")}
		}
	}
	if stored != blocks {
		bm = bm.Resized(blocks, placement.OutOfSync)
	}
	return bm, nil
}
