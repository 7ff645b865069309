package integration

import (
	"bytes"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// snapshots returns `ukai snapshot list IMAGE -o json` decoded.
func snapshots(t *testing.T, n *node, image string) []map[string]any {
	t.Helper()
	var l []map[string]any
	if err := json.Unmarshal([]byte(n.mustCLI("snapshot", "list", image, "-o", "json")), &l); err != nil {
		t.Fatal(err)
	}
	return l
}

// TestSnapshotsClonesAndGrowth: a snapshot taken while the image is in
// use keeps the data of that moment while the image changes (through its
// owner and through a forwarding node), survives the death of the owner,
// and images created from it or cloned from the image hold exactly the
// data of their moment; an image grows online.
func TestSnapshotsClonesAndGrowth(t *testing.T) {
	c := newCluster(t, "n1", "n2", "n3")
	n1, n2, n3 := c.nodes[0], c.nodes[1], c.nodes[2]
	n1.mustCLI("image", "create", "vol", "--size", "32M", "--block-size", "1M", "--locations", "n1,n2")
	qemuIO(t, n1.url("vol"), "write -P 0xa1 0 16M", "write -P 0xa2 16M 16M", "flush")

	// Taken while a verified load runs on the image through n2.
	wait, out := fioVerifiedLoad(t, n2.url("vol"), "8m")
	sn := n3.mustCLI("snapshot", "create", "vol", "snap1", "-o", "json")
	if err := wait(); err != nil {
		t.Fatalf("the load saw an error while the snapshot was taken: %v\n%s", err, out)
	}
	var snap map[string]any
	if err := json.Unmarshal([]byte(sn), &snap); err != nil || snap["image"] != "vol" {
		t.Fatalf("snapshot create answered %q (%v)", sn, err)
	}
	t.Logf("writes paused %v µs while the snapshot was taken", snap["io_paused_us"])
	// Whatever fio wrote before the snapshot is in it; what matters here
	// is the part fio never touches (8M..32M), and what changes after.
	qemuIO(t, n2.url("vol"), "write -P 0xb1 12M 8M", "flush") // forwarded to the owner
	qemuIO(t, n1.url("vol"), "write -P 0xb2 28M 4M", "flush")
	l := snapshots(t, n3, "vol")
	if len(l) != 1 || l[0]["preserved_blocks"].(float64) < 12 {
		t.Fatalf("snapshot list after 12 blocks changed: %v", l)
	}
	// The image with snapshots cannot be deleted.
	if _, errOut, err := n1.cli("image", "delete", "vol"); err == nil || !strings.Contains(errOut, "snapshots") {
		t.Fatalf("deleting an image with snapshots: err %v, %s", err, errOut)
	}

	// Create from the snapshot, on n3 (no copy of vol there).
	n2.mustCLI("image", "clone", "vol@snap1", "fromsnap", "--locations", "n3")
	qemuIO(t, n3.url("fromsnap"), "read -P 0xa1 8M 8M", "read -P 0xa2 16M 16M")
	// The snapshot's download matches.
	dl := filepath.Join(t.TempDir(), "snap1.raw")
	n3.mustCLI("image", "download", "vol@snap1", dl)
	data, err := os.ReadFile(dl)
	if err != nil || len(data) != 32<<20 {
		t.Fatalf("download: %d bytes, %v", len(data), err)
	}
	if !bytes.Equal(data[16<<20:], bytes.Repeat([]byte{0xa2}, 16<<20)) || !bytes.Equal(data[8<<20:16<<20], bytes.Repeat([]byte{0xa1}, 8<<20)) {
		t.Fatal("the snapshot's data is not what the image held when it was taken")
	}

	// A clone of the live image holds its data now; writes to the clone
	// stay there.
	// Not a terminal: plain progress lines on stderr, the first at 0.
	if cout, cerr, err := n3.cli("image", "clone", "vol", "clone1", "--size", "48M"); err != nil || !strings.Contains(cout, "created image clone1 from vol") ||
		!strings.Contains(cerr, "clone vol: 0 of 32M") || strings.Contains(cerr, "\r") {
		t.Fatalf("clone: %v\nstdout %s\nstderr %q", err, cout, cerr)
	}
	qemuIO(t, n1.url("clone1"), "read -P 0xa1 8M 4M", "read -P 0xb1 12M 8M", "read -P 0xa2 20M 8M", "read -P 0xb2 28M 4M", "read -P 0 32M 16M",
		"write -P 0xc1 0 1M", "flush")
	qemuIO(t, n1.url("vol"), "read -P 0xb1 12M 8M")
	if len(snapshots(t, n3, "vol")) != 1 {
		t.Fatalf("the clone's temporary snapshot was left behind: %v", snapshots(t, n3, "vol"))
	}

	// The owner dies: the snapshot's preserved blocks are on n2 too.
	n1.mustCLI("image", "attach", "vol", "--node", "n1")
	n1.kill9()
	c.waitState([]*node{n2, n3}, "n1", "dead", 25*time.Second)
	n2.mustCLI("image", "clone", "vol@snap1", "afterdeath", "--locations", "n2,n3")
	qemuIO(t, n3.url("afterdeath"), "read -P 0xa1 8M 8M", "read -P 0xa2 16M 16M")
	t.Logf("created from the snapshot after its origin's owner died")
	n1.start()
	c.waitState(c.nodes, "n1", "alive", 20*time.Second)

	// Online growth: every node's LUN grows, old data stays, the new part
	// is zeros and writable.
	// Grown while a verified load writes blocks that a fresh snapshot
	// must preserve (preserving and growing both need the blocks).
	n3.mustCLI("snapshot", "create", "vol", "snap2")
	wait, out = fioVerifiedLoad(t, n1.url("vol"), "8m")
	n2.mustCLI("image", "resize", "vol", "64M")
	if err := wait(); err != nil {
		t.Fatalf("the load saw an error while the image grew: %v\n%s", err, out)
	}
	n3.mustCLI("snapshot", "delete", "vol", "snap2")
	for _, n := range c.nodes {
		waitFor(t, 20*time.Second, n.name+" to serve the grown LUN", func() bool {
			out, _ := run(t, 30*time.Second, "iscsi-readcapacity16", n.url("vol"))
			return strings.Contains(out, "Total size:67108864")
		})
	}
	qemuIO(t, n3.url("vol"), "read -P 0xb2 28M 4M", "read -P 0 32M 32M", "write -P 0xd1 60M 4M", "flush")
	qemuIO(t, n1.url("vol"), "read -P 0xd1 60M 4M")
	if l := locations(t, n3, "vol"); l["n1"] != 0 || l["n2"] != 0 {
		t.Fatalf("copies out of sync after the grow: %v", l)
	}
	if out := n3.mustCLI("image", "verify", "vol"); !strings.Contains(out, "0 differ") {
		t.Fatalf("verify after the grow: %s", out)
	}
	if _, errOut, err := n3.cli("image", "resize", "vol", "32M"); err == nil || !strings.Contains(errOut, "shrink") {
		t.Fatalf("shrinking: err %v, %s", err, errOut)
	}
	// The snapshot still reads as taken after all that.
	qemuIO(t, n1.url("fromsnap"), "read -P 0xa2 16M 16M")

	// Deleting the snapshot lets the image go.
	n3.mustCLI("snapshot", "delete", "vol@snap1")
	if len(snapshots(t, n3, "vol")) != 0 {
		t.Fatal("snapshot still listed after delete")
	}
	n3.mustCLI("image", "delete", "vol", "--now")
	// Left: clone1 on n1 and n2, afterdeath on n2 (and n3, with fromsnap).
	waitFor(t, 20*time.Second, "the data files of vol and snap1 to go", func() bool {
		f1, _ := filepath.Glob(filepath.Join(n1.dir, "data", "images", "*.img"))
		f2, _ := filepath.Glob(filepath.Join(n2.dir, "data", "images", "*.img"))
		return len(f1) == 1 && len(f2) == 2
	})
}

// TestSnapshotRevert: `snapshot revert` makes an image its snapshot again
// in place, on every copy, asked through a node that does not own it;
// the part grown since reads as zeros; a later snapshot keeps its data
// (the revert's writes preserve into it); verify passes after.
func TestSnapshotRevert(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	n1, n2 := c.nodes[0], c.nodes[1]
	n1.mustCLI("image", "create", "rv", "--size", "16M", "--block-size", "1M", "--locations", "n1,n2")
	qemuIO(t, n1.url("rv"), "write -P 0xa1 0 16M", "flush")
	n1.mustCLI("snapshot", "create", "rv@s1")
	qemuIO(t, n1.url("rv"), "write -P 0xb1 2M 4M", "write -P 0xb2 10M 1M", "flush")
	n1.mustCLI("image", "resize", "rv", "+4M")
	waitFor(t, 20*time.Second, "n1 to serve the grown LUN", func() bool {
		out, _ := run(t, 30*time.Second, "iscsi-readcapacity16", n1.url("rv"))
		return strings.Contains(out, "Total size:20971520")
	})
	qemuIO(t, n1.url("rv"), "write -P 0xc1 16M 4M", "flush")
	n1.mustCLI("snapshot", "create", "rv@s2")
	qemuIO(t, n1.url("rv"), "write -P 0xd1 0 1M", "flush")

	if _, errOut, err := n2.cli("snapshot", "revert", "rv@nosuch"); err == nil || !strings.Contains(errOut, "no snapshot rv@nosuch") {
		t.Fatalf("revert to a snapshot that does not exist: %v %s", err, errOut)
	}
	// Asked through n2, which forwards it to the owner (n1).
	if out := n2.mustCLI("snapshot", "revert", "rv@s1"); !strings.Contains(out, "reverted rv to rv@s1") {
		t.Fatalf("revert: %s", out)
	}
	qemuIO(t, n2.url("rv"), "read -P 0xa1 0 16M", "read -P 0 16M 4M")
	qemuIO(t, n1.url("rv"), "read -P 0xa1 0 16M", "read -P 0 16M 4M")
	if l := locations(t, n2, "rv"); len(l) != 2 || l["n1"] != 0 || l["n2"] != 0 {
		t.Fatalf("copies out of sync after the revert: %v", l)
	}
	if out := n2.mustCLI("image", "verify", "rv"); !strings.Contains(out, "0 differ") {
		t.Fatalf("verify after the revert: %s", out)
	}
	// rv@s2 still holds the image as it was when taken.
	dl := filepath.Join(t.TempDir(), "s2.raw")
	n2.mustCLI("image", "download", "rv@s2", dl)
	data, err := os.ReadFile(dl)
	if err != nil || len(data) != 20<<20 {
		t.Fatalf("download rv@s2: %d bytes, %v", len(data), err)
	}
	want := bytes.Repeat([]byte{0xa1}, 20<<20)
	copy(want[2<<20:6<<20], bytes.Repeat([]byte{0xb1}, 4<<20))
	copy(want[10<<20:11<<20], bytes.Repeat([]byte{0xb2}, 1<<20))
	copy(want[16<<20:], bytes.Repeat([]byte{0xc1}, 4<<20))
	if !bytes.Equal(data, want) {
		for i := range data {
			if data[i] != want[i] {
				t.Fatalf("rv@s2 changed by the revert: first difference at %d (%#x, want %#x)", i, data[i], want[i])
			}
		}
	}
	// Reverting to rv@s2 now brings its data back, and the snapshots stay.
	n1.mustCLI("snapshot", "revert", "rv", "s2")
	qemuIO(t, n2.url("rv"), "read -P 0xa1 0 2M", "read -P 0xb1 2M 4M", "read -P 0xb2 10M 1M", "read -P 0xc1 16M 4M")
	if l := snapshots(t, n1, "rv"); len(l) != 2 {
		t.Fatalf("snapshots after two reverts: %v", l)
	}
}

// TestSnapshotNamedBeforePerImageNames: a snapshot whose record was
// written before snapshots were named per image (ukai/images/s1, listed
// by its image as "s1") answers to vm1@s1 everywhere: list, info,
// download, clone, export-diff, revert and delete.
func TestSnapshotNamedBeforePerImageNames(t *testing.T) {
	c := newCluster(t, "n1")
	n1 := c.nodes[0]
	n1.mustCLI("image", "create", "vm1", "--size", "4M", "--block-size", "1M")
	qemuIO(t, n1.url("vm1"), "write -P 0x61 0 4M", "flush")
	n1.mustCLI("snapshot", "create", "vm1@s1")
	qemuIO(t, n1.url("vm1"), "write -P 0x62 0 1M", "flush")
	n1.stop()
	// Rename the snapshot's record the way an earlier release wrote it.
	addr := c.consul.Addr
	rec := map[string]any{}
	if err := json.Unmarshal(consulGet(t, addr, "ukai/images/vm1@s1"), &rec); err != nil {
		t.Fatal(err)
	}
	rec["name"] = "s1"
	b, _ := json.Marshal(rec)
	consulPut(t, addr, "ukai/images/s1", b)
	req, _ := http.NewRequest(http.MethodDelete, "http://"+addr+"/v1/kv/ukai/images/vm1@s1", nil)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 200 {
		t.Fatalf("delete the new-style key: %v %v", err, resp)
	}
	origin := map[string]any{}
	if err := json.Unmarshal(consulGet(t, addr, "ukai/images/vm1"), &origin); err != nil {
		t.Fatal(err)
	}
	origin["snapshots"].([]any)[0].(map[string]any)["name"] = "s1"
	b, _ = json.Marshal(origin)
	consulPut(t, addr, "ukai/images/vm1", b)
	cached := filepath.Join(n1.dir, "data", "images", rec["id"].(string)+".json")
	os.WriteFile(cached, bytesReplace(t, cached, `"name":"vm1@s1"`, `"name":"s1"`), 0o600)
	n1.start()

	if l := snapshots(t, n1, "vm1"); len(l) != 1 || l[0]["full_name"] != "vm1@s1" || l[0]["name"] != "s1" {
		t.Fatalf("snapshot list: %v", l)
	}
	if out := n1.mustCLI("image", "info", "vm1@s1"); !strings.Contains(out, "snapshot of:") {
		t.Fatalf("image info vm1@s1:\n%s", out)
	}
	dl := filepath.Join(t.TempDir(), "s1.raw")
	n1.mustCLI("image", "download", "vm1@s1", dl)
	if data, err := os.ReadFile(dl); err != nil || !bytes.Equal(data, bytes.Repeat([]byte{0x61}, 4<<20)) {
		t.Fatalf("download vm1@s1: %d bytes, %v", len(data), err)
	}
	n1.mustCLI("image", "clone", "vm1@s1", "c1")
	qemuIO(t, n1.url("c1"), "read -P 0x61 0 4M")
	n1.mustCLI("image", "export-diff", "vm1@s1", filepath.Join(t.TempDir(), "s1.diff"))
	n1.mustCLI("snapshot", "revert", "vm1@s1")
	qemuIO(t, n1.url("vm1"), "read -P 0x61 0 4M")
	n1.mustCLI("snapshot", "delete", "vm1@s1")
	if l := snapshots(t, n1, "vm1"); len(l) != 0 {
		t.Fatalf("after delete: %v", l)
	}
}

// bytesReplace returns file's content with old replaced by new (once at
// least).
func bytesReplace(t *testing.T, file, old, new string) []byte {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil || !bytes.Contains(b, []byte(old)) {
		t.Fatalf("%s: %v, or no %s in it", file, err, old)
	}
	return bytes.ReplaceAll(b, []byte(old), []byte(new))
}
