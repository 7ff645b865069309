package integration

import (
	"encoding/json"
	"net/http"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/meta"
)

// TestPolicySetChangesOnlyWhatIsGiven: `policy set` keeps the fields it is
// not given (a rate set after a window used to drop the window), clears
// one field with --clear-window or --clear-rate, and refuses an image or a
// node that does not exist (it used to keep a policy that never applied).
func TestPolicySetChangesOnlyWhatIsGiven(t *testing.T) {
	n := newNode(t, "n1")
	n.start()
	n.mustCLI("image", "create", "vm1", "--size", "16M", "--block-size", "1M")
	policy := func() (api.SyncPolicy, bool) {
		t.Helper()
		var p api.SyncPolicies
		if err := json.Unmarshal([]byte(n.mustCLI("policy", "show", "-o", "json")), &p); err != nil {
			t.Fatal(err)
		}
		sp, ok := p.Images["vm1"]
		return sp, ok
	}
	n.mustCLI("policy", "set", "--image", "vm1", "--sync-window", "01:00-05:00", "--tz", "Asia/Tokyo")
	n.mustCLI("policy", "set", "--image", "vm1", "--max-rate", "20M")
	if p, ok := policy(); !ok || len(p.Windows) != 1 || p.Windows[0].Start != 60 || p.TZ != "Asia/Tokyo" || p.MaxRate != 20<<20 {
		t.Fatalf("after a window then a rate: %+v (present %v), want both and the zone", p, ok)
	}
	n.mustCLI("policy", "set", "--image", "vm1", "--clear-rate")
	if p, _ := policy(); len(p.Windows) != 1 || p.MaxRate != 0 {
		t.Fatalf("after --clear-rate: %+v, want the window kept and no rate", p)
	}
	n.mustCLI("policy", "set", "--image", "vm1", "--clear-window", "--max-rate", "5M")
	if p, _ := policy(); len(p.Windows) != 0 || p.MaxRate != 5<<20 || p.TZ != "Asia/Tokyo" {
		t.Fatalf("after --clear-window --max-rate 5M: %+v", p)
	}
	n.mustCLI("policy", "set", "--image", "vm1", "--clear")
	if p, ok := policy(); ok {
		t.Fatalf("after --clear: %+v still there", p)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"policy", "set", "--image", "nosuch", "--max-rate", "1M"}, "no image nosuch"},
		{[]string{"policy", "set", "--node", "nosuch", "--max-rate", "1M"}, "no node nosuch"},
		{[]string{"policy", "set", "--image", "vm1", "--clear-rate", "--max-rate", "1M"}, "give one of each pair"},
	} {
		out, errOut, err := n.cli(tc.args...)
		if err == nil || !strings.Contains(errOut, tc.want) {
			t.Errorf("ukai %s: %v, want an error naming %q\n%s%s", strings.Join(tc.args, " "), err, tc.want, out, errOut)
		}
	}
	n.mustCLI("policy", "set", "--node", "n1", "--max-rate", "10M")
}

// TestResizeRelativeAndMinCopies: `image resize vm1 +1M` grows by 1M;
// `--min-copies 0` is refused (it was taken as the default, 1).
func TestResizeRelativeAndMinCopies(t *testing.T) {
	n := newNode(t, "n1")
	n.start()
	n.mustCLI("image", "create", "vm1", "--size", "16M", "--block-size", "1M")
	n.mustCLI("image", "resize", "vm1", "+1M")
	n.mustCLI("image", "resize", "vm1", "+3M")
	if sz := n.imageJSON("vm1", false)["size"]; sz != float64(20<<20) {
		t.Fatalf("after +1M and +3M: size %v, want %d", sz, 20<<20)
	}
	if _, errOut, err := n.cli("image", "resize", "vm1", "+0"); err == nil || !strings.Contains(errOut, "grows by nothing") {
		t.Fatalf("resize +0: %v %s", err, errOut)
	}
	if _, errOut, err := n.cli("image", "create", "vm2", "--size", "16M", "--min-copies", "0"); err == nil || !strings.Contains(errOut, "at least 1") {
		t.Fatalf("create --min-copies 0: %v %s", err, errOut)
	}
}

