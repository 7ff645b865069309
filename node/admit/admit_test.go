package admit

import (
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/cluster/meta/kvtest"
	"github.com/ukai-storage/ukai/cluster/peer"
	"github.com/ukai-storage/ukai/node/served"
	"github.com/ukai-storage/ukai/target/lun"
)

const bs = 64 << 10

// setup serves image vm, owned by n1 at generation 1, with a local copy
// on this node (n3), from a real bolt catalog.
func setup(t *testing.T) (*Store, *meta.Catalog, *served.Image) {
	t.Helper()
	cat := kvtest.BoltCatalog(t)
	img := kvtest.OwnedImage(t, cat, "vm", 4*bs, bs, "n1", "n1", "n3")
	fc, err := lun.CreateFile(filepath.Join(t.TempDir(), "vm.img"), 4*bs)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fc.Close() })
	s := served.New(img, nil)
	s.Local = fc
	set := served.NewSet()
	set.Add(s)
	return New(set, cat), cat, s
}

// takeOver records node as the new owner in the catalog only (this
// node's watch has not brought the record yet).
func takeOver(t *testing.T, cat *meta.Catalog, node string) meta.Image {
	t.Helper()
	img, err := cat.UpdateImage(context.Background(), "vm", func(i *meta.Image) error {
		i.Owner = node
		i.Generation++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func open(p *Store, id string, gen uint64, node string, a peer.Access) error {
	l, err := p.Open(context.Background(), peer.Ref{ID: id, Gen: gen}, peer.Caller{Node: node, Addr: "127.0.0.1:1"}, a)
	if err == nil && l.Copy == nil {
		return errors.New("admitted without a copy")
	}
	return err
}

func TestAdmission(t *testing.T) {
	p, _, s := setup(t)
	id := s.Record().ID
	for _, tc := range []struct {
		name   string
		id     string
		gen    uint64
		caller string
		access peer.Access
		want   error // nil: admitted
	}{
		{"the owner writes with the record's generation", id, 1, "n1", peer.AccessWrite, nil},
		{"a read with the record's generation", id, 1, "n2", peer.AccessRead, nil},
		{"a caller without a certificate name writes with the record's generation", id, 1, "", peer.AccessWrite, nil},
		{"a read with an older generation", id, 0, "n1", peer.AccessRead, peer.ErrStaleGeneration},
		{"another node writes with the record's generation", id, 1, "n2", peer.AccessWrite, peer.ErrForbidden},
		{"a made-up newer generation", id, 9, "n1", peer.AccessWrite, peer.ErrForbidden},
		{"an image this node holds no copy of", meta.NewImageID(), 1, "n1", peer.AccessRead, peer.ErrNoCopy},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := open(p, tc.id, tc.gen, tc.caller, tc.access)
			if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("err %v, want %v", err, tc.want)
			}
		})
	}
	// None of the refusals raised the floor: the owner still writes.
	if f := p.Floor(id); f != 1 {
		t.Fatalf("floor %d after the refusals, want 1", f)
	}
	if err := open(p, id, 1, "n1", peer.AccessWrite); err != nil {
		t.Fatalf("the real owner was fenced off by refused requests: %v", err)
	}
}

// TestNewOwnerBeforeItsRecordArrives: a new owner's writes reach the copy
// before this node's watch brings the record; the catalog says so, and
// from then on the former owner is refused.
func TestNewOwnerBeforeItsRecordArrives(t *testing.T) {
	p, cat, s := setup(t)
	id := s.Record().ID
	rec := takeOver(t, cat, "n2") // generation 2, owner n2
	if err := open(p, id, rec.Generation, "n2", peer.AccessWrite); err != nil {
		t.Fatalf("the new owner's write: %v", err)
	}
	if err := open(p, id, 1, "n1", peer.AccessWrite); !errors.Is(err, peer.ErrStaleGeneration) {
		t.Fatalf("the former owner's write after the new owner's: %v, want ErrStaleGeneration", err)
	}
	if err := open(p, id, 1, "n1", peer.AccessRead); !errors.Is(err, peer.ErrStaleGeneration) {
		t.Fatalf("the former owner's read after the new owner's write: %v, want ErrStaleGeneration", err)
	}
	if f := p.Floor(id); f != rec.Generation {
		t.Fatalf("floor %d, want %d", f, rec.Generation)
	}
	// The former owner cannot claim the new generation either: the
	// catalog names n2.
	if err := open(p, id, rec.Generation, "n1", peer.AccessWrite); !errors.Is(err, peer.ErrForbidden) {
		t.Fatalf("the former owner with the new generation: %v, want ErrForbidden", err)
	}
}

func TestCatalogThatCannotSay(t *testing.T) {
	p, cat, s := setup(t)
	id := s.Record().ID
	// The image was deleted and created again under its name: the
	// catalog's record is another image's.
	old, idx, err := cat.GetImage(context.Background(), "vm")
	if err != nil {
		t.Fatal(err)
	}
	if err := cat.DeleteImage(context.Background(), old, idx); err != nil {
		t.Fatal(err)
	}
	kvtest.OwnedImage(t, cat, "vm", 4*bs, bs, "n2", "n2")
	if err := open(p, id, 2, "n2", peer.AccessWrite); !errors.Is(err, peer.ErrForbidden) {
		t.Fatalf("a newer generation the catalog cannot confirm: %v, want ErrForbidden", err)
	}
	if f := p.Floor(id); f != 0 {
		t.Fatalf("floor %d after a refused write, want 0", f)
	}
}
