package meta_test

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/placement"
)

// An image in the trash frees its name at once, keeps its block maps, and
// comes back (under its name or another) with its policy and access
// grants; a new image of the same name starts without them; a purge
// leaves a tombstone and nothing else.
func TestTrashRestoreAndPurge(t *testing.T) {
	ctx := context.Background()
	kv, err := meta.OpenBolt(filepath.Join(t.TempDir(), "meta.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kv.Close() })
	c := meta.NewCatalog(kv, "ukai")
	img, err := c.CreateImage(ctx, meta.Image{Name: "vm1", Size: 2 << 20, BlockSize: 1 << 20, Locations: []string{"n1", "n2"}}, placement.InSync)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.UpdateImagePolicy(ctx, "vm1", func(p *placement.ImagePolicy) error { p.Replicas = 2; return nil }); err != nil {
		t.Fatal(err)
	}
	if err := c.SetExport(ctx, "vm1", meta.Export{Version: 1, Initiator: "iqn.2026-12.test:h1"}); err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	entry, err := c.TrashImage(ctx, img, 0, t0, t0.Add(24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if entry.Policy == nil || len(entry.Exports) != 1 {
		t.Fatalf("the entry did not take the policy and grant along: %+v", entry)
	}
	if _, _, err := c.GetImage(ctx, "vm1"); !errors.Is(err, meta.ErrImageNotFound) {
		t.Fatalf("the trashed image is still there: %v", err)
	}
	if ok, err := c.Trashed(ctx, img.ID); !ok || err != nil {
		t.Fatalf("trashed: %v %v", ok, err)
	}
	if bm, err := c.BlockMap(ctx, img, "n2"); err != nil || bm.Count(placement.InSync) != 2 {
		t.Fatalf("block map of the trashed image: %v %v", bm, err)
	}
	// The name is free; the new image has no policy and no grant.
	if _, err := c.CreateImage(ctx, meta.Image{Name: "vm1", Size: 1 << 20, BlockSize: 1 << 20, Locations: []string{"n1"}}, placement.InSync); err != nil {
		t.Fatalf("reusing the name: %v", err)
	}
	if p, _, err := c.ImagePolicy(ctx, "vm1"); err != nil || p.Replicas != 0 {
		t.Fatalf("the new vm1 inherited a policy: %+v %v", p, err)
	}
	if ex, _, err := c.ImageExports(ctx, "vm1"); err != nil || len(ex) != 0 {
		t.Fatalf("the new vm1 inherited access grants: %v %v", ex, err)
	}
	// Restoring under the taken name is refused; under another, it works.
	if _, err := c.RestoreImage(ctx, img.ID, ""); !errors.Is(err, meta.ErrImageExists) {
		t.Fatalf("restore onto a taken name: %v", err)
	}
	back, err := c.RestoreImage(ctx, img.ID, "vm1-old")
	if err != nil || back.ID != img.ID || back.Generation != img.Generation+1 {
		t.Fatalf("restore: %+v %v", back, err)
	}
	if p, _, err := c.ImagePolicy(ctx, "vm1-old"); err != nil || p.Replicas != 2 {
		t.Fatalf("policy after restore: %+v %v", p, err)
	}
	if ex, _, err := c.ImageExports(ctx, "vm1-old"); err != nil || len(ex) != 1 {
		t.Fatalf("grants after restore: %v %v", ex, err)
	}
	if l, _, err := c.ListTrash(ctx); err != nil || len(l) != 0 {
		t.Fatalf("trash after restore: %v %v", l, err)
	}
	// Trash again and purge: a tombstone, no maps, no entry.
	back, _, _ = c.GetImage(ctx, "vm1-old")
	if _, err := c.TrashImage(ctx, back, 0, t0, t0); err != nil {
		t.Fatal(err)
	}
	if err := c.PurgeImage(ctx, img.ID); err != nil {
		t.Fatal(err)
	}
	if err := c.PurgeImage(ctx, img.ID); !errors.Is(err, meta.ErrTrashNotFound) {
		t.Fatalf("second purge: %v", err)
	}
	if ok, _ := c.Tombstoned(ctx, img.ID); !ok {
		t.Fatal("no tombstone after purge")
	}
	if _, err := c.BlockMap(ctx, back, "n1"); err == nil {
		t.Fatal("block map left after purge")
	}
	if _, err := c.RestoreImage(ctx, img.ID, ""); !errors.Is(err, meta.ErrTrashNotFound) {
		t.Fatalf("restore after purge: %v", err)
	}
}

// A trash entry that lies (another image's id, a key that is no
// initiator) is reported, not restored.
func TestTrashMalformedEntry(t *testing.T) {
	ctx := context.Background()
	kv, err := meta.OpenBolt(filepath.Join(t.TempDir(), "meta.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kv.Close() })
	c := meta.NewCatalog(kv, "ukai")
	id := meta.NewImageID()
	for _, v := range []string{
		`{"image":{"version":1,"id":"` + meta.NewImageID() + `","name":"x","size":1048576,"block_size":1048576,"locations":["n1"],"min_copies":1}}`,
		`{"image":{"version":1,"id":"` + id + `","name":"x","size":1048576,"block_size":1048576,"locations":["n1"],"min_copies":1},"exports":{"../../policies/default":{}}}`,
		`not json`,
	} {
		e, _ := kv.Get(ctx, "ukai/trash/"+id)
		if err := kv.CAS(ctx, "ukai/trash/"+id, []byte(v), e.ModifyIndex); err != nil {
			t.Fatal(err)
		}
		l, bad, err := c.ListTrash(ctx)
		if err != nil || len(l) != 0 || len(bad) != 1 {
			t.Fatalf("%s: listed %v, bad %v, %v", v, l, bad, err)
		}
		var malformed *meta.MalformedError
		if _, err := c.RestoreImage(ctx, id, ""); !errors.As(err, &malformed) {
			t.Fatalf("%s: restore: %v", v, err)
		}
	}
}
