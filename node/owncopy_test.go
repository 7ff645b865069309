package node

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/cluster/meta/kvtest"
	"github.com/ukai-storage/ukai/cluster/peer"
	"github.com/ukai-storage/ukai/node/admit"
	"github.com/ukai-storage/ukai/node/datadir"
	"github.com/ukai-storage/ukai/node/reconcile"
	"github.com/ukai-storage/ukai/node/route"
	"github.com/ukai-storage/ukai/node/served"
	"github.com/ukai-storage/ukai/ownership"
	"github.com/ukai-storage/ukai/placement"
	"github.com/ukai-storage/ukai/target/lun"
	"github.com/ukai-storage/ukai/target/scsi"
)

// ownedCopy is node n1 owning image name (its only copy here) under a
// valid session, and the owner's view of its local copy.
func ownedCopy(t testing.TB, name string) (*Node, *served.Image, ownCopy, *lun.FileCopy) {
	t.Helper()
	const bs = 64 << 10
	kv, err := meta.OpenBolt(filepath.Join(t.TempDir(), "meta.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kv.Close() })
	cat := meta.NewCatalog(kv, "ukai/")
	img := kvtest.OwnedImage(t, cat, name, 4*bs, bs, "n1", "n1", "n2")
	sess := testSession(t, kv)
	n := &Node{cfg: Config{Node: NodeConfig{Name: "n1"}}, cat: cat, kv: kv, images: served.NewSet(), log: slog.New(slog.DiscardHandler), session: sess}
	n.pstore = admit.New(n.images, cat)
	if n.peerSrv, err = peer.NewServer(peer.ServerConfig{Listen: "127.0.0.1:0"}, n.pstore); err != nil {
		t.Fatal(err)
	}
	fc, err := lun.CreateFile(filepath.Join(t.TempDir(), name+".img"), 4*bs)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fc.Close() })
	s := n.newServed(img)
	s.Local = fc
	s.OwnedGen.Store(img.Generation)
	s.SetSession(sess.Current())
	s.SetOwned(true)
	return n, s, ownCopy{admit.SharedCopy{FileCopy: fc}, n, s, img.ID}, fc
}

