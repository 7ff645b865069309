package served

import (
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/ukai-storage/ukai/cluster/meta"
)

func image(name string) *Image {
	return New(meta.Image{Name: name, ID: meta.NewImageID()}, nil)
}

func TestSetKeepsNameAndIDTogether(t *testing.T) {
	set := NewSet()
	a, b := image("a"), image("b")
	set.Add(a)
	set.Add(b)
	if set.Get("a") != a || set.ByID(a.Record().ID) != a || set.Get("b") != b || set.ByID(b.Record().ID) != b {
		t.Fatal("an added image is not found by its name and id")
	}
	if got := set.Names(); !slices.Equal(got, []string{"a", "b"}) {
		t.Fatalf("names %v, want [a b]", got)
	}

	// Deleted and created again under the same name: the new image
	// replaces the old one under both keys.
	a2 := image("a")
	set.Add(a2)
	if set.Get("a") != a2 || set.ByID(a2.Record().ID) != a2 {
		t.Fatal("the image created again is not served under its name and id")
	}
	if set.ByID(a.Record().ID) != nil {
		t.Fatal("the replaced image is still found by its id: forwarded I/O would reach the old volume")
	}
	// Withdrawing the old one (a reconcile that ran late) leaves the new
	// one in place.
	set.Remove(a)
	if set.Get("a") != a2 || set.ByID(a2.Record().ID) != a2 || set.Len() != 2 {
		t.Fatal("removing a replaced image removed the image that replaced it")
	}
	set.Remove(a2)
	if set.Get("a") != nil || set.ByID(a2.Record().ID) != nil || set.Len() != 1 {
		t.Fatal("a removed image is still served")
	}

	// An id served again under another name (a record renamed, or a
	// corrupt one): one image per id, the newer one.
	b2 := New(meta.Image{Name: "b2", ID: b.Record().ID}, nil)
	set.Add(b2)
	if set.ByID(b.Record().ID) != b2 || set.Get("b") != nil || set.Get("b2") != b2 || set.Len() != 1 {
		t.Fatal("two images served under one id")
	}
	set.Remove(b2)
	set.Add(b)

	b.SetOwned(true)
	if got := set.List(true); len(got) != 1 || got[0] != b {
		t.Fatalf("owned images %v, want only b", got)
	}
	if got := set.TakeAll(); len(got) != 1 || set.Len() != 0 || set.ByID(b.Record().ID) != nil {
		t.Fatalf("TakeAll returned %d images and left %d", len(got), set.Len())
	}
}

func TestSnapshotsOnlyMoveTheRevisionForward(t *testing.T) {
	s := New(meta.Image{Name: "a", Rev: 10}, nil)
	s.SetSnapshots(meta.Image{Rev: 7, Snapshots: []meta.SnapshotRef{{Name: "s1"}}})
	if r := s.Record(); r.Rev != 10 || len(r.Snapshots) != 1 {
		t.Fatalf("after an older record's snapshots: rev %d, %d snapshots; want 10, 1", r.Rev, len(r.Snapshots))
	}
	rec := meta.Image{Rev: 11, Snapshots: []meta.SnapshotRef{{Name: "s2"}}}
	s.SetSnapshots(rec)
	rec.Snapshots[0].Name = "changed by the caller"
	if r := s.Record(); r.Snapshots[0].Name != "s2" {
		t.Fatal("the served record shares its snapshot list with the caller's")
	}
	s.SetSnapshots(meta.Image{Rev: 12})
	if r := s.Record(); r.Rev != 12 || len(r.Snapshots) != 0 {
		t.Fatalf("after a newer record's snapshots: rev %d, %d snapshots; want 12, 0", r.Rev, len(r.Snapshots))
	}
}

// TestNoIOLandsAfterARelease runs I/O against releases: once a release
// has cleared owned and seen no I/O in flight, no I/O may still run (it
// could land after the next owner's writes).
func TestNoIOLandsAfterARelease(t *testing.T) {
	s := image("a")
	const rounds = 2000
	var released atomic.Bool // the release has drained; nothing may run now
	var violations, ran atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if !s.BeginIO() {
					runtime.Gosched()
					continue
				}
				ran.Add(1)
				runtime.Gosched() // the I/O itself
				if released.Load() {
					violations.Add(1)
				}
				s.EndIO()
			}
		})
	}
	for range rounds {
		released.Store(false)
		s.SetOwned(true)
		runtime.Gosched()
		s.SetOwned(false)
		for s.InFlight() > 0 {
			runtime.Gosched()
		}
		released.Store(true)
		runtime.Gosched()
	}
	close(stop)
	wg.Wait()
	if v := violations.Load(); v > 0 {
		t.Fatalf("%d I/O ran after their release had drained (of %d)", v, ran.Load())
	}
	if ran.Load() == 0 {
		t.Fatal("no I/O ran: the test proved nothing")
	}
}
