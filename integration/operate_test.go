package integration

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// imageLocations is the image's locations, in record order.
func imageLocations(t *testing.T, n *node, image string) []string {
	t.Helper()
	var info struct {
		Locations []locView `json:"locations"`
	}
	if err := json.Unmarshal([]byte(n.mustCLI("image", "info", image, "-o", "json")), &info); err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range info.Locations {
		out = append(out, l.Node)
	}
	return out
}

func logsOnFailure(t *testing.T, c *cluster) {
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range c.nodes {
				t.Logf("%s logs:\n%s", n.name, n.logs)
			}
		}
	})
}

// TestDrainNode: 4 nodes, 10 images with 1-3 copies, two of them under
// fio's verified load through other nodes. A drain that could not finish
// is refused with the image named and nothing changed; cordoning twice and
// draining an unknown node are refused; then `node drain n1 --wait`
// leaves n1 without a copy, every image at its count with verify passing
// and its data intact, and the load without an error.
func TestDrainNode(t *testing.T) {
	c := newCluster(t, "n1", "n2", "n3", "n4")
	logsOnFailure(t, c)
	n1, n2, n3 := c.nodes[0], c.nodes[1], c.nodes[2]
	placements := [][]string{
		{"n1"}, {"n1", "n2"}, {"n1", "n3"}, {"n1", "n2", "n3"}, {"n1", "n4"},
		{"n1", "n2", "n4"}, {"n2", "n1"}, {"n3", "n1"}, {"n2", "n3"}, {"n4"},
	}
	copies := map[string]int{}
	for i, locs := range placements {
		name := fmt.Sprintf("d%d", i)
		n2.mustCLI("image", "create", name, "--size", "24M", "--block-size", "1M", "--locations", strings.Join(locs, ","))
		qemuIO(t, n2.url(name), fmt.Sprintf("write -P 0x%02x 0 24M", 0x40+i), "flush")
		copies[name] = len(locs)
	}
	// A snapshot with a copy on n1 moves too.
	n2.mustCLI("snapshot", "create", "d1", "d1-snap")
	qemuIO(t, n2.url("d1"), "write -P 0x7e 0 4M", "flush") // preserves 4 blocks into the snapshot
	// Slow copies, so that they run under the load.
	n2.mustCLI("policy", "set", "--default", "--max-rate", "16M")

	// Bad input: nothing changes.
	if _, errOut, err := n2.cli("node", "drain", "nosuch"); err == nil || !strings.Contains(errOut, "no node nosuch") {
		t.Fatalf("drain of an unknown node: %v %s", err, errOut)
	}
	n2.mustCLI("node", "cordon", "n4")
	if _, errOut, err := n2.cli("node", "cordon", "n4"); err == nil || !strings.Contains(errOut, "n4 is already cordoned") {
		t.Fatalf("cordon twice: %v %s", err, errOut)
	}
	// With n4 cordoned, d3's copies on n1, n2, n3 have nowhere to go.
	_, errOut, err := n2.cli("node", "drain", "n1")
	if err == nil || !strings.Contains(errOut, "d3: ") || !strings.Contains(errOut, "nothing changed") || strings.Contains(errOut, "d0: ") {
		t.Fatalf("a drain that cannot finish: %v %s", err, errOut)
	}
	if st := nodeStates(t, n3); st["n1"] != "alive" || st["n4"] != "alive,cordoned" {
		t.Fatalf("after the refused drain: %v", st)
	}
	n2.mustCLI("node", "uncordon", "n4")

	wait2, out2 := fioVerifiedLoops(t, n2.url("d1"), "16m", 40)
	wait3, out3 := fioVerifiedLoops(t, n3.url("d5"), "16m", 40)
	running := func(wait func() error) func() (time.Time, error) {
		ch := make(chan error, 1)
		go func() { ch <- wait() }()
		return func() (time.Time, error) { err := <-ch; return time.Now(), err }
	}
	end2, end3 := running(wait2), running(wait3)
	// The owners: the loads' nodes, and n1 for d0 (attached there, as an
	// orchestrator does for a VM on n1): --move-owners moves it.
	n2.mustCLI("image", "attach", "d0", "--node", "n1")
	qemuIO(t, n1.url("d0"), "read -P 0x40 0 24M")
	start := time.Now()
	out := n2.mustCLI("node", "drain", "n1", "--wait", "--move-owners", "--interval", "500ms", "--timeout", "5m")
	t.Logf("drain took %s:\n%s", time.Since(start).Round(time.Second), out)
	if !strings.Contains(out, "n1 drained: it holds no copy") || !strings.Contains(out, "images done") || !strings.Contains(out, "d0: owner moved to n2") {
		t.Fatalf("drain output:\n%s", out)
	}
	for _, l := range []struct {
		image string
		end   func() (time.Time, error)
		out   *strings.Builder
	}{{"d1", end2, out2}, {"d5", end3, out3}} {
		at, err := l.end()
		if err != nil {
			t.Fatalf("the load on %s saw an error: %v\n%s", l.image, err, l.out)
		}
		if ran := at.Sub(start); ran < 3*time.Second {
			t.Errorf("the load on %s ended %s into the drain: too short to have run under it", l.image, ran)
		}
	}
	if st := nodeStates(t, n3); st["n1"] != "alive,drained" {
		t.Fatalf("node states after the drain: %v", st)
	}
	names := []string{"d1@d1-snap"}
	for name := range copies {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		locs := imageLocations(t, n3, name)
		if slices.Contains(locs, "n1") {
			t.Errorf("%s still has a copy on n1: %v", name, locs)
		}
		if want, ok := copies[name]; ok && len(locs) != want {
			t.Errorf("%s has %d copies %v, want %d", name, len(locs), locs, want)
		}
		if out := n3.mustCLI("image", "verify", name); !strings.Contains(out, " 0 differ") {
			t.Errorf("verify %s: %s", name, out)
		}
	}
	// Data written before the drain reads back everywhere it was not
	// overwritten by the loads.
	for i := range placements {
		name := fmt.Sprintf("d%d", i)
		if name == "d1" || name == "d5" {
			continue
		}
		qemuIO(t, n3.url(name), fmt.Sprintf("read -P 0x%02x 0 24M", 0x40+i))
	}
	// A cordoned (drained) node gets no new copy.
	n2.mustCLI("image", "set", "d9", "--replicas", "3")
	waitFor(t, 60*time.Second, "d9's three copies", func() bool { return len(locations(t, n3, "d9")) == 3 })
	if locs := imageLocations(t, n3, "d9"); slices.Contains(locs, "n1") {
		t.Fatalf("a new copy went to the drained n1: %v", locs)
	}
	waitOwner(t, n3, "d0", "n2")
	if out := n2.mustCLI("node", "uncordon", "n1"); !strings.Contains(out, "d0: owner back on n1") {
		t.Fatalf("uncordon:\n%s", out)
	}
	if st := nodeStates(t, n3); st["n1"] != "alive" {
		t.Fatalf("after uncordon: %v", st)
	}
	// d0 was attached to n1 before the drain: it is again, and n1 owns it.
	if m := n3.imageJSON("d0", false); m["owner"] != "n1" || m["attached"] != "n1" {
		t.Fatalf("d0 after uncordon: owner %v attached %v, want n1 and n1", m["owner"], m["attached"])
	}
	qemuIO(t, n1.url("d0"), "read -P 0x40 0 24M")
}