// testSession is a running ownership session of n1 in kv.
func testSession(t testing.TB, kv meta.Locker) *ownership.Session {
	t.Helper()
	sess := ownership.NewSession(ownership.SessionConfig{Store: kv, Name: "ukai:n1", TTL: 5 * time.Second})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { sess.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	for sess.Current() == "" {
		time.Sleep(10 * time.Millisecond)
	}
	return sess
}

func fill(b byte) []byte { return bytes.Repeat([]byte{b}, 4096) }

func holds(t *testing.T, fc *lun.FileCopy, want byte) {
	t.Helper()
	got := make([]byte, 4096)
	if err := fc.ReadAt(context.Background(), got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, fill(want)) {
		t.Fatalf("the copy holds %d, want %d", got[0], want)
	}
}

// An owner's write is checked once, when it starts; it may then wait (a
// block lock, the activity log's record, a paused process) while the
// image changes hands. Chaos seed 111 saw such a write land on the
// deposed owner's own copy after the new owner had written the block
// there: a copy recorded in sync with older data, and a stale read. The
// local copy now checks again when the write lands: a newer owner's write
// seen on the copy, or the session lapsed, refuses it.
func TestDeposedOwnerCannotWriteItsCopy(t *testing.T) {
	ctx := context.Background()
	t.Run("newer-owner-wrote", func(t *testing.T) {
		n, s, oc, fc := ownedCopy(t, "vm1")
		if err := oc.WriteAt(ctx, fill(1), 0, false); err != nil {
			t.Fatalf("the owner's write: %v", err)
		}
		// The new owner's write reaches this copy through the peer server.
		leave, err := n.peerSrv.Admit(ctx, peer.Ref{ID: s.Record().ID, Gen: s.OwnedGen.Load() + 1, Epoch: 5})
		if err != nil {
			t.Fatal(err)
		}
		if err := fc.WriteAt(ctx, fill(2), 0, false); err != nil {
			t.Fatal(err)
		}
		leave()
		// The deposed owner's write that waited lands now.
		if err := oc.WriteAt(ctx, fill(3), 0, false); !errors.Is(err, peer.ErrStaleGeneration) {
			t.Fatalf("the deposed owner's write: %v, want %v", err, peer.ErrStaleGeneration)
		}
		if err := oc.Unmap(ctx, 0, 4096); !errors.Is(err, peer.ErrStaleGeneration) {
			t.Fatalf("the deposed owner's unmap: %v, want %v", err, peer.ErrStaleGeneration)
		}
		holds(t, fc, 2)
	})
	t.Run("session-lapsed", func(t *testing.T) {
		_, s, oc, fc := ownedCopy(t, "vm2")
		if err := oc.WriteAt(ctx, fill(1), 0, false); err != nil {
			t.Fatalf("the owner's write: %v", err)
		}
		// The session the image was taken with is gone (this process was
		// paused past its TTL, or the store ended it).
		s.SetSession("a-session-that-ended")
		if err := oc.WriteAt(ctx, fill(3), 0, false); !errors.Is(err, errDeposed) {
			t.Fatalf("a write under a lapsed session: %v, want %v", err, errDeposed)
		}
		holds(t, fc, 1)
		// Served offline (its only copy, the store unreachable), the
		// session does not bind it.
		s.Offline.Store(true)
		if err := oc.WriteAt(ctx, fill(4), 0, false); err != nil {
			t.Fatalf("an offline owner's write: %v", err)
		}
		holds(t, fc, 4)
	})
}

// A release waits for the I/O already past its ownership check: before,
// it flushed and freed the lock while such a write could still be on its
// way to the copies, to land after the next owner's.
func TestReleaseWaitsForIOInFlight(t *testing.T) {
	ctx := context.Background()
	n, s, oc, _ := ownedCopy(t, "vm1")
	img := s.Record()
	ok, err := n.cat.AcquireOwnership(ctx, img.ID, "n1", s.Session())
	if err != nil || !ok {
		t.Fatalf("acquire: %v %v", ok, err)
	}
	withVolume(t, n, s, oc)
	if !s.BeginIO() {
		t.Fatal("beginIO on an owned image")
	}
	released := make(chan struct{})
	go func() { n.release(ctx, s); close(released) }()
	for s.Owned() {
		time.Sleep(time.Millisecond)
	}
	if s.BeginIO() {
		t.Fatal("new I/O counted in while a release runs")
	}
	select {
	case <-released:
		t.Fatal("the release ended with an I/O in flight")
	case <-time.After(300 * time.Millisecond):
	}
	if ls, _, err := n.cat.OwnershipLock(ctx, img.ID); err != nil || ls != s.Session() {
		t.Fatalf("the lock was freed with an I/O in flight: holder %q, %v", ls, err)
	}
	s.EndIO()
	<-released
	if ls, _, err := n.cat.OwnershipLock(ctx, img.ID); err != nil || ls != "" {
		t.Fatalf("after the I/O ended the release kept the lock: holder %q, %v", ls, err)
	}
}

// BenchmarkLocalWrite4K: what the owner's checks at landing (session,
// gate) add to a 4 KiB write of its local copy, against the file alone
// in the same run (b.ReportMetric: ns per write of each, and the ratio).
func BenchmarkLocalWrite4K(b *testing.B) {
	ctx := context.Background()
	_, _, oc, fc := ownedCopy(b, "vm1")
	buf := fill(7)
	blocks := fc.Size() / 4096
	run := func(w func(off int64) error) float64 {
		start := time.Now()
		for i := range b.N {
			if err := w(int64(i) % blocks * 4096); err != nil {
				b.Fatal(err)
			}
		}
		return float64(time.Since(start).Nanoseconds()) / float64(b.N)
	}
	var file, own float64
	for range 3 { // interleaved: the machine's noise hits both
		file += run(func(off int64) error { return fc.WriteAt(ctx, buf, off, false) })
		own += run(func(off int64) error { return oc.WriteAt(ctx, buf, off, false) })
	}
	b.ReportMetric(file/3, "file-ns/write")
	b.ReportMetric(own/3, "owner-ns/write")
	b.ReportMetric(own/file, "ratio")
}

// withVolume gives s a volume whose only copy is the owner's local one.
func withVolume(t testing.TB, n *Node, s *served.Image, oc ownCopy) {
	t.Helper()
	img := s.Record()
	maps := map[string]*placement.BlockMap{"n1": placement.NewBlockMap(img.Blocks(), placement.InSync)}
	vol, err := lun.NewVolume(lun.Config{Size: img.Size, BlockSize: img.BlockSize, MinCopies: 1, CopyTimeout: time.Second},
		[]*lun.Replica{{Node: "n1", Copy: oc, Local: true}}, maps, &mapStore{n: n, s: s})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vol.Close() })
	s.Vol = vol
	s.Act = n.newActivity(s)
}

// A write its own copy refused because this node stopped owning the image
// meanwhile is NOT READY, which initiators retry, not the MEDIUM ERROR of
// a write that reached too few copies, which they do not (chaos seed 113:
// a session that lapsed between the take and the write).
func TestWriteAfterOwnershipLapsedIsNotReady(t *testing.T) {
	ctx := context.Background()
	n, s, oc, _ := ownedCopy(t, "vm1")
	withVolume(t, n, s, oc)
	b := ownedBackend{n: n, s: s}
	if err := b.WriteAt(ctx, fill(1), 0, false); err != nil {
		t.Fatalf("the owner's write: %v", err)
	}
	s.SetSession("a-session-that-ended")
	err := b.WriteAt(ctx, fill(2), 0, false)
	var se *scsi.SenseError
	if !errors.As(err, &se) || se.Key != scsi.SenseNotReady {
		t.Fatalf("a write after the session lapsed: %v, want NOT READY", err)
	}
}

