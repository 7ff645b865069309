package kvtest

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/placement"
)

// RunCatalog runs the catalog over a store holding values written into it
// by hand (Consul edited with `consul kv put`, a restored or hostile
// backup): each must be reported with its key and ignored, never followed
// (an id is never taken as a path, a chunk key never sizes a map). newKV
// returns an empty store, as for Run.
func RunCatalog(t *testing.T, newKV func(t *testing.T) meta.KV) {
	tests := []struct {
		name string
		fn   func(t *testing.T, c *meta.Catalog, p string)
	}{
		{"HostileImageIDs", testHostileImageIDs},
		{"ChunkBeyondRecord", testChunkBeyondRecord},
		{"FormerOwnerInSyncRecord", testFormerOwnerInSyncRecord},
		{"GrowDuringAddLocation", testGrowDuringAddLocation},
		{"AddLocationStaleRecord", testAddLocationStaleRecord},
		{"RecordForRemovedLocation", testRecordForRemovedLocation},
		{"PortNumbers", testPortNumbers},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := "kvtest/catalog/" + tc.name + "/"
			tc.fn(t, meta.NewCatalog(newKV(t), p), p)
		})
	}
}

// reports collects what the catalog reported and ignored.
type reports struct {
	mu   sync.Mutex
	keys []string
}

func (r *reports) add(e *meta.MalformedError) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.keys = append(r.keys, e.Key)
}

func (r *reports) has(key string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Contains(r.keys, key)
}

// testHostileImageIDs: a record whose id (or origin's, or a snapshot's)
// is not 32 lowercase hex digits is malformed, whatever else it says.
func testHostileImageIDs(t *testing.T, c *meta.Catalog, p string) {
	cx := ctx(t)
	good, err := c.CreateImage(cx, meta.Image{Name: "good", Size: 1 << 20, BlockSize: 1 << 20, Locations: []string{"n1"}}, placement.InSync)
	if err != nil {
		t.Fatal(err)
	}
	traversal := strings.Repeat("../", 8) + "tmp/ukai" // 32 bytes: the length check alone let it through
	upper := strings.ToUpper(meta.NewImageID())
	rec := func(name, id, extra string) string {
		return `{"version":1,"id":"` + id + `","name":"` + name + `","size":1048576,"block_size":1048576,` +
			`"created":"2026-11-28T13:00:00Z","locations":["n1"],"min_copies":1` + extra + `}`
	}
	hostile := map[string]string{
		"traversal":    rec("traversal", traversal, ""),
		"upper":        rec("upper", upper, ""),
		"nul":          rec("nul", strings.Repeat("a", 31)+`\u0000`, ""),
		"bad-origin":   rec("bad-origin", meta.NewImageID(), `,"origin":{"name":"good","id":"`+traversal+`"}`),
		"bad-snapshot": rec("bad-snapshot", meta.NewImageID(), `,"snapshots":[{"name":"s1","id":"`+traversal+`"}]`),
	}
	for name, v := range hostile {
		if err := c.KV().CAS(cx, p+"images/"+name, []byte(v), 0); err != nil {
			t.Fatal(err)
		}
	}
	imgs, _, bad, err := c.ListImages(cx)
	if err != nil {
		t.Fatal(err)
	}
	if len(imgs) != 1 || imgs[0].ID != good.ID {
		t.Errorf("ListImages returned %d records, want only %q: %+v", len(imgs), good.Name, imgs)
	}
	var badKeys []string
	for _, e := range bad {
		var me *meta.MalformedError
		if !errors.As(e, &me) {
			t.Fatalf("ListImages reported %v, not a MalformedError", e)
		}
		badKeys = append(badKeys, me.Key)
	}
	for name := range hostile {
		if !slices.Contains(badKeys, p+"images/"+name) {
			t.Errorf("record %s with a malformed id not reported (reported: %v)", name, badKeys)
		}
		var me *meta.MalformedError
		if img, _, err := c.GetImage(cx, name); !errors.As(err, &me) || me.Key != p+"images/"+name {
			t.Errorf("GetImage(%s) = %+v, %v; want a MalformedError naming its key", name, img, err)
		}
		if e, err := c.KV().Get(cx, p+"images/"+name); err != nil || string(e.Value) != hostile[name] {
			t.Errorf("malformed record %s rewritten: %q %v", name, e.Value, err)
		}
	}
	// Creating one is refused before anything is written.
	for _, id := range []string{traversal, upper} {
		if _, err := c.CreateImage(cx, meta.Image{ID: id, Name: "made", Size: 1 << 20, BlockSize: 1 << 20, Locations: []string{"n1"}}, placement.InSync); !errors.Is(err, meta.ErrInvalid) {
			t.Errorf("CreateImage with id %q: %v, want ErrInvalid", id, err)
		}
	}
	if es, _, _ := c.KV().List(cx, p+"blockmaps/"); len(es) != 1 {
		t.Errorf("block maps written for refused ids: %d keys", len(es))
	}
}