// TestErrorsInOperatorsWords: a size the node cannot hold is the
// operator's error (400) in words, without a server file path; sizes come
// back as typed (3M, not 3145728).
func TestErrorsInOperatorsWords(t *testing.T) {
	n := newNode(t, "n1")
	n.start()
	_, errOut, err := n.cli("image", "create", "vm9", "--size", "16P")
	if err == nil || !strings.Contains(errOut, "size 16P on n1: larger than this node's file system allows") || strings.Contains(errOut, n.dir) {
		t.Fatalf("create --size 16P: %v\n%s", err, errOut)
	}
	resp, rerr := http.Post("http://"+n.api+"/v1/images", "application/json", strings.NewReader(`{"name":"vm8","size":18014398509481984}`))
	if rerr != nil {
		t.Fatal(rerr)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("POST /v1/images with 16P: status %d, want 400", resp.StatusCode)
	}
	n.mustCLI("image", "create", "vm1", "--size", "3M", "--block-size", "1M")
	if _, errOut, err := n.cli("image", "resize", "vm1", "1M"); err == nil || !strings.Contains(errOut, `"vm1" is 3M: shrinking to 1M`) {
		t.Fatalf("shrink: %v\n%s", err, errOut)
	}
	if _, errOut, err := n.cli("location", "add", "vm1", "nosuch"); err == nil || !strings.Contains(errOut, "no node nosuch") || !strings.Contains(errOut, "not found") {
		t.Fatalf("location add vm1 nosuch: %v\n%s", err, errOut)
	}
	if _, errOut, err := n.cli("image", "clone", "vm1", "small", "--size", "2M"); err == nil || !strings.Contains(errOut, `size 2M is smaller than the source "vm1" (3M)`) {
		t.Fatalf("clone smaller than its source: %v\n%s", err, errOut)
	}
	if _, errOut, err := n.cli("image", "create", "odd", "--size", "3M", "--block-size", "3M"); err == nil || !strings.Contains(errOut, "block size 3M: must be a power of two from 64K to 64M") {
		t.Fatalf("block size 3M: %v\n%s", err, errOut)
	}
	if strings.Contains(meta.ErrConflict.Error(), "check-and-set") {
		t.Fatalf("the conflict error speaks the store's language: %q", meta.ErrConflict)
	}
}

// TestInfoShowsPausedSync: a paused sync shows in the table form of
// `image info`, not only in its JSON.
func TestInfoShowsPausedSync(t *testing.T) {
	n := newNode(t, "n1")
	n.start()
	n.mustCLI("image", "create", "vm1", "--size", "3M", "--block-size", "1M")
	if out := n.mustCLI("image", "info", "vm1"); strings.Contains(out, "PAUSED") {
		t.Fatalf("a sync not paused shows as paused:\n%s", out)
	}
	n.mustCLI("image", "sync", "vm1", "--pause")
	if out := n.mustCLI("image", "info", "vm1"); !strings.Contains(out, "sync:") || !strings.Contains(out, "PAUSED") {
		t.Fatalf("the paused sync does not show:\n%s", out)
	}
}

// TestChangesPrintTheirRecord: commands that change something print the
// resulting record with -o json or -o yaml; a bad -o is refused before
// anything changes.
func TestChangesPrintTheirRecord(t *testing.T) {
	n := newNode(t, "n1")
	n.start()
	n.mustCLI("image", "create", "vm1", "--size", "3M", "--block-size", "1M")
	var img api.Image
	if err := json.Unmarshal([]byte(n.mustCLI("image", "resize", "vm1", "+1M", "-o", "json")), &img); err != nil || img.Size != 4<<20 {
		t.Fatalf("resize -o json: %+v, %v", img, err)
	}
	y := n.mustCLI("snapshot", "create", "vm1", "s1", "-o", "yaml")
	if !strings.Contains(y, "name: s1") && !strings.Contains(y, "name: vm1@s1") {
		t.Fatalf("snapshot create -o yaml:\n%s", y)
	}
	if out := n.mustCLI("image", "attach", "vm1", "--node", "n1", "-o", "json"); !strings.Contains(out, `"attached": "n1"`) {
		t.Fatalf("attach -o json:\n%s", out)
	}
	if out := n.mustCLI("image", "set", "vm1", "--replicas", "1", "-o", "yaml"); !strings.Contains(out, "replicas: 1") {
		t.Fatalf("image set -o yaml:\n%s", out)
	}
	if out := n.mustCLI("image", "info", "vm1", "-o", "yaml"); !strings.Contains(out, "name: vm1") || !strings.Contains(out, "size: 4194304") {
		t.Fatalf("image info -o yaml:\n%s", out)
	}
	if _, errOut, err := n.cli("image", "resize", "vm1", "+1M", "-o", "xml"); err == nil || !strings.Contains(errOut, "want table, json or yaml") {
		t.Fatalf("resize -o xml: %v %s", err, errOut)
	}
	if sz := n.imageJSON("vm1", false)["size"]; sz != float64(4<<20) {
		t.Fatalf("a refused -o still resized: %v", sz)
	}
}