// A release that cannot finish keeps the image only if nobody took it
// meanwhile: a record naming another owner (or generation) applied during
// the release is not undone.
func TestKeepOwnedAfterFailedRelease(t *testing.T) {
	n, s, _, _ := ownedCopy(t, "vm1")
	gen := s.OwnedGen.Load()
	for _, tc := range []struct {
		owner string
		gen   uint64
		want  bool
	}{
		{"n1", gen, true},
		{"n2", gen + 1, false},
		{"n1", gen + 1, false},
	} {
		img := s.Record()
		img.Owner, img.Generation = tc.owner, tc.gen
		s.SetRecord(img)
		s.SetOwned(false)
		n.keepOwned(s)
		if s.Owned() != tc.want {
			t.Errorf("record owner %s generation %d (took %d): owned %v, want %v", tc.owner, tc.gen, gen, s.Owned(), tc.want)
		}
	}
}

// TestRecordOfAnotherImageIsNotGrafted: an image deleted and created
// again under its name while served here. Taking ownership of the served
// one must not make this node the owner of the new one (its lock is the
// old id's), and its record must not be applied to the old volume.
func TestRecordOfAnotherImageIsNotGrafted(t *testing.T) {
	ctx := context.Background()
	n, s, _, _ := ownedCopy(t, "vm")
	old, idx, err := n.cat.GetImage(ctx, "vm")
	if err != nil {
		t.Fatal(err)
	}
	if err := n.cat.DeleteImage(ctx, old, idx); err != nil {
		t.Fatal(err)
	}
	kvtest.OwnedImage(t, n.cat, "vm", old.Size, old.BlockSize, "n2", "n2")
	s.SetOwned(false)
	if err := n.take(ctx, s, n.session.Current()); !errors.Is(err, meta.ErrImageNotFound) {
		t.Fatalf("take: %v, want ErrImageNotFound", err)
	}
	cur, _, err := n.cat.GetImage(ctx, "vm")
	if err != nil {
		t.Fatal(err)
	}
	if cur.Owner != "n2" || cur.Generation != 1 {
		t.Fatalf("the new image's record says owner %q generation %d: the take was grafted onto it", cur.Owner, cur.Generation)
	}
	if err := n.apply(ctx, s, cur, false); err == nil {
		t.Fatal("apply took another image's record")
	}
	if s.Record().ID != old.ID {
		t.Fatal("the served image now carries another image's record")
	}
}

// TestHandoverFinishesAfterTheCallerGivesUp: a release another node asked
// for (peer.Control.Release, from an attach) goes on when the caller's
// context ends while I/O still drains; before, it kept ownership, and the
// attaching node waited for a lock nobody freed (chaos seed 120: the
// caller's transport timeout was 2 s).
func TestHandoverFinishesAfterTheCallerGivesUp(t *testing.T) {
	ctx := context.Background()
	n, s, oc, _ := ownedCopy(t, "vm1")
	n.recon = reconcile.New(reconcile.Config{Catalog: n.cat, Self: "n1", Host: reconHost{n}, Log: n.log})
	img := s.Record()
	ok, err := n.cat.AcquireOwnership(ctx, img.ID, "n1", s.Session())
	if err != nil || !ok {
		t.Fatalf("acquire: %v %v", ok, err)
	}
	withVolume(t, n, s, oc)
	n.images.Add(s)
	if !s.BeginIO() {
		t.Fatal("beginIO on an owned image")
	}
	callerCtx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	released := make(chan error, 1)
	go func() { released <- n.Release(callerCtx, "vm1") }()
	<-callerCtx.Done()
	time.Sleep(100 * time.Millisecond) // the I/O outlives the caller's wait
	s.EndIO()
	<-released
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		ls, _, err := n.cat.OwnershipLock(ctx, img.ID)
		if err == nil && ls == "" && !s.Owned() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the release was abandoned with its caller: lock holder %q (%v), owned %v", ls, err, s.Owned())
		}
	}
}