// testChunkBeyondRecord: a chunk stored past the record's last chunk (an
// absurd chunk number, a key that only looks like one) is reported and
// ignored; the map is sized by the record, never by a key.
func testChunkBeyondRecord(t *testing.T, c *meta.Catalog, p string) {
	cx := ctx(t)
	var r reports
	c.OnMalformed(r.add)
	img, err := c.CreateImage(cx, meta.Image{Name: "img", Size: 3 << 20, BlockSize: 1 << 20, Locations: []string{"n1"}}, placement.InSync)
	if err != nil {
		t.Fatal(err)
	}
	one := placement.NewBlockMap(1, placement.OutOfSync).EncodeChunk(0)
	full := placement.NewBlockMap(placement.ChunkBlocks, placement.OutOfSync).EncodeChunk(0)
	mp := p + "blockmaps/" + img.ID + "/n1/"
	hostile := map[string][]byte{
		mp + "999999":      one,  // 2^40 blocks, if the key sized the map
		mp + "99999999999": full, // parsed as 999999 by a six-digit scan
		mp + "000001":      full, // right after the last chunk, but that one is not full: no grow explains it
		mp + "00000x":      one,  // not a chunk key
	}
	for k, v := range hostile {
		if err := c.KV().CAS(cx, k, v, 0); err != nil {
			t.Fatal(err)
		}
	}
	bm, err := c.BlockMap(cx, img, "n1")
	if err != nil {
		t.Fatalf("BlockMap with stray chunks: %v (they must be reported and ignored)", err)
	}
	if bm.Len() != img.Blocks() || bm.Count(placement.InSync) != img.Blocks() {
		t.Fatalf("map read as %d blocks, %d in sync; want the record's %d, all in sync", bm.Len(), bm.Count(placement.InSync), img.Blocks())
	}
	for k := range hostile {
		if !r.has(k) {
			t.Errorf("stray chunk %s not reported (reported: %v)", k, r.keys)
		}
	}
	// Updates go through the record's chunks only and leave the strays as they are.
	if err := c.SetBlockStates(cx, img, "n1", []int64{2}, placement.OutOfSync); err != nil {
		t.Fatal(err)
	}
	if bm, err := c.BlockMap(cx, img, "n1"); err != nil || bm.Len() != 3 || bm.Get(2) != placement.OutOfSync {
		t.Fatalf("after an update: %v %v", bm, err)
	}
	for k, v := range hostile {
		if e, err := c.KV().Get(cx, k); err != nil || string(e.Value) != string(v) {
			t.Errorf("stray chunk %s rewritten: %v", k, err)
		}
	}
	// Growing over a stray chunk: the new blocks are in sync, whatever it said.
	grown, err := c.GrowImage(cx, "img", (placement.ChunkBlocks+2)<<20)
	if err != nil {
		t.Fatal(err)
	}
	bm, err = c.BlockMap(cx, grown, "n1")
	if err != nil {
		t.Fatal(err)
	}
	if bm.Len() != placement.ChunkBlocks+2 || bm.Get(2) != placement.OutOfSync || bm.Count(placement.OutOfSync) != 1 {
		t.Fatalf("grown over a stray chunk: %d blocks, %d out of sync; want %d, only block 2", bm.Len(), bm.Count(placement.OutOfSync), placement.ChunkBlocks+2)
	}
	img = grown
	// A chunk inside the record that is missing or corrupt still fails the read.
	e, err := c.KV().Get(cx, mp+"000000")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.KV().CAS(cx, mp+"000000", []byte("garbage"), e.ModifyIndex); err != nil {
		t.Fatal(err)
	}
	var me *meta.MalformedError
	if _, err := c.BlockMap(cx, img, "n1"); !errors.As(err, &me) || me.Key != mp+"000000" {
		t.Fatalf("corrupt chunk inside the record: %v", err)
	}
}

