package integration

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/api"
)

// imageFiles counts the data files on node n.
func imageFiles(n *node) int {
	f, _ := filepath.Glob(filepath.Join(n.dir, "data", "images", "*.img"))
	return len(f)
}

type trashEntry struct {
	ID         string    `json:"id"`
	Name       string    `json:"name"`
	Deleted    time.Time `json:"deleted"`
	PurgeAfter time.Time `json:"purge_after"`
}

func imageSyncPolicy(t *testing.T, n *node, image string) (api.SyncPolicy, bool) {
	t.Helper()
	var p api.SyncPolicies
	if err := json.Unmarshal([]byte(n.mustCLI("policy", "show", "-o", "json")), &p); err != nil {
		t.Fatal(err)
	}
	sp, ok := p.Images[image]
	return sp, ok
}

func trashList(t *testing.T, n *node) []trashEntry {
	t.Helper()
	var l []trashEntry
	if err := json.Unmarshal([]byte(n.mustCLI("trash", "list", "-o", "json")), &l); err != nil {
		t.Fatal(err)
	}
	return l
}

// TestTrash: `image delete` moves an image to the trash: it stops being
// served, its data stays on every copy, its name is free for a new image;
// `trash restore` brings it back (under another name when its own is
// taken) with its data and access grants; `trash purge` removes the data
// on every node; a node's trash.defer purges by itself.
func TestTrash(t *testing.T) {
	c := newClusterWith(t, "trash:\n  sweep: 1s\n", "n1", "n2")
	n1, n2 := c.nodes[0], c.nodes[1]
	n1.mustCLI("image", "create", "vm1", "--size", "4M", "--block-size", "1M", "--locations", "n1,n2")
	qemuIO(t, n1.url("vm1"), "write -P 0x71 0 4M", "flush")
	n1.mustCLI("policy", "set", "--image", "vm1", "--max-rate", "20M")
	if out := n2.mustCLI("image", "delete", "vm1"); !strings.Contains(out, "moved image vm1 to the trash") {
		t.Fatalf("delete: %s", out)
	}
	if _, errOut, err := n1.cli("image", "info", "vm1"); err == nil || !strings.Contains(errOut, "not found") {
		t.Fatalf("info of a trashed image: %v %s", err, errOut)
	}
	waitFor(t, 10*time.Second, "both nodes to stop serving vm1", func() bool {
		_, e1 := run(t, 20*time.Second, "iscsi-inq", n1.url("vm1"))
		_, e2 := run(t, 20*time.Second, "iscsi-inq", n2.url("vm1"))
		return e1 != nil && e2 != nil
	})
	l := trashList(t, n1)
	if len(l) != 1 || l[0].Name != "vm1" {
		t.Fatalf("trash list: %+v", l)
	}
	if d := l[0].PurgeAfter.Sub(l[0].Deleted); d != 24*time.Hour {
		t.Fatalf("deferral %v, want the default 24h", d)
	}
	old := l[0].ID
	if imageFiles(n1) != 1 || imageFiles(n2) != 1 {
		t.Fatalf("data files while in the trash: n1 %d, n2 %d", imageFiles(n1), imageFiles(n2))
	}
	// The name is free: a new vm1, without the old one's policy.
	n1.mustCLI("image", "create", "vm1", "--size", "2M", "--block-size", "1M")
	qemuIO(t, n1.url("vm1"), "write -P 0x72 0 2M", "flush")
	if p, ok := imageSyncPolicy(t, n1, "vm1"); ok {
		t.Fatalf("the new vm1 inherited the old one's policy: %+v", p)
	}
	if _, errOut, err := n1.cli("trash", "restore", "vm1"); err == nil || !strings.Contains(errOut, "taken") {
		t.Fatalf("restore onto a taken name: %v %s", err, errOut)
	}
	// The nodes keep the data, not the cached record a restart would
	// export from (the old vm1 beside the new one).
	for _, n := range c.nodes {
		if _, err := os.Stat(filepath.Join(n.dir, "data", "images", old+".json")); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("%s kept the cached record of the trashed image: %v", n.name, err)
		}
	}
	n2.stop()
	n2.start()
	if out := n2.mustCLI("trash", "restore", "vm1", "--name", "vm1-old"); !strings.Contains(out, "restored image vm1-old") {
		t.Fatalf("restore: %s", out)
	}
	qemuIO(t, n2.url("vm1-old"), "read -P 0x71 0 4M")
	qemuIO(t, n1.url("vm1"), "read -P 0x72 0 2M")
	if p, ok := imageSyncPolicy(t, n1, "vm1-old"); !ok || p.MaxRate != 20<<20 {
		t.Fatalf("the restored image lost its policy: %+v", p)
	}
	if l := locations(t, n1, "vm1-old"); len(l) != 2 || l["n1"] != 0 || l["n2"] != 0 {
		t.Fatalf("copies of the restored image: %v", l)
	}
	if out := n1.mustCLI("image", "verify", "vm1-old"); !strings.Contains(out, "0 differ") {
		t.Fatalf("verify after restore: %s", out)
	}
	// Trash it again and purge it: the data goes on both nodes.
	n1.mustCLI("image", "delete", "vm1-old")
	if len(trashList(t, n1)) != 1 {
		t.Fatal("not in the trash")
	}
	n1.mustCLI("trash", "purge", old)
	waitFor(t, 20*time.Second, "the purged image's files to go", func() bool {
		return imageFiles(n1) == 1 && imageFiles(n2) == 0
	})
	if _, errOut, err := n1.cli("trash", "restore", old); err == nil || !strings.Contains(errOut, "not in the trash") {
		t.Fatalf("restore after purge: %v %s", err, errOut)
	}
	if _, errOut, err := n1.cli("trash", "purge"); err == nil || !strings.Contains(errOut, "--all") {
		t.Fatalf("purge without arguments: %v %s", err, errOut)
	}
	// --now skips the trash.
	n1.mustCLI("image", "delete", "vm1", "--now")
	waitFor(t, 10*time.Second, "vm1's file to go", func() bool { return imageFiles(n1) == 0 })
	if len(trashList(t, n1)) != 0 {
		t.Fatal("--now left an entry in the trash")
	}
}

// TestTrashDeferral: with trash.defer 2s, a deleted image is purged by
// itself, its data removed.
func TestTrashDeferral(t *testing.T) {
	c := newClusterWith(t, "trash:\n  defer: 2s\n  sweep: 500ms\n", "n1")
	n1 := c.nodes[0]
	n1.mustCLI("image", "create", "tmp", "--size", "1M", "--block-size", "1M")
	n1.mustCLI("image", "delete", "tmp")
	if l := trashList(t, n1); len(l) != 1 || l[0].PurgeAfter.Sub(l[0].Deleted) != 2*time.Second {
		t.Fatalf("trash list: %+v", l)
	}
	waitFor(t, 20*time.Second, "the deferral to purge tmp", func() bool {
		return imageFiles(n1) == 0 && len(trashList(t, n1)) == 0
	})
}
