package meta_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
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
	c := newCatalog(t)
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
	c, kv := newCatalogKV(t)
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

// A restore and a purge decide on the entry first: the one that marked it
// wins, the other is refused; an entry whose image is live (a trash that
// failed half way) is neither restored a second time nor purged.
func TestTrashRestoreAndPurgeExcludeEachOther(t *testing.T) {
	ctx := context.Background()
	c, kv := newCatalogKV(t)
	now := time.Now()
	mk := func(name string) meta.Image {
		img, err := c.CreateImage(ctx, meta.Image{Name: name, Size: 1 << 20, BlockSize: 1 << 20, Locations: []string{"n1"}}, placement.InSync)
		if err != nil {
			t.Fatal(err)
		}
		return img
	}
	mark := func(id, state, restoreName string) {
		t.Helper()
		e, err := kv.Get(ctx, "ukai/trash/"+id)
		if err != nil {
			t.Fatal(err)
		}
		var v map[string]any
		if err := json.Unmarshal(e.Value, &v); err != nil {
			t.Fatal(err)
		}
		v["state"], v["restore_name"], v["marked"] = state, restoreName, time.Now().UTC()
		b, _ := json.Marshal(v)
		if err := kv.CAS(ctx, "ukai/trash/"+id, b, e.ModifyIndex); err != nil {
			t.Fatal(err)
		}
	}
	// Being purged: no restore.
	a := mk("a")
	if _, err := c.TrashImage(ctx, a, 0, now, now); err != nil {
		t.Fatal(err)
	}
	mark(a.ID, "purging", "")
	if _, err := c.RestoreImage(ctx, a.ID, ""); !errors.Is(err, meta.ErrConflict) {
		t.Fatalf("restore of an entry being purged: %v", err)
	}
	if err := c.PurgeImage(ctx, a.ID); err != nil {
		t.Fatalf("finishing a purge: %v", err)
	}
	// Being restored: no purge; the restore is finished by the next one.
	b := mk("b")
	if _, err := c.TrashImage(ctx, b, 0, now, now); err != nil {
		t.Fatal(err)
	}
	mark(b.ID, "restoring", "b2")
	if err := c.PurgeImage(ctx, b.ID); !errors.Is(err, meta.ErrConflict) || !strings.Contains(err.Error(), "being restored") {
		t.Fatalf("purge of an entry being restored: %v", err)
	}
	if img, err := c.RestoreImage(ctx, b.ID, ""); err != nil || img.Name != "b2" {
		t.Fatalf("finishing the restore: %+v %v", img, err)
	}
	// A leftover entry beside its live image: not restored under a second
	// name, and purge only clears it away.
	d := mk("d")
	if _, err := c.TrashImage(ctx, d, 0, now, now); err != nil {
		t.Fatal(err)
	}
	e, _ := kv.Get(ctx, "ukai/trash/"+d.ID)
	if _, err := c.RestoreImage(ctx, d.ID, ""); err != nil {
		t.Fatal(err)
	}
	if err := kv.CAS(ctx, "ukai/trash/"+d.ID, e.Value, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := c.RestoreImage(ctx, d.ID, "d-copy"); !errors.Is(err, meta.ErrConflict) || !strings.Contains(err.Error(), "live as d") {
		t.Fatalf("a second record for one id: %v", err)
	}
	if err := c.PurgeImage(ctx, d.ID); !errors.Is(err, meta.ErrConflict) {
		t.Fatalf("purge of a live image's leftover entry: %v", err)
	}
	if ts, _ := c.Tombstoned(ctx, d.ID); ts {
		t.Fatal("the live image got a tombstone")
	}
	if live, _, err := c.GetImage(ctx, "d"); err != nil || live.ID != d.ID {
		t.Fatalf("the live image: %+v %v", live, err)
	}
	if l, _, _ := c.ListTrash(ctx); len(l) != 0 {
		t.Fatalf("leftover entries: %+v", l)
	}
}