// beforeGuarded runs hook once, just before the first guarded write.
type beforeGuarded struct {
	meta.KV
	hook func()
}

func (k *beforeGuarded) CASGuarded(ctx context.Context, key string, value []byte, index uint64, guard string, guardIndex uint64) error {
	if h := k.hook; h != nil {
		k.hook = nil
		h()
	}
	return k.KV.CASGuarded(ctx, key, value, index, guard, guardIndex)
}

// testFormerOwnerInSyncRecord: a sync by owner A is about to record n2's
// block 1 in sync, its ownership checked, when B takes the image over
// (generation 2) and reads the maps. A's record must not land: B would
// leave n2 out of its writes while n2 is recorded in sync. (Found by a
// chaos run, where the record landed after the handover.)
func testFormerOwnerInSyncRecord(t *testing.T, c *meta.Catalog, p string) {
	cx := ctx(t)
	img := OwnedImage(t, c, "img", 3<<20, 1<<20, "A", "n1", "n2")
	if err := c.SetBlockStates(cx, img, "n2", []int64{1}, placement.OutOfSync); err != nil {
		t.Fatal(err)
	}
	var seenByB *placement.BlockMap
	kv := &beforeGuarded{KV: c.KV(), hook: func() {
		// The handover, between A's ownership check and its write.
		b, err := c.UpdateImage(cx, "img", func(i *meta.Image) error { i.Owner = "B"; i.Generation++; return nil })
		if err != nil {
			t.Error(err)
			return
		}
		if seenByB, err = c.BlockMap(cx, b, "n2"); err != nil {
			t.Error(err)
		}
	}}
	a := meta.NewCatalog(kv, p)
	err := a.SetBlockStatesOwned(cx, img, "n2", []int64{1}, placement.InSync, "A", 1)
	if !errors.Is(err, meta.ErrNotOwner) {
		t.Fatalf("former owner's in-sync record after a takeover: %v, want ErrNotOwner", err)
	}
	if seenByB == nil || seenByB.Get(1) != placement.OutOfSync {
		t.Fatalf("the new owner read %v", seenByB)
	}
	bm, err := c.BlockMap(cx, img, "n2")
	if err != nil {
		t.Fatal(err)
	}
	if bm.Get(1) != placement.OutOfSync {
		t.Fatalf("n2 block 1 is %v after the former owner's refused record; want out of sync, as the new owner read it", bm.Get(1))
	}
	// The owner of the day records in sync, even while its record moves.
	if err := c.SetBlockStatesOwned(cx, img, "n2", []int64{1}, placement.InSync, "A", 1); !errors.Is(err, meta.ErrNotOwner) {
		t.Fatalf("A again: %v, want ErrNotOwner", err)
	}
	if err := c.SetBlockStatesOwned(cx, img, "n2", []int64{1}, placement.InSync, "B", 2); err != nil {
		t.Fatal(err)
	}
	if bm, err := c.BlockMap(cx, img, "n2"); err != nil || bm.Get(1) != placement.InSync {
		t.Fatalf("the owner's own record: %v %v", bm, err)
	}
}

// afterCAS runs hook once, right after the first successful CAS of a key
// with the given prefix.
type afterCAS struct {
	meta.KV
	prefix string
	hook   func()
}

func (k *afterCAS) CAS(ctx context.Context, key string, value []byte, index uint64) error {
	err := k.KV.CAS(ctx, key, value, index)
	if h := k.hook; err == nil && h != nil && strings.HasPrefix(key, k.prefix) {
		k.hook = nil
		h()
	}
	return err
}

func (k *afterCAS) CASGuarded(ctx context.Context, key string, value []byte, index uint64, guard string, guardIndex uint64) error {
	err := k.KV.CASGuarded(ctx, key, value, index, guard, guardIndex)
	if h := k.hook; err == nil && h != nil && strings.HasPrefix(key, k.prefix) {
		k.hook = nil
		h()
	}
	return err
}

// staleGet answers one Get of key with an old entry, as a Consul server
// still replaying its log after a restart does.
type staleGet struct {
	meta.KV
	key string
	old *meta.Entry
}

