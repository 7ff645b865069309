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

func newCatalog(t *testing.T) *meta.Catalog {
	c, _ := newCatalogKV(t)
	return c
}

// newCatalogKV is newCatalog with its store, for tests that change keys
// by hand.
func newCatalogKV(t *testing.T) (*meta.Catalog, meta.KV) {
	kv, err := meta.OpenBolt(filepath.Join(t.TempDir(), "meta.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kv.Close() })
	return meta.NewCatalog(kv, "ukai"), kv
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

func TestPoliciesAndActivity(t *testing.T) {
	ctx := context.Background()
	c := newCatalog(t)
	img, err := c.CreateImage(ctx, meta.Image{Name: "p", Size: 8 << 20, BlockSize: 1 << 20, Locations: []string{"n1"}}, placement.InSync)
	if err != nil {
		t.Fatal(err)
	}
	if p, idx, err := c.ImagePolicy(ctx, "p"); err != nil || idx != 0 || p.Replicas != 0 {
		t.Fatalf("no policy yet: %+v %d %v", p, idx, err)
	}
	if _, err := c.UpdateImagePolicy(ctx, "p", func(p *placement.ImagePolicy) error { p.Replicas = 3; return nil }); err != nil {
		t.Fatal(err)
	}
	if p, _, err := c.ImagePolicy(ctx, "p"); err != nil || p.Replicas != 3 {
		t.Fatalf("policy: %+v %v", p, err)
	}
	pol := placement.SyncPolicy{Windows: []placement.Window{{Start: 22 * 60, End: 6 * 60}}, TZ: "Asia/Tokyo", MaxRate: 1 << 20}
	for _, s := range []meta.SyncScope{meta.DefaultScope(), meta.NodeScope("n1"), meta.ImageScope("p")} {
		if err := c.SetSyncPolicy(ctx, s, &pol); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.KV().CAS(ctx, "ukai/policies/sync/nodes/n9", []byte(`{"version":5}`), 0); err != nil {
		t.Fatal(err)
	}
	def, nodes, images, bad, err := c.SyncPolicies(ctx)
	if err != nil || def == nil || def.TZ != "Asia/Tokyo" || nodes["n1"].MaxRate != 1<<20 || images["p"].Windows[0].End != 360 || len(bad) != 1 {
		t.Fatalf("sync policies: %+v %+v %+v %v %v", def, nodes, images, bad, err)
	}
	if err := c.SetSyncPolicy(ctx, meta.NodeScope("n1"), nil); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := c.SyncPolicy(ctx, meta.NodeScope("n1")); ok {
		t.Fatal("cleared policy still there")
	}
	// The activity log is written only under the image's ownership lock.
	sess, err := c.KV().CreateSession(ctx, "ukai:n1", 30*time.Second, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetActivity(ctx, img, "n1", sess, []int64{1}); !errors.Is(err, meta.ErrNotOwner) {
		t.Fatalf("activity log without the ownership lock: %v, want %v", err, meta.ErrNotOwner)
	}
	if ok, err := c.AcquireOwnership(ctx, img.ID, "n1", sess); !ok || err != nil {
		t.Fatalf("acquire: %v %v", ok, err)
	}
	if err := c.SetActivity(ctx, img, "n1", sess, []int64{5, 2, 7}); err != nil {
		t.Fatal(err)
	}
	if bs, err := c.Activity(ctx, img); err != nil || len(bs) != 3 || bs[0] != 2 {
		t.Fatalf("activity: %v %v", bs, err)
	}
	// Deleting the image takes its policies and activity log along.
	if err := c.DeleteImage(ctx, img, 0); err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{"ukai/policies/images/p", "ukai/policies/sync/images/p", "ukai/activity/" + img.ID} {
		if _, err := c.KV().Get(ctx, key); !errors.Is(err, meta.ErrNotFound) {
			t.Errorf("%s survived the delete: %v", key, err)
		}
	}
}

// A record read before a location was removed names maps that are gone:
// LocationMaps reads the record again instead of calling them malformed,
// and still reports a map that is really missing.
func TestLocationMapsFollowARemovedLocation(t *testing.T) {
	ctx := context.Background()
	c, kv := newCatalogKV(t)
	if _, err := c.CreateImage(ctx, meta.Image{Name: "vm1", Size: 3 << 20, BlockSize: 1 << 20, Locations: []string{"n1", "n2", "n3"}}, placement.InSync); err != nil {
		t.Fatal(err)
	}
	stale, _, err := c.GetImage(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.RemoveLocation(ctx, "vm1", "n3"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.BlockMap(ctx, stale, "n3"); err == nil {
		t.Fatal("the removed location's map is still there: the test proves nothing")
	}
	img, maps, err := c.LocationMaps(ctx, stale)
	if err != nil {
		t.Fatalf("stale record: %v", err)
	}
	if len(img.Locations) != 2 || len(maps) != 2 || maps["n1"] == nil || maps["n2"] == nil || maps["n3"] != nil {
		t.Fatalf("stale record read as %v with maps of %v", img.Locations, maps)
	}
	// A chunk missing from a location the record still names is malformed.
	if err := kv.DeleteTree(ctx, "ukai/blockmaps/"+img.ID+"/n2/"); err != nil {
		t.Fatal(err)
	}
	var malformed *meta.MalformedError
	if _, _, err := c.LocationMaps(ctx, img); !errors.As(err, &malformed) {
		t.Fatalf("missing map of a current location: %v", err)
	}
}
