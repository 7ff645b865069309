package node

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/node/datadir"
)

// No path is built from an id that is not 32 lowercase hex digits: a
// record, a request or a removal naming "../x" is refused and nothing
// outside the images dir is created or removed.
func TestPathsFromIDsStayInDataDir(t *testing.T) {
	top := t.TempDir()
	dir, err := datadir.Open(filepath.Join(top, "data", "images"))
	if err != nil {
		t.Fatal(err)
	}
	n := &Node{dir: dir}
	outside := filepath.Join(top, "outside")
	if err := os.MkdirAll(outside, 0o700); err != nil {
		t.Fatal(err)
	}
	victim := filepath.Join(outside, "victimvictimvictim.img")
	if err := os.WriteFile(victim, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	traversal := "../../outside/victimvictimvictim" // 32 bytes
	ctx := context.Background()
	for _, id := range []string{traversal, strings.ToUpper(meta.NewImageID()), "", strings.Repeat("0", 31) + "/"} {
		img := meta.Image{ID: id, Name: "evil", Size: 1 << 20, BlockSize: 1 << 20, Locations: []string{"n1"}}
		if err := n.dir.CacheRecord(img); !errors.Is(err, meta.ErrInvalid) {
			t.Errorf("CacheRecord with id %q: %v, want ErrInvalid", id, err)
		}
		if err := n.PrepareCopy(ctx, id, 1<<20); !errors.Is(err, meta.ErrInvalid) {
			t.Errorf("PrepareCopy with id %q: %v, want ErrInvalid", id, err)
		}
		if err := n.GrowCopy(ctx, id, 2<<20); !errors.Is(err, meta.ErrInvalid) {
			t.Errorf("GrowCopy with id %q: %v, want ErrInvalid", id, err)
		}
		if err := n.removeCopy(id); !errors.Is(err, meta.ErrInvalid) {
			t.Errorf("removeCopy with id %q: %v, want ErrInvalid", id, err)
		}
	}
	for _, dir := range []string{outside, n.dir.Path()} {
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
	// A valid id works.
	id := meta.NewImageID()
	if err := n.PrepareCopy(ctx, id, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := n.removeCopy(id); err != nil {
		t.Fatal(err)
	}
}