// nodeStates is `node list`'s STATE column by node.
func nodeStates(t *testing.T, n *node) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, line := range strings.Split(n.mustCLI("node", "list"), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) >= 2 {
			out[f[0]] = f[1]
		}
	}
	return out
}

// TestLocalityBestEffort: an image owned (attached) on a node without a
// copy gets one there after the configured delay plus its sync; then the
// surplus copy goes, the owner's stays, verify passes.
func TestLocalityBestEffort(t *testing.T) {
	c := newClusterWith(t, "placement:\n  locality: best-effort\n  locality_delay: 3s\n", "n1", "n2", "n3")
	logsOnFailure(t, c)
	n1, n3 := c.nodes[0], c.nodes[2]
	n1.mustCLI("image", "create", "loc", "--size", "32M", "--block-size", "1M", "--locations", "n1,n2")
	qemuIO(t, n1.url("loc"), "write -P 0x5a 0 32M", "flush")
	attached := time.Now()
	n1.mustCLI("image", "attach", "loc", "--node", "n3")
	waitFor(t, 90*time.Second, "a copy on the owner n3, in sync, and one other copy", func() bool {
		l := locations(t, n1, "loc")
		oos, ok := l["n3"]
		return ok && oos == 0 && len(l) == 2
	})
	took := time.Since(attached)
	t.Logf("owner's copy in sync and the surplus dropped %s after the attach (delay 3s)", took.Round(100*time.Millisecond))
	if took < 3*time.Second {
		t.Fatalf("locality acted after %s, before its 3s delay", took)
	}
	if out := n3.mustCLI("image", "verify", "loc"); !strings.Contains(out, " 0 differ") {
		t.Fatalf("verify: %s", out)
	}
	// The replica count it had (2) was recorded before the move.
	if p := n1.mustCLI("image", "info", "loc"); !strings.Contains(p, "replicas 2") {
		t.Fatalf("image info:\n%s", p)
	}
	qemuIO(t, n3.url("loc"), "read -P 0x5a 0 32M")
}

