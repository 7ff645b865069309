package meta_test

import (
	"context"
	"errors"
	"testing"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/placement"
)

// Growing an image: maps first (readable with the old record all along,
// and updates through the old record keep the longer length), then the
// record; the new blocks are in sync, the old states kept.
func TestGrowImage(t *testing.T) {
	ctx := context.Background()
	c := newCatalog(t)
	// The longer maps of a grow are expected, never reported.
	c.OnMalformed(func(e *meta.MalformedError) { t.Errorf("reported while growing: %v", e) })
	img, err := c.CreateImage(ctx, meta.Image{Name: "g", Size: 3 << 20, BlockSize: 1 << 20, Locations: []string{"n1", "n2"}}, placement.InSync)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetBlockStates(ctx, img, "n2", []int64{1}, placement.OutOfSync); err != nil {
		t.Fatal(err)
	}
	grown, err := c.GrowImage(ctx, "g", 5<<20+512)
	if err != nil || grown.Size != 5<<20+512 || grown.Blocks() != 6 {
		t.Fatalf("grow: %+v %v", grown, err)
	}
	bm, err := c.BlockMap(ctx, grown, "n2")
	if err != nil || bm.Len() != 6 || bm.Get(1) != placement.OutOfSync || bm.Count(placement.InSync) != 5 {
		t.Fatalf("grown map of n2: %v %v", bm, err)
	}
	// A node still holding the old record reads and updates the longer map.
	old, err := c.BlockMap(ctx, img, "n1")
	if err != nil || old.Len() != 3 {
		t.Fatalf("old record, grown map: %v %v", old, err)
	}
	if err := c.SetBlockStates(ctx, img, "n1", []int64{2}, placement.OutOfSync); err != nil {
		t.Fatal(err)
	}
	bm, err = c.BlockMap(ctx, grown, "n1")
	if err != nil || bm.Len() != 6 || bm.Get(2) != placement.OutOfSync || bm.Get(5) != placement.InSync {
		t.Fatalf("grown map after an update through the old record: %v %v", bm, err)
	}
	if _, err := c.GrowImage(ctx, "g", 1<<20); !errors.Is(err, meta.ErrInvalid) {
		t.Fatalf("shrink: %v", err)
	}
	if same, err := c.GrowImage(ctx, "g", grown.Size); err != nil || same.Size != grown.Size {
		t.Fatalf("grow to the same size: %+v %v", same, err)
	}
}

func TestSnapshotRecordsAndCowMap(t *testing.T) {
	ctx := context.Background()
	c := newCatalog(t)
	img, err := c.CreateImage(ctx, meta.Image{Name: "o", Size: 4 << 20, BlockSize: 1 << 20, Locations: []string{"n1"}}, placement.InSync)
	if err != nil {
		t.Fatal(err)
	}
	snap := meta.Image{ID: meta.NewImageID(), Name: "o-s1", Size: img.Size, BlockSize: img.BlockSize, Locations: img.Locations,
		Origin: &meta.Origin{Name: img.Name, ID: img.ID}}
	if err := c.CreateCowMap(ctx, snap); err != nil {
		t.Fatal(err)
	}
	snap, err = c.CreateImage(ctx, snap, placement.InSync)
	if err != nil || !snap.IsSnapshot() {
		t.Fatalf("snapshot record: %+v %v", snap, err)
	}
	cow, err := c.BlockMap(ctx, snap, meta.CowNode)
	if err != nil || cow.Count(placement.OutOfSync) != 4 {
		t.Fatalf("fresh copy-on-write map shares every block: %v %v", cow, err)
	}
	upd, err := c.UpdateImage(ctx, "o", func(i *meta.Image) error {
		i.Snapshots = append(i.Snapshots, meta.SnapshotRef{Name: snap.Name, ID: snap.ID})
		return nil
	})
	if err != nil || !upd.HasSnapshot(snap.ID) {
		t.Fatalf("origin lists the snapshot: %+v %v", upd, err)
	}
	// A snapshot of a snapshot, a malformed reference, growing a snapshot: refused.
	if _, err := c.UpdateImage(ctx, "o-s1", func(i *meta.Image) error {
		i.Snapshots = []meta.SnapshotRef{{Name: "x", ID: meta.NewImageID()}}
		return nil
	}); !errors.Is(err, meta.ErrInvalid) {
		t.Fatalf("snapshot with snapshots: %v", err)
	}
	if _, err := c.UpdateImage(ctx, "o", func(i *meta.Image) error {
		i.Snapshots = append(i.Snapshots, meta.SnapshotRef{Name: "Bad Name", ID: "short"})
		return nil
	}); !errors.Is(err, meta.ErrInvalid) {
		t.Fatalf("malformed snapshot reference: %v", err)
	}
	if _, err := c.GrowImage(ctx, "o-s1", 8<<20); !errors.Is(err, meta.ErrInvalid) {
		t.Fatalf("growing a snapshot: %v", err)
	}
	// Deleting the snapshot takes its copy-on-write map along.
	if err := c.DeleteImage(ctx, snap, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := c.BlockMap(ctx, snap, meta.CowNode); err == nil {
		t.Fatal("copy-on-write map outlived its snapshot")
	}
}
