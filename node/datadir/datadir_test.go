package datadir

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ukai-storage/ukai/cluster/meta"
)

func record(id string) meta.Image {
	return meta.Image{Version: meta.RecordVersion, ID: id, Name: "vm-" + id[:4], Size: 1 << 20, BlockSize: 1 << 20, Locations: []string{"n1"}, MinCopies: 1}
}

// No path is built from an id that is not 32 lowercase hex digits: a
// record, a request or a removal naming "../x" is refused and nothing
// outside the images dir is created, opened or removed.
func TestPathsFromIDsStayInDataDir(t *testing.T) {
	top := t.TempDir()
	d, err := Open(filepath.Join(top, "data", "images"))
	if err != nil {
		t.Fatal(err)
	}
	outside := filepath.Join(top, "outside")
	if err := os.MkdirAll(outside, 0o700); err != nil {
		t.Fatal(err)
	}
	victim := filepath.Join(outside, "victimvictimvictim.img")
	if err := os.WriteFile(victim, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	traversal := "../../outside/victimvictimvictim" // 32 bytes
	for _, id := range []string{traversal, strings.ToUpper(meta.NewImageID()), "", strings.Repeat("0", 31) + "/"} {
		img := meta.Image{ID: id, Name: "evil", Size: 1 << 20, BlockSize: 1 << 20, Locations: []string{"n1"}}
		for what, err := range map[string]error{
			"CacheRecord": d.CacheRecord(img),
			"Prepare":     d.Prepare(id, 1<<20),
			"Grow":        d.Grow(id, 2<<20),
			"Remove":      d.Remove(id),
		} {
			if !errors.Is(err, meta.ErrInvalid) {
				t.Errorf("%s with id %q: %v, want ErrInvalid", what, id, err)
			}
		}
		if _, err := d.Open(id, 0); !errors.Is(err, meta.ErrInvalid) {
			t.Errorf("Open with id %q: %v, want ErrInvalid", id, err)
		}
		if _, err := d.Create(id, 1<<20); !errors.Is(err, meta.ErrInvalid) {
			t.Errorf("Create with id %q: %v, want ErrInvalid", id, err)
		}
	}
	for _, dir := range []string{outside, d.Path()} {
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			if e.Name() != "victimvictimvictim.img" {
				t.Errorf("%s created in %s", e.Name(), dir)
			}
		}
	}
	if b, err := os.ReadFile(victim); err != nil || string(b) != "precious" {
		t.Errorf("victim changed: %q %v", b, err)
	}
}

func TestPrepareGrowRemove(t *testing.T) {
	d, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	id := meta.NewImageID()
	if _, err := d.Open(id, 0); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Open of a missing copy: %v, want ErrNotExist", err)
	}
	if err := d.Prepare(id, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := d.Prepare(id, 1<<20); err != nil {
		t.Fatalf("a retried Prepare: %v", err)
	}
	if err := d.Prepare(id, 2<<20); !errors.Is(err, meta.ErrConflict) {
		t.Fatalf("Prepare of another size over a copy: %v, want ErrConflict", err)
	}
	if err := d.Grow(id, 3<<20); err != nil {
		t.Fatal(err)
	}
	p, _ := d.ImagePath(id)
	if st, err := os.Stat(p); err != nil || st.Size() != 3<<20 {
		t.Fatalf("after Grow: %v %v", st, err)
	}
	if err := d.CacheRecord(record(id)); err != nil {
		t.Fatal(err)
	}
	if err := d.Remove(id); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(d.Path()); len(ents) != 0 {
		t.Fatalf("left after Remove: %v", ents)
	}
	if err := d.Remove(id); err != nil {
		t.Fatalf("Remove of files already gone: %v", err)
	}
}

// Cached records come back as written; unreadable, invalid or misplaced
// ones are reported and skipped.
func TestCachedRecords(t *testing.T) {
	d, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	good := record(meta.NewImageID())
	if err := d.CacheRecord(good); err != nil {
		t.Fatal(err)
	}
	// A record cached under another image's id (a file copied by hand).
	misplaced := record(meta.NewImageID())
	b, _ := os.ReadFile(filepath.Join(d.Path(), good.ID+".json"))
	os.WriteFile(filepath.Join(d.Path(), misplaced.ID+".json"), b, 0o600)
	os.WriteFile(filepath.Join(d.Path(), meta.NewImageID()+".json"), []byte("{not json"), 0o600)
	invalid := record(meta.NewImageID())
	invalid.BlockSize = 3
	bad := `{"version":1,"id":"` + invalid.ID + `","name":"x","size":1048576,"block_size":3,"locations":["n1"]}`
	os.WriteFile(filepath.Join(d.Path(), invalid.ID+".json"), []byte(bad), 0o600)

	imgs, errs := d.CachedRecords()
	if len(imgs) != 1 || imgs[0].ID != good.ID || imgs[0].Name != good.Name || imgs[0].Size != good.Size {
		t.Fatalf("cached records %+v, want only %+v", imgs, good)
	}
	if len(errs) != 3 {
		t.Fatalf("%d bad records reported, want 3: %v", len(errs), errs)
	}
	for _, e := range errs {
		if !strings.Contains(e.Error(), d.Path()) {
			t.Errorf("report %q does not name the file", e)
		}
	}
}