func (k *staleGet) Get(ctx context.Context, key string) (meta.Entry, error) {
	if key == k.key && k.old != nil {
		e := *k.old
		k.old = nil
		return e, nil
	}
	return k.KV.Get(ctx, key)
}

// testAddLocationStaleRecord: an add of a location whose record read is
// stale (it does not list the node yet, and has the image's old size)
// must not replace the node's live map with one of the old length, all
// out of sync (chaos seed 131: a malformed image, and a live copy reset).
func testAddLocationStaleRecord(t *testing.T, c *meta.Catalog, p string) {
	cx := ctx(t)
	if _, err := c.CreateImage(cx, meta.Image{Name: "img", Size: 3 << 20, BlockSize: 1 << 20, Locations: []string{"n1"}}, placement.InSync); err != nil {
		t.Fatal(err)
	}
	old, err := c.KV().Get(cx, p+"images/img")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.AddLocation(cx, "img", "n2"); err != nil {
		t.Fatal(err)
	}
	cur, err := c.GrowImage(cx, "img", 5<<20)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetBlockStates(cx, cur, "n2", []int64{0, 1, 2, 3, 4}, placement.InSync); err != nil {
		t.Fatal(err)
	}
	_, err = meta.NewCatalog(&staleGet{KV: c.KV(), key: p + "images/img", old: &old}, p).AddLocation(cx, "img", "n2")
	if !errors.Is(err, meta.ErrInvalid) {
		t.Fatalf("add of a location already there, from a stale record: %v, want already a location", err)
	}
	cur, _, err = c.GetImage(cx, "img")
	if err != nil {
		t.Fatal(err)
	}
	bm, err := c.BlockMap(cx, cur, "n2")
	if err != nil {
		t.Fatalf("n2's map after the stale add: %v", err)
	}
	if bm.Len() != 5 || bm.Count(placement.InSync) != 5 {
		t.Fatalf("n2's map after the stale add: %d blocks, %d in sync; want 5, all in sync", bm.Len(), bm.Count(placement.InSync))
	}
}

// testGrowDuringAddLocation: an image grows between a new location's
// block map and the record naming it. The map must not stay shorter than
// the record (a malformed image nobody can write to; chaos seed 104).
func testGrowDuringAddLocation(t *testing.T, c *meta.Catalog, p string) {
	cx := ctx(t)
	img, err := c.CreateImage(cx, meta.Image{Name: "img", Size: 3 << 20, BlockSize: 1 << 20, Locations: []string{"n1"}}, placement.InSync)
	if err != nil {
		t.Fatal(err)
	}
	kv := &afterCAS{KV: c.KV(), prefix: p + "blockmaps/" + img.ID + "/n2/", hook: func() {
		if _, err := c.GrowImage(cx, "img", 5<<20); err != nil {
			t.Errorf("grow during the add: %v", err)
		}
	}}
	added, err := meta.NewCatalog(kv, p).AddLocation(cx, "img", "n2")
	if err != nil {
		t.Fatalf("add location while the image grew: %v", err)
	}
	if kv.hook != nil {
		t.Fatal("test setup: the grow did not run")
	}
	if added.Size != 5<<20 || !added.HasLocation("n2") {
		t.Fatalf("after the add: size %d, locations %v", added.Size, added.Locations)
	}
	bm, err := c.BlockMap(cx, added, "n2")
	if err != nil {
		t.Fatalf("the new location's map after a grow during the add: %v", err)
	}
	if bm.Len() != 5 || bm.Count(placement.OutOfSync) != 5 {
		t.Fatalf("the new location's map: %d blocks, %d out of sync; want 5, all out of sync", bm.Len(), bm.Count(placement.OutOfSync))
	}
}

// testRecordForRemovedLocation: an owner whose record still lists a
// location that was removed meanwhile (its map deleted) records a failed
// write to it: out of sync needs no record for a copy that left (no
// "malformed" error failing the write); in sync is refused.
func testRecordForRemovedLocation(t *testing.T, c *meta.Catalog, p string) {
	cx := ctx(t)
	img := OwnedImage(t, c, "img", 3<<20, 1<<20, "A", "n1", "n2")
	if _, err := c.RemoveLocation(cx, "img", "n2"); err != nil {
		t.Fatal(err)
	}
	if err := c.SetBlockStatesOwned(cx, img, "n2", []int64{1}, placement.OutOfSync, "A", 1); err != nil {
		t.Fatalf("out-of-sync record for a removed location: %v, want none needed", err)
	}
	if err := c.SetBlockStatesOwned(cx, img, "n2", []int64{1}, placement.InSync, "A", 1); err == nil {
		t.Fatal("in-sync record for a removed location accepted")
	}
}