// TestGroupAntiAffinity: two one-copy images on zone a put in a group
// with anti-affinity by zone end on distinct zones (the later name
// moves); a third image the rule cannot fit is refused with the reason and
// nothing changes; a group with images cannot be deleted.
func TestGroupAntiAffinity(t *testing.T) {
	c := newCluster(t, "n1", "n2", "n3", "n4") // zones a, a, b, b
	logsOnFailure(t, c)
	n1 := c.nodes[0]
	for i, loc := range []string{"n1", "n2", "n3"} {
		name := fmt.Sprintf("db%d", i+1)
		n1.mustCLI("image", "create", name, "--size", "8M", "--block-size", "1M", "--locations", loc)
		qemuIO(t, n1.url(name), fmt.Sprintf("write -P 0x%02x 0 8M", 0x61+i), "flush")
	}
	if _, errOut, err := n1.cli("image", "set", "db1", "--group", "db"); err == nil || !strings.Contains(errOut, "group db has no rule") {
		t.Fatalf("a group without a rule: %v %s", err, errOut)
	}
	n1.mustCLI("group", "set", "db", "--anti-affinity", "zone")
	n1.mustCLI("image", "set", "db1", "--group", "db")
	n1.mustCLI("image", "set", "db2", "--group", "db")
	waitFor(t, 90*time.Second, "db2 moved off zone a", func() bool {
		l := imageLocations(t, n1, "db2")
		return len(l) == 1 && (l[0] == "n3" || l[0] == "n4") && locations(t, n1, "db2")[l[0]] == 0
	})
	if l := imageLocations(t, n1, "db1"); !slices.Equal(l, []string{"n1"}) {
		t.Fatalf("db1 moved: %v", l)
	}
	qemuIO(t, n1.url("db2"), "read -P 0x62 0 8M")
	_, errOut, err := n1.cli("image", "set", "db3", "--group", "db")
	if err == nil || !strings.Contains(errOut, "anti-affinity by zone needs 3 distinct zone values") {
		t.Fatalf("a rule that cannot be met: %v %s", err, errOut)
	}
	if info := n1.mustCLI("image", "info", "db3"); strings.Contains(info, "group") {
		t.Fatalf("the refused group was recorded:\n%s", info)
	}
	if _, errOut, err := n1.cli("group", "delete", "db"); err == nil || !strings.Contains(errOut, "has images") {
		t.Fatalf("delete a group with images: %v %s", err, errOut)
	}
	if out := n1.mustCLI("group", "list"); !strings.Contains(out, "anti-affinity") || !strings.Contains(out, "db1,db2") {
		t.Fatalf("group list:\n%s", out)
	}
}

// TestLocalityStrict: under strict locality a node without an in-sync
// copy may not serve (own) the image: an attach there is refused with the
// reason, and I/O through it fails rather than being served remotely;
// the operator's override lets it, and locality then brings a copy there.
func TestLocalityStrict(t *testing.T) {
	c := newClusterWith(t, "placement:\n  locality_delay: 2s\n", "n1", "n2", "n3")
	logsOnFailure(t, c)
	n1, n3 := c.nodes[0], c.nodes[2]
	n1.mustCLI("image", "create", "st", "--size", "16M", "--block-size", "1M", "--locations", "n1,n2")
	qemuIO(t, n1.url("st"), "write -P 0x3c 0 16M", "flush")
	n1.mustCLI("image", "set", "st", "--locality", "strict", "--replicas", "2")
	waitOwner(t, n1, "st", "") // n1 lets it go once idle
	_, errOut, err := n1.cli("image", "attach", "st", "--node", "n3")
	if err == nil || !strings.Contains(errOut, "locality strict: n3 has no copy of st") || !strings.Contains(errOut, "--allow-remote n3") {
		t.Fatalf("attach to a node without a copy: %v %s", err, errOut)
	}
	if out, err := run(t, 60*time.Second, "qemu-io", "-f", "raw", "-c", "read -P 0x3c 0 1M", n3.url("st")); err == nil {
		t.Fatalf("I/O through n3 was served without a local copy:\n%s", out)
	}
	if l := imageLocations(t, n1, "st"); slices.Contains(l, "n3") {
		t.Fatalf("a copy went to n3 without an owner there: %v", l)
	}
	n1.mustCLI("image", "set", "st", "--allow-remote", "n3")
	n1.mustCLI("image", "attach", "st", "--node", "n3")
	qemuIO(t, n3.url("st"), "read -P 0x3c 0 16M")
	waitFor(t, 60*time.Second, "the owner's copy on n3 in sync and the surplus gone", func() bool {
		l := locations(t, n1, "st")
		oos, ok := l["n3"]
		return ok && oos == 0 && len(l) == 2
	})
	if out := n3.mustCLI("image", "verify", "st"); !strings.Contains(out, " 0 differ") {
		t.Fatalf("verify: %s", out)
	}
}