// TestAccessNaming: iSCSI access is `ukai access grant|revoke|list`;
// `image export IMAGE FILE` writes the data (rbd's meaning); the old
// `image export --initiator` and `image unexport` still work, with a
// deprecation warning.
func TestAccessNaming(t *testing.T) {
	n := newNode(t, "n1")
	n.start()
	n.mustCLI("image", "create", "vm1", "--size", "1M", "--block-size", "1M")
	n.mustCLI("access", "grant", "vm1", "--initiator", "iqn.2026-11.test:a")
	_, errOut, err := n.cli("image", "export", "vm1", "--initiator", "iqn.2026-11.test:b")
	if err != nil || !strings.Contains(errOut, "deprecated") {
		t.Fatalf("image export --initiator: %v %s", err, errOut)
	}
	list := n.mustCLI("access", "list", "vm1")
	if !strings.Contains(list, "iqn.2026-11.test:a") || !strings.Contains(list, "iqn.2026-11.test:b") {
		t.Fatalf("access list:\n%s", list)
	}
	n.mustCLI("access", "revoke", "vm1", "--initiator", "iqn.2026-11.test:a")
	if _, errOut, err := n.cli("image", "unexport", "vm1", "--initiator", "iqn.2026-11.test:b"); err != nil || !strings.Contains(errOut, "deprecated") {
		t.Fatalf("image unexport: %v %s", err, errOut)
	}
	if list := n.mustCLI("access", "list", "vm1", "-o", "json"); strings.Contains(list, "iqn.2026-11.test") {
		t.Fatalf("access left after revoke:\n%s", list)
	}
	file := t.TempDir() + "/vm1.raw"
	n.mustCLI("image", "export", "vm1", file)
	if st, err := os.Stat(file); err != nil || st.Size() != 1<<20 {
		t.Fatalf("image export vm1 FILE: %v %v", st, err)
	} else if used := st.Sys().(*syscall.Stat_t).Blocks * 512; used > 64<<10 {
		t.Fatalf("the export of an image never written takes %d bytes: holes not kept", used)
	}
	if _, errOut, err := n.cli("image", "export", "vm1"); err == nil || !strings.Contains(errOut, "access grant") {
		t.Fatalf("image export vm1 without FILE: %v %s", err, errOut)
	}
}

// TestCompletionNames: the shell completion asks the cluster for image and
// node names.
func TestCompletionNames(t *testing.T) {
	n := newNode(t, "n1")
	n.start()
	n.mustCLI("image", "create", "vm1", "--size", "1M", "--block-size", "1M")
	n.mustCLI("image", "create", "db7", "--size", "1M", "--block-size", "1M")
	if out := n.mustCLI("__complete", "image", "info", ""); !strings.Contains(out, "vm1\n") || !strings.Contains(out, "db7\n") {
		t.Fatalf("image names:\n%s", out)
	}
	if out := n.mustCLI("__complete", "node", "cordon", ""); !strings.Contains(out, "n1\n") {
		t.Fatalf("node names:\n%s", out)
	}
	if out := n.mustCLI("__complete", "image", "attach", "vm1", "--node", ""); !strings.Contains(out, "n1\n") {
		t.Fatalf("--node names:\n%s", out)
	}
	if out := n.mustCLI("completion", "bash"); !strings.Contains(out, "__ukai") && !strings.Contains(out, "_ukai") {
		t.Fatalf("no bash completion script:\n%.200s", out)
	}
}

