package cow

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"testing"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/cluster/meta/kvtest"
	"github.com/ukai-storage/ukai/placement"
	"github.com/ukai-storage/ukai/target/scsi"
)

const bs = 64 << 10

// mem is an image held in memory.
type mem struct {
	mu     sync.Mutex
	rec    meta.Image
	data   []byte
	writes int // blocks written through WriteAt
}

func (m *mem) Record() meta.Image { m.mu.Lock(); defer m.mu.Unlock(); return m.rec }
func (m *mem) ReadAt(_ context.Context, p []byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(p, m.data[off:])
	return nil
}
func (m *mem) ReadHeld(ctx context.Context, p []byte, off int64) error { return m.ReadAt(ctx, p, off) }
func (m *mem) WriteAt(_ context.Context, p []byte, off int64, _ bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], p)
	m.writes++
	return nil
}
func (m *mem) Hole(b int64) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return scsi.AllZero(m.data[b*bs : (b+1)*bs])
}

// host serves the snapshot while served is set; ready says whether this
// node owns it.
type host struct {
	snap          *mem
	served, ready bool
	held          int
}

func (h *host) Snapshot(ref meta.SnapshotRef) Image {
	if !h.served || ref.ID != h.snap.rec.ID {
		return nil
	}
	return h.snap
}
func (h *host) Ready(Image) bool { return h.ready }
func (h *host) Hold(Image) func() {
	h.held++
	return func() { h.held-- }
}

