package trash

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/node/datadir"
	"github.com/ukai-storage/ukai/placement"
)

// The deferral with an injected clock: nothing is purged before its time,
// nor by a node that held no copy; then the copy's node purges it and
// removes its file, and a node that was down removes its file later.
func TestSweepPurgesWhenTheTimeIsUp(t *testing.T) {
	ctx := context.Background()
	kv, err := meta.OpenBolt(filepath.Join(t.TempDir(), "meta.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kv.Close() })
	cat := meta.NewCatalog(kv, "ukai")
	img, err := cat.CreateImage(ctx, meta.Image{Name: "vm1", Size: 1 << 20, BlockSize: 1 << 20, Locations: []string{"n1", "n2"}}, placement.InSync)
	if err != nil {
		t.Fatal(err)
	}
	dirs := map[string]*datadir.Dir{}
	for _, n := range []string{"n1", "n2", "n3"} {
		d, err := datadir.Open(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		dirs[n] = d
	}
	for _, n := range []string{"n1", "n2"} {
		f, err := dirs[n].Create(img.ID, img.Size)
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
		// In the trash, a node keeps the data and drops the cached record.
		if err := dirs[n].Forget(img.ID); err != nil {
			t.Fatal(err)
		}
	}
	t0 := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	if _, err := cat.TrashImage(ctx, img, 0, t0, t0.Add(24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	now := t0
	sweeper := func(self string) *Sweeper {
		return New(Config{Catalog: cat, Dir: dirs[self], Self: self, Interval: time.Minute, Now: func() time.Time { return now }})
	}
	exists := func(n string) bool {
		p, _ := dirs[n].ImagePath(img.ID)
		_, err := os.Stat(p)
		return err == nil
	}
	now = t0.Add(23*time.Hour + 59*time.Minute)
	for _, n := range []string{"n1", "n2", "n3"} {
		if res, err := sweeper(n).Sweep(ctx); err != nil || len(res.Purged)+len(res.Removed) != 0 {
			t.Fatalf("%s before the deferral ended: %+v %v", n, res, err)
		}
	}
	if !exists("n1") || !exists("n2") {
		t.Fatal("a file went before the deferral ended")
	}
	now = t0.Add(24*time.Hour + time.Second)
	if res, err := sweeper("n3").Sweep(ctx); err != nil || len(res.Purged) != 0 {
		t.Fatalf("n3 (no copy) purged: %+v %v", res, err)
	}
	res, err := sweeper("n1").Sweep(ctx)
	if err != nil || len(res.Purged) != 1 || len(res.Removed) != 1 || exists("n1") {
		t.Fatalf("n1 after the deferral: %+v %v (file left: %v)", res, err, exists("n1"))
	}
	if !exists("n2") {
		t.Fatal("n1 removed n2's file")
	}
	// n2 was down meanwhile: its next sweep removes its file.
	if res, err := sweeper("n2").Sweep(ctx); err != nil || len(res.Purged) != 0 || len(res.Removed) != 1 || exists("n2") {
		t.Fatalf("n2 after the purge: %+v %v", res, err)
	}
	// A copy being prepared (no record yet, no tombstone) is left alone.
	other := meta.NewImageID()
	if err := dirs["n3"].Prepare(other, 1<<20); err != nil {
		t.Fatal(err)
	}
	if res, err := sweeper("n3").Sweep(ctx); err != nil || len(res.Removed) != 0 {
		t.Fatalf("a prepared copy was removed: %+v %v", res, err)
	}
}
