package node

import (
	"context"
	"errors"
	"testing"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/cluster/meta/kvtest"
	"github.com/ukai-storage/ukai/node/served"
	"github.com/ukai-storage/ukai/placement"
	"github.com/ukai-storage/ukai/target/scsi"
)

// TestFormerOwnerRecordsNothing: once another node took the image (a new
// generation in the record), this node's volume can record no block state
// at all. Found by chaos runs: a former owner, paused past its lease,
// marked out of sync the copies that refused its stale generation (seed
// 101: every copy of a block out of sync, nothing to sync from), and a
// former owner's sync declared in sync a copy the new owner was leaving
// out (seed 11). The records must fail (the write is then not
// acknowledged) and the maps stay as the new owner read them.
func TestFormerOwnerRecordsNothing(t *testing.T) {
	ctx := context.Background()
	cat := testCatalog(t)
	img := kvtest.OwnedImage(t, cat, "vm1", 4<<20, 1<<20, "n1", "n1", "n2")
	n := &Node{cfg: Config{Node: NodeConfig{Name: "n1"}}, cat: cat, images: served.NewSet()}
	s := n.newServed(img)
	s.SetOwned(true)
	s.OwnedGen.Store(1)
	m := &mapStore{n: n, s: s}

	// The owner of the day records.
	if err := m.SetBlockStates(ctx, "n2", []int64{1}, placement.OutOfSync); err != nil {
		t.Fatalf("the owner's out-of-sync record: %v", err)
	}
	// n2 takes over (n1 paused past its lease, say).
	if _, err := cat.UpdateImage(ctx, "vm1", func(i *meta.Image) error { i.Owner = "n2"; i.Generation++; return nil }); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		node  string
		block int64
		st    placement.SyncState
		want  placement.SyncState
	}{
		{"n2", 2, placement.OutOfSync, placement.InSync}, // a copy that refused n1's stale generation
		{"n2", 1, placement.InSync, placement.OutOfSync}, // n1's sync, finishing late
	} {
		err := m.SetBlockStates(ctx, tc.node, []int64{tc.block}, tc.st)
		var se *scsi.SenseError
		if !errors.As(err, &se) || se.ASC != 0x04 || se.ASCQ != 0x0a {
			t.Errorf("former owner records %v for %s block %d: %v, want NOT READY 04/0a (not the owner)", tc.st, tc.node, tc.block, err)
		}
		bm, err := cat.BlockMap(ctx, img, tc.node)
		if err != nil {
			t.Fatal(err)
		}
		if got := bm.Get(tc.block); got != tc.want {
			t.Errorf("%s block %d is %v after the former owner's refused record, want %v", tc.node, tc.block, got, tc.want)
		}
	}
}

// testCatalog is a catalog over an embedded store in a temporary dir.
func testCatalog(t *testing.T) *meta.Catalog { return kvtest.BoltCatalog(t) }
