package meta_test

import (
	"context"
	"testing"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/placement"
)

// Every change of a record rings the doorbells of the nodes it names
// before and after the change, and only theirs.
func TestDoorbellsRingForTheNodesConcerned(t *testing.T) {
	ctx := context.Background()
	cat := newCatalog(t)
	bells := func(node string) map[string]uint64 {
		t.Helper()
		b, _, err := cat.Doorbells(ctx, node)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	img, err := cat.CreateImage(ctx, meta.Image{Name: "vm1", Size: 1 << 20, BlockSize: 64 << 10, Locations: []string{"n1", "n2"}, Generation: 1}, placement.InSync)
	if err != nil {
		t.Fatal(err)
	}
	n1, n2, n3 := bells("n1")["vm1"], bells("n2")["vm1"], bells("n3")["vm1"]
	if n1 == 0 || n2 == 0 || n3 != 0 {
		t.Fatalf("after create: bells n1 %d n2 %d n3 %d, want n1 and n2 only", n1, n2, n3)
	}
	// Taking ownership on n3 (a node without a copy) rings n1, n2 and n3.
	if _, err := cat.UpdateImage(ctx, "vm1", func(i *meta.Image) error { i.Owner = "n3"; i.Generation++; return nil }); err != nil {
		t.Fatal(err)
	}
	if b := bells("n3")["vm1"]; b == 0 || bells("n1")["vm1"] <= n1 || bells("n2")["vm1"] <= n2 {
		t.Fatalf("owner change: bells n1 %d→%d n2 %d→%d n3 %d", n1, bells("n1")["vm1"], n2, bells("n2")["vm1"], b)
	}
	// Removing n1's copy rings n1 (it must let go of its file) too.
	n1 = bells("n1")["vm1"]
	if _, err := cat.RemoveLocation(ctx, "vm1", "n1"); err != nil {
		t.Fatal(err)
	}
	if bells("n1")["vm1"] <= n1 {
		t.Fatal("removing n1's copy did not ring n1's doorbell")
	}
	// A node the record never named hears nothing.
	if b := bells("n4"); len(b) != 0 {
		t.Fatalf("n4's doorbells: %v", b)
	}
	// Deleting rings the nodes of the last record.
	img, _, _ = cat.GetImage(ctx, "vm1")
	n2 = bells("n2")["vm1"]
	if err := cat.DeleteImage(ctx, img, 0); err != nil {
		t.Fatal(err)
	}
	if bells("n2")["vm1"] <= n2 {
		t.Fatal("deleting the image did not ring n2's doorbell")
	}
	// A node done with a bell removes it, unless it rang again.
	b := bells("n2")["vm1"]
	if err := cat.ForgetDoorbell(ctx, "n2", "vm1", b-1); err != nil {
		t.Fatal(err)
	}
	if bells("n2")["vm1"] != b {
		t.Fatal("a bell that rang after the index given was forgotten")
	}
	if err := cat.ForgetDoorbell(ctx, "n2", "vm1", b); err != nil || len(bells("n2")) != 0 {
		t.Fatalf("forget: %v, bells %v", err, bells("n2"))
	}
}
