package meta_test

import (
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/placement"
)

func newCatalog(t *testing.T) *meta.Catalog {
	kv, err := meta.OpenBolt(filepath.Join(t.TempDir(), "meta.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kv.Close() })
	return meta.NewCatalog(kv, "ukai")
}

func TestCatalogLifecycle(t *testing.T) {
	ctx := context.Background()
	c := newCatalog(t)
	img, err := c.CreateImage(ctx, meta.Image{Name: "vm1", Size: 10 << 20, BlockSize: 4 << 20, Locations: []string{"n1", "n2"}}, placement.InSync)
	if err != nil {
		t.Fatal(err)
	}
	if img.Blocks() != 3 || img.MinCopies != 1 || len(img.ID) != 32 {
		t.Fatalf("created %+v", img)
	}
	if _, err := c.CreateImage(ctx, meta.Image{Name: "vm1", Size: 1 << 20, BlockSize: 1 << 20, Locations: []string{"n1"}}, placement.InSync); !errors.Is(err, meta.ErrImageExists) {
		t.Fatalf("duplicate create: %v", err)
	}
	got, idx, err := c.GetImage(ctx, "vm1")
	if err != nil || got.ID != img.ID || idx == 0 {
		t.Fatalf("get: %+v %v", got, err)
	}
	bm, err := c.BlockMap(ctx, img, "n2")
	if err != nil || bm.Len() != 3 || bm.Count(placement.InSync) != 3 {
		t.Fatalf("block map: %v %v", bm, err)
	}
	if ok, err := c.Tombstoned(ctx, img.ID); ok || err != nil {
		t.Fatalf("live image tombstoned: %v %v", ok, err)
	}
	if err := c.DeleteImage(ctx, img, 0); err != nil {
		t.Fatal(err)
	}
	if ok, err := c.Tombstoned(ctx, img.ID); !ok || err != nil {
		t.Fatalf("deleted image has no tombstone: %v %v", ok, err)
	}
	if _, _, err := c.GetImage(ctx, "vm1"); !errors.Is(err, meta.ErrImageNotFound) {
		t.Fatalf("after delete: %v", err)
	}
	if _, err := c.BlockMap(ctx, img, "n2"); err == nil {
		t.Fatal("block map of a deleted image still readable")
	}
	again, err := c.CreateImage(ctx, meta.Image{Name: "vm1", Size: 1 << 20, BlockSize: 1 << 20, Locations: []string{"n1"}}, placement.OutOfSync)
	if err != nil || again.ID == img.ID {
		t.Fatalf("recreate: %+v %v", again, err)
	}
}

func TestCatalogRejectsBadInput(t *testing.T) {
	ctx := context.Background()
	c := newCatalog(t)
	for _, img := range []meta.Image{
		{Name: "Bad_Name", Size: 1 << 20, BlockSize: 1 << 20, Locations: []string{"n1"}},
		{Name: "zero", Size: 0, BlockSize: 1 << 20, Locations: []string{"n1"}},
		{Name: "odd", Size: 1000, BlockSize: 1 << 20, Locations: []string{"n1"}},
		{Name: "bs", Size: 1 << 20, BlockSize: 3 << 20, Locations: []string{"n1"}},
		{Name: "small-bs", Size: 1 << 20, BlockSize: 32 << 10, Locations: []string{"n1"}},
		{Name: "noloc", Size: 1 << 20, BlockSize: 1 << 20},
		{Name: "mincopies", Size: 1 << 20, BlockSize: 1 << 20, Locations: []string{"n1"}, MinCopies: 2},
	} {
		if _, err := c.CreateImage(ctx, img, placement.InSync); err == nil {
			t.Errorf("%+v accepted", img)
		}
	}
}

func TestCatalogMalformedRecordReported(t *testing.T) {
	ctx := context.Background()
	c := newCatalog(t)
	if _, err := c.CreateImage(ctx, meta.Image{Name: "good", Size: 1 << 20, BlockSize: 1 << 20, Locations: []string{"n1"}}, placement.InSync); err != nil {
		t.Fatal(err)
	}
	for key, val := range map[string]string{
		"ukai/images/junk":   "{not json",
		"ukai/images/future": `{"version":99,"name":"future"}`,
	} {
		if err := c.KV().CAS(ctx, key, []byte(val), 0); err != nil {
			t.Fatal(err)
		}
	}
	imgs, _, bad, err := c.ListImages(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(imgs) != 1 || imgs[0].Name != "good" || len(bad) != 2 {
		t.Fatalf("list: %d good, %v bad", len(imgs), bad)
	}
	var me *meta.MalformedError
	if _, _, err := c.GetImage(ctx, "future"); !errors.As(err, &me) || me.Key != "ukai/images/future" {
		t.Fatalf("get of an unknown-version record: %v", err)
	}
	// The malformed value is left untouched.
	if e, _ := c.KV().Get(ctx, "ukai/images/junk"); string(e.Value) != "{not json" {
		t.Fatalf("malformed value rewritten to %q", e.Value)
	}
	// A corrupted block map chunk is reported with its key.
	img, _, _ := c.GetImage(ctx, "good")
	es, _, _ := c.KV().List(ctx, "ukai/blockmaps/"+img.ID+"/n1/")
	if err := c.KV().CAS(ctx, es[0].Key, []byte("garbage"), es[0].ModifyIndex); err != nil {
		t.Fatal(err)
	}
	if _, err := c.BlockMap(ctx, img, "n1"); !errors.As(err, &me) || me.Key != es[0].Key {
		t.Fatalf("corrupt chunk: %v", err)
	}
}