// TestTakeNeverGoesBackAGeneration: the store answers with a record older
// than what this node has seen (a Consul restarted under it; chaos seed
// 121). The take raises the generation past everything the node saw,
// rather than serve with one its copies have moved past.
func TestTakeNeverGoesBackAGeneration(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name       string
		ownedGen   uint64 // the generation this node took the image with before
		copyFenced uint64 // the newest generation its copy's gate has seen
		want       uint64
	}{
		{"the record is current", 1, 0, 1},
		{"this node took it with a newer generation", 5, 0, 6},
		{"its copy has seen a newer generation", 1, 7, 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, s, oc, _ := ownedCopy(t, "vm1")
			canTake(t, n, s, oc)
			var err error
			ok, err := n.cat.AcquireOwnership(ctx, s.Record().ID, "n1", s.Session())
			if err != nil || !ok {
				t.Fatalf("acquire: %v %v", ok, err)
			}
			if tc.copyFenced > 0 {
				if err := n.peerSrv.Fence(ctx, peer.Ref{ID: s.Record().ID, Gen: tc.copyFenced}); err != nil {
					t.Fatal(err)
				}
			}
			s.OwnedGen.Store(tc.ownedGen)
			s.SetOwned(false)
			if err := n.take(ctx, s, s.Session()); err != nil {
				t.Fatal(err)
			}
			cur, _, err := n.cat.GetImage(ctx, "vm1")
			if err != nil {
				t.Fatal(err)
			}
			if cur.Generation != tc.want || s.OwnedGen.Load() != tc.want || cur.Owner != "n1" {
				t.Fatalf("after the take: record generation %d owner %q, taken with %d; want %d, n1", cur.Generation, cur.Owner, s.OwnedGen.Load(), tc.want)
			}
			if err := oc.WriteAt(ctx, make([]byte, 4096), 0, false); err != nil {
				t.Fatalf("the owner's write to its own copy after the take: %v", err)
			}
		})
	}
}

// TestVerifyWaitsForItsOwnOldSessionsLock: the image's lock is held by
// this node's previous session (Consul restarted and the node made a new
// one). `image verify` breaks that session and waits out its lock delay;
// before, it answered "image is served by node n1", this very node
// (chaos seed 121).
func TestVerifyWaitsForItsOwnOldSessionsLock(t *testing.T) {
	ctx := context.Background()
	n, s, oc, _ := ownedCopy(t, "vm1")
	canTake(t, n, s, oc)
	var err error
	n.images.Add(s)
	old, err := n.kv.CreateSession(ctx, "ukai:n1", 5*time.Second, 500*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := n.cat.AcquireOwnership(ctx, s.Record().ID, "n1", old); err != nil || !ok {
		t.Fatalf("acquire with the old session: %v %v", ok, err)
	}
	s.SetOwned(false)
	res, err := n.VerifyImage(ctx, "vm1")
	if err != nil {
		t.Fatalf("verify: %v", err)
	}
	if res.Blocks == 0 || !s.Owned() {
		t.Fatalf("verify compared %d blocks, owned %v", res.Blocks, s.Owned())
	}
}

// TestPinHoldBookkeeping: an image attached to another node (n2, alive:
// this node runs without gossip). The free lock is left to n2 for the
// hold, then taken; the hold starts afresh at the next handover, and it
// does not run while this node's own release is still draining.
func TestPinHoldBookkeeping(t *testing.T) {
	ctx := context.Background()
	n, s, oc, _ := ownedCopy(t, "vm1")
	canTake(t, n, s, oc)
	var err error
	img, err := n.cat.UpdateImage(ctx, "vm1", func(i *meta.Image) error { i.Attached = "n2"; return nil })
	if err != nil {
		t.Fatal(err)
	}
	s.SetRecord(img)
	s.SetOwned(false)
	yields := func() bool {
		t.Helper()
		err := n.acquire(ctx, s)
		var no *route.NotOwnerError
		if errors.As(err, &no) && no.Owner == "n2" {
			return true
		}
		if err != nil {
			t.Fatalf("acquire: %v", err)
		}
		return false
	}
	if !yields() {
		t.Fatal("a free lock of an image attached to n2 was taken at once")
	}
	s.PinSince = s.PinSince.Add(-ownership.PinHold) // the hold ran out
	if yields() {
		t.Fatal("the lock was still left to n2 after the hold")
	}
	if !s.PinSince.IsZero() {
		t.Fatal("the hold's start outlived the take: the next handover would be taken back at once")
	}
	// A handover: this node's release has cleared owned but still holds
	// the lock; its I/O yields, however long the release takes.
	s.SetOwned(false)
	s.Releasing.Store(true)
	s.PinSince, s.PinTo = time.Now().Add(-time.Minute), "n2"
	if !yields() {
		t.Fatal("this node's I/O took the image back while its own release ran")
	}
}

// canTake gives the node what a take needs beyond ownedCopy: the
// reconciler, a data dir for cached records, and s a volume.
func canTake(t testing.TB, n *Node, s *served.Image, oc ownCopy) {
	t.Helper()
	n.recon = reconcile.New(reconcile.Config{Catalog: n.cat, Self: "n1", Host: reconHost{n}, Log: n.log})
	dir, err := datadir.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	n.dir = dir
	withVolume(t, n, s, oc)
}