// TestSnapshotsStayOutOfImageCommands: `image list` does not list
// snapshots, and `image delete` does not delete one (snapshot delete does).
func TestSnapshotsStayOutOfImageCommands(t *testing.T) {
	n := newNode(t, "n1")
	n.start()
	n.mustCLI("image", "create", "vm1", "--size", "1M", "--block-size", "1M")
	n.mustCLI("snapshot", "create", "vm1", "s1")
	if out := n.mustCLI("image", "list"); strings.Contains(out, "s1") || !strings.Contains(out, "vm1") {
		t.Fatalf("image list:\n%s", out)
	}
	if _, errOut, err := n.cli("image", "delete", "vm1@s1"); err == nil || !strings.Contains(errOut, "ukai snapshot delete vm1@s1") {
		t.Fatalf("image delete vm1@s1: %v %s", err, errOut)
	}
	if _, errOut, err := n.cli("image", "delete", "s1"); err == nil || !strings.Contains(errOut, "not found") {
		t.Fatalf("image delete s1: %v %s", err, errOut)
	}
	if out := n.mustCLI("snapshot", "list", "vm1"); !strings.Contains(out, "s1") {
		t.Fatalf("the snapshot is gone after a refused image delete:\n%s", out)
	}
	n.mustCLI("snapshot", "delete", "vm1", "s1")
}

// TestSnapshotNamespace: snapshots are named per image (vm1@s1, as rbd
// does), by snapshot rules rather than IQN rules, and show up only where
// asked for.
func TestSnapshotNamespace(t *testing.T) {
	n := newNode(t, "n1")
	n.start()
	n.mustCLI("image", "create", "vm1", "--size", "2M", "--block-size", "1M")
	n.mustCLI("image", "create", "vm2", "--size", "2M", "--block-size", "1M")
	n.mustCLI("snapshot", "create", "vm1@s1")
	// The same snapshot name on another image is another snapshot.
	if out, errOut, err := n.cli("snapshot", "create", "vm2@s1"); err != nil || !strings.Contains(out, "created snapshot vm2@s1") {
		t.Fatalf("vm2@s1 beside vm1@s1: %v %s %s", err, out, errOut)
	}
	if _, errOut, err := n.cli("snapshot", "create", "vm1@s1"); err == nil || !strings.Contains(errOut, "vm1 already has a snapshot s1") {
		t.Fatalf("vm1@s1 twice: %v %s", err, errOut)
	}
	// Snapshot names are not IQNs: capitals and '_' are fine; a leading
	// '.', a '/' or a missing part are not.
	n.mustCLI("snapshot", "create", "vm1@Before_Upgrade.2026-12-07")
	for _, bad := range []string{"vm1@.hidden", "vm1@a/b", "vm1@", "vm1"} {
		if _, errOut, err := n.cli("snapshot", "create", bad); err == nil || !strings.Contains(errOut, "snapshot") {
			t.Fatalf("snapshot create %s: %v %s", bad, err, errOut)
		}
	}
	l := snapshots(t, n, "vm1")
	if len(l) != 2 || l[0]["full_name"] != "vm1@s1" || l[0]["name"] != "s1" || l[1]["full_name"] != "vm1@Before_Upgrade.2026-12-07" {
		t.Fatalf("snapshot list vm1: %v", l)
	}
	if l := snapshots(t, n, "vm2"); len(l) != 1 || l[0]["full_name"] != "vm2@s1" {
		t.Fatalf("snapshot list vm2: %v", l)
	}
	if out := n.mustCLI("image", "list"); strings.Contains(out, "s1") {
		t.Fatalf("image list shows snapshots:\n%s", out)
	}
	// A snapshot is read and cloned by its full name.
	if out := n.mustCLI("image", "info", "vm2@s1"); !strings.Contains(out, "snapshot of:") || !strings.Contains(out, "vm2") {
		t.Fatalf("image info vm2@s1:\n%s", out)
	}
	n.mustCLI("image", "clone", "vm2@s1", "fromsnap")
	// Deleting vm1@s1 leaves vm2@s1.
	n.mustCLI("snapshot", "delete", "vm1@s1")
	if l := snapshots(t, n, "vm2"); len(l) != 1 {
		t.Fatalf("vm2's snapshot went with vm1's: %v", l)
	}
	if _, errOut, err := n.cli("snapshot", "delete", "vm1@s1"); err == nil || !strings.Contains(errOut, "no snapshot vm1@s1") {
		t.Fatalf("deleting vm1@s1 twice: %v %s", err, errOut)
	}
}