// fixture: an origin of 4 blocks, block b filled with byte b+1 except
// block 3 (zeros), and a snapshot of it listed by the origin, in a real
// bolt catalog.
func fixture(t *testing.T) (*meta.Catalog, *mem, *mem, *host, *Maps) {
	t.Helper()
	ctx := context.Background()
	cat := kvtest.BoltCatalog(t)
	orec, err := cat.CreateImage(ctx, meta.Image{Name: "o", Size: 4 * bs, BlockSize: bs, Locations: []string{"n1"}}, placement.InSync)
	if err != nil {
		t.Fatal(err)
	}
	srec := meta.Image{ID: meta.NewImageID(), Name: "o-s1", Size: orec.Size, BlockSize: bs, Locations: orec.Locations,
		Origin: &meta.Origin{Name: orec.Name, ID: orec.ID}}
	if err := cat.CreateCowMap(ctx, srec); err != nil {
		t.Fatal(err)
	}
	if srec, err = cat.CreateImage(ctx, srec, placement.InSync); err != nil {
		t.Fatal(err)
	}
	if orec, err = cat.UpdateImage(ctx, "o", func(i *meta.Image) error {
		i.Snapshots = append(i.Snapshots, meta.SnapshotRef{Name: srec.Name, ID: srec.ID})
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	origin := &mem{rec: orec, data: make([]byte, 4*bs)}
	for b := range 3 {
		copy(origin.data[b*bs:(b+1)*bs], bytes.Repeat([]byte{byte(b + 1)}, bs))
	}
	snap := &mem{rec: srec, data: make([]byte, 4*bs)}
	h := &host{snap: snap, served: true, ready: true}
	return cat, origin, snap, h, New(cat, h)
}

func owned() error { return nil }

// write is an origin write as the volume runs it: preserve, then write.
func write(t *testing.T, m *Maps, origin *mem, b int64, v byte) {
	t.Helper()
	if err := m.Preserve(context.Background(), origin, []int64{b}); err != nil {
		t.Fatalf("preserve block %d: %v", b, err)
	}
	origin.WriteAt(context.Background(), bytes.Repeat([]byte{v}, bs), b*bs, true)
}

func readSnap(t *testing.T, m *Maps, origin, snap *mem) []byte {
	t.Helper()
	p := make([]byte, 4*bs)
	if err := m.Read(context.Background(), origin, snap, p, 0, owned); err != nil {
		t.Fatal(err)
	}
	return p
}

func want(blocks ...byte) []byte {
	var out []byte
	for _, v := range blocks {
		out = append(out, bytes.Repeat([]byte{v}, bs)...)
	}
	return out
}

func TestSnapshotKeepsTheImageAsTaken(t *testing.T) {
	ctx := context.Background()
	cat, origin, snap, h, m := fixture(t)
	if got := readSnap(t, m, origin, snap); !bytes.Equal(got, want(1, 2, 3, 0)) {
		t.Fatal("a fresh snapshot does not read as its origin")
	}
	write(t, m, origin, 1, 9)
	write(t, m, origin, 1, 8) // preserved once: the snapshot keeps 2
	write(t, m, origin, 3, 7) // zeros: preserved without a write
	if got := readSnap(t, m, origin, snap); !bytes.Equal(got, want(1, 2, 3, 0)) {
		t.Fatal("the snapshot changed with its origin")
	}
	if snap.writes != 1 {
		t.Fatalf("%d blocks written to the snapshot, want 1 (block 1 once; block 3 is zeros)", snap.writes)
	}
	if h.held != 0 {
		t.Fatalf("the snapshot is still held busy (%d)", h.held)
	}
	// The map is the catalog's: a new owner (Reset) reads the same.
	bm, err := cat.BlockMap(ctx, snap.rec, meta.CowNode)
	if err != nil {
		t.Fatal(err)
	}
	for b, st := range []placement.SyncState{placement.OutOfSync, placement.InSync, placement.OutOfSync, placement.InSync} {
		if bm.Get(int64(b)) != st {
			t.Fatalf("stored copy-on-write map, block %d: %v, want %v", b, bm.Get(int64(b)), st)
		}
	}
	m.Reset()
	if got := readSnap(t, m, origin, snap); !bytes.Equal(got, want(1, 2, 3, 0)) {
		t.Fatal("after Reset, the snapshot does not read as taken")
	}
}

func TestPreserveNotReady(t *testing.T) {
	for _, tc := range []struct {
		name          string
		served, ready bool
	}{{"not served here", false, true}, {"not owned here", true, false}} {
		t.Run(tc.name, func(t *testing.T) {
			_, origin, snap, h, m := fixture(t)
			h.served, h.ready = tc.served, tc.ready
			err := m.Preserve(context.Background(), origin, []int64{0})
			var se *scsi.SenseError
			if !errors.As(err, &se) || se.Key != scsi.SenseNotReady {
				t.Fatalf("preserve without the snapshot: %v, want NOT READY", err)
			}
			if snap.writes != 0 {
				t.Fatal("wrote the snapshot without owning it")
			}
			h.served, h.ready = true, true
			write(t, m, origin, 0, 9)
			if got := readSnap(t, m, origin, snap); !bytes.Equal(got, want(1, 2, 3, 0)) {
				t.Fatal("the retried write's block was not preserved")
			}
		})
	}
}

// A snapshot deleted meanwhile (unlisted by the origin's stored record)
// holds up no write.
func TestPreserveSkipsUnlistedSnapshot(t *testing.T) {
	ctx := context.Background()
	cat, origin, snap, h, m := fixture(t)
	h.served = false
	err := m.Unlisting(snap.rec.ID, func() (bool, error) {
		_, err := cat.UpdateImage(ctx, "o", func(i *meta.Image) error { i.Snapshots = nil; return nil })
		return true, err
	})
	if err != nil {
		t.Fatal(err)
	}
	// origin's in-memory record still lists it (not applied yet).
	if err := m.Preserve(ctx, origin, []int64{0}); err != nil {
		t.Fatalf("a write blocked by a deleted snapshot: %v", err)
	}
}

func TestReadChecksOwnership(t *testing.T) {
	_, origin, snap, _, m := fixture(t)
	lost := errors.New("not the owner")
	if err := m.Read(context.Background(), origin, snap, make([]byte, bs), 0, func() error { return lost }); !errors.Is(err, lost) {
		t.Fatalf("read through an origin no longer owned: %v", err)
	}
	origin.rec.Snapshots = nil
	if err := m.Read(context.Background(), origin, snap, make([]byte, bs), 0, owned); !errors.Is(err, ErrGone) {
		t.Fatalf("read of a snapshot the origin no longer lists: %v", err)
	}
	if err := m.Read(context.Background(), origin, snap, make([]byte, bs), 4*bs-1, owned); !errors.Is(err, meta.ErrInvalid) {
		t.Fatalf("read past the end: %v", err)
	}
}

func TestHole(t *testing.T) {
	_, origin, snap, _, m := fixture(t)
	ctx := context.Background()
	if m.Hole(ctx, origin, snap, 0) || !m.Hole(ctx, origin, snap, 3) {
		t.Fatal("shared blocks: the origin's data decides")
	}
	write(t, m, origin, 0, 0) // block 0 preserved (data), origin now zeros
	write(t, m, origin, 3, 5) // block 3 preserved (zeros), origin now data
	if m.Hole(ctx, origin, snap, 0) || !m.Hole(ctx, origin, snap, 3) {
		t.Fatal("preserved blocks: the snapshot's copy decides")
	}
}