// BoltCatalog is a catalog over a fresh embedded store (prefix "ukai/"),
// closed when t ends: the real store, for tests of the packages above it.
func BoltCatalog(t testing.TB) *meta.Catalog {
	t.Helper()
	kv, err := meta.OpenBolt(filepath.Join(t.TempDir(), "meta.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kv.Close() })
	return meta.NewCatalog(kv, "ukai/")
}

// OwnedImage creates image name on c with a copy on each of locations,
// every block in sync, owned by owner at generation 1.
func OwnedImage(t testing.TB, c *meta.Catalog, name string, size, blockSize int64, owner string, locations ...string) meta.Image {
	t.Helper()
	cx := context.Background()
	if _, err := c.CreateImage(cx, meta.Image{Name: name, Size: size, BlockSize: blockSize, Locations: locations}, placement.InSync); err != nil {
		t.Fatal(err)
	}
	img, err := c.UpdateImage(cx, name, func(i *meta.Image) error { i.Owner, i.Generation = owner, 1; return nil })
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// testPortNumbers: nodes starting at once each get a number of their own,
// the same one every time they ask; a value written by hand under the
// prefix is reported and neither handed out nor in the way.
func testPortNumbers(t *testing.T, c *meta.Catalog, p string) {
	ctx := context.Background()
	var r reports
	c.OnMalformed(r.add)
	kv := c.KV()
	if err := kv.CAS(ctx, p+"ports/zero", []byte("x"), 0); err != nil {
		t.Fatal(err)
	}
	if err := kv.CAS(ctx, p+"ports/2", []byte("old-node"), 0); err != nil {
		t.Fatal(err)
	}
	const nodes = 8
	got := make([]uint16, nodes)
	errs := make([]error, nodes)
	var wg sync.WaitGroup
	for i := range nodes {
		wg.Go(func() { got[i], errs[i] = c.PortNumber(ctx, fmt.Sprintf("n%d", i)) })
	}
	wg.Wait()
	seen := map[uint16]string{2: "old-node"}
	for i, num := range got {
		if errs[i] != nil {
			t.Fatalf("n%d: %v", i, errs[i])
		}
		if num == 0 {
			t.Fatalf("n%d got number 0", i)
		}
		if other, dup := seen[num]; dup {
			t.Fatalf("n%d and %s both got %d", i, other, num)
		}
		seen[num] = fmt.Sprintf("n%d", i)
		again, err := c.PortNumber(ctx, fmt.Sprintf("n%d", i))
		if err != nil || again != num {
			t.Fatalf("n%d asked again: %d, %v; want %d", i, again, err, num)
		}
	}
	// The lowest free numbers: 1 and 3..9.
	for num := uint16(1); num <= nodes+1; num++ {
		if _, ok := seen[num]; !ok {
			t.Fatalf("number %d left free while %v were handed out", num, got)
		}
	}
	if !r.has(p + "ports/zero") {
		t.Fatalf("the hand-written ports/zero was not reported: %v", r.keys)
	}
	// A cached number: ours is fine, another node's is refused, a free one
	// is claimed (and then not handed out).
	if err := c.ClaimPortNumber(ctx, "n0", got[0]); err != nil {
		t.Fatalf("n0 claiming its own number: %v", err)
	}
	if err := c.ClaimPortNumber(ctx, "n0", 2); !errors.Is(err, meta.ErrPortTaken) {
		t.Fatalf("n0 claiming old-node's number: %v", err)
	}
	if err := c.ClaimPortNumber(ctx, "restored", 100); err != nil {
		t.Fatalf("claiming a free number: %v", err)
	}
	if num, err := c.PortNumber(ctx, "restored"); err != nil || num != 100 {
		t.Fatalf("the claimed number: %d, %v", num, err)
	}
	if _, err := c.PortNumber(ctx, "not a name"); err == nil {
		t.Fatal("a bad node name got a number")
	}
}
