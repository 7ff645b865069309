package integration

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"
)

type statsView struct {
	PeerBytesIn     int64 `json:"peer_bytes_in"`
	SyncBytes       int64 `json:"sync_bytes"`
	PlacementRounds int64 `json:"placement_rounds"`
}

func stats(t *testing.T, n *node) statsView {
	t.Helper()
	var s statsView
	if err := json.Unmarshal([]byte(n.mustCLI("stats", "-o", "json")), &s); err != nil {
		t.Fatal(err)
	}
	return s
}

func TestReplicaCountUpAndDown(t *testing.T) {
	c := newCluster(t, "n1", "n2", "n3")
	n1, n3 := c.nodes[0], c.nodes[2]
	n1.mustCLI("image", "create", "rc", "--size", "32M", "--block-size", "1M")
	qemuIO(t, n1.url("rc"), "write -P 0x31 0 32M", "flush")
	// An impossible policy is refused with the reason.
	if _, errOut, err := n1.cli("image", "set", "rc", "--replicas", "4"); err == nil || !strings.Contains(errOut, "4 copies") {
		t.Fatalf("--replicas 4 on 3 nodes: %v %s", err, errOut)
	}
	if _, errOut, err := n1.cli("image", "set", "rc", "--replicas", "3", "--spread-by", "zone"); err == nil || !strings.Contains(errOut, "zone") {
		t.Fatalf("3 copies spread by zone over 2 zones: %v %s", err, errOut)
	}
	n1.mustCLI("image", "set", "rc", "--replicas", "3")
	waitFor(t, 90*time.Second, "three in-sync copies", func() bool {
		l := locations(t, n3, "rc")
		return len(l) == 3 && l["n1"] == 0 && l["n2"] == 0 && l["n3"] == 0
	})
	if out := n3.mustCLI("image", "verify", "rc"); !strings.Contains(out, "0 differ") || !strings.Contains(out, "32 compared") {
		t.Fatalf("verify: %s", out)
	}
	n1.mustCLI("image", "set", "rc", "--replicas", "1")
	waitFor(t, 60*time.Second, "one copy left", func() bool { return len(locations(t, n3, "rc")) == 1 })
	l := locations(t, n3, "rc")
	for node, oos := range l {
		if oos != 0 {
			t.Fatalf("the copy kept (%s) has %d blocks out of sync", node, oos)
		}
	}
	waitOwner(t, n3, "rc", "")
	qemuIO(t, n3.url("rc"), "read -P 0x31 0 32M")
}

func TestRelocateUnderVerifiedLoad(t *testing.T) {
	c := newCluster(t, "n1", "n2", "n3")
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range c.nodes {
				t.Logf("%s logs:\n%s", n.name, n.logs)
			}
		}
	})
	n1, n3 := c.nodes[0], c.nodes[2]
	n1.mustCLI("image", "create", "vm", "--size", "128M", "--block-size", "1M")
	qemuIO(t, n1.url("vm"), "write -P 0x21 0 128M", "flush")
	// A cap makes the copy take ~8 s, so that it runs under the load.
	n1.mustCLI("policy", "set", "--image", "vm", "--max-rate", "16M")
	wait, out := fioVerifiedLoad(t, n1.url("vm"), "96m")
	n1.mustCLI("image", "relocate", "vm", "--to", "n3", "--from", "n1")
	waitFor(t, 30*time.Second, "the new copy to be added", func() bool {
		_, ok := locations(t, n3, "vm")["n3"]
		return ok
	})
	if err := wait(); err != nil {
		t.Fatalf("the load saw an error during the relocation: %v\n%s", err, out)
	}
	waitFor(t, 90*time.Second, "the relocation to finish", func() bool {
		l := locations(t, n3, "vm")
		oos, ok := l["n3"]
		return ok && len(l) == 1 && oos == 0
	})
	waitFor(t, 20*time.Second, "the finished relocation to be cleared from the policy", func() bool {
		return !strings.Contains(n3.mustCLI("image", "info", "vm"), "relocate")
	})
	// fio verified its own writes while the copy moved; now check every
	// byte on n3 against what n1 served during the load: the part fio did
	// not touch still holds the first pattern.
	waitOwner(t, n3, "vm", "")
	qemuIO(t, n3.url("vm"), "read -P 0x21 96M 32M")
}

func TestSyncWindowAndRateCap(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	n1, n2 := c.nodes[0], c.nodes[1]
	n1.mustCLI("image", "create", "w", "--size", "256M", "--block-size", "1M")
	qemuIO(t, n1.url("w"), "write -P 0x55 0 256M", "flush")
	// A window that is closed now (it opens in two hours, UTC).
	now := time.Now().UTC()
	closed := fmt.Sprintf("%02d:%02d-%02d:%02d", (now.Hour()+2)%24, now.Minute(), (now.Hour()+3)%24, now.Minute())
	n1.mustCLI("policy", "set", "--image", "w", "--sync-window", closed, "--max-rate", "8M")
	n1.mustCLI("location", "add", "w", "n2")
	before := stats(t, n2).PeerBytesIn
	plan := n1.mustCLI("image", "plan", "w")
	if !strings.Contains(plan, "wait") {
		t.Fatalf("the plan outside the window does not wait:\n%s", plan)
	}
	// Explicit sync outside the window needs --now.
	if _, errOut, err := n1.cli("image", "sync", "w"); err == nil || !strings.Contains(errOut, "--now") {
		t.Fatalf("sync outside the window: %v %s", err, errOut)
	}
	// Three planner rounds pass: no sync byte flows.
	r0 := stats(t, n1).PlacementRounds
	waitFor(t, 30*time.Second, "three planner rounds", func() bool { return stats(t, n1).PlacementRounds >= r0+3 })
	if d := stats(t, n2).PeerBytesIn - before; d != 0 {
		t.Fatalf("%d bytes flowed to n2 outside the window", d)
	}
	// Open the window: bytes flow at 8 MiB/s (+-10% over 10 s).
	open := fmt.Sprintf("%02d:%02d-%02d:%02d", (now.Hour()+23)%24, now.Minute(), (now.Hour()+2)%24, now.Minute())
	n1.mustCLI("policy", "set", "--image", "w", "--sync-window", open, "--max-rate", "8M")
	waitFor(t, 20*time.Second, "the sync to start", func() bool { return stats(t, n2).PeerBytesIn > before+(4<<20) })
	a := stats(t, n2).PeerBytesIn
	t0 := time.Now()
	time.Sleep(10 * time.Second) // the measurement interval itself
	b := stats(t, n2).PeerBytesIn
	rate := float64(b-a) / time.Since(t0).Seconds()
	want := float64(8 << 20)
	t.Logf("sync rate over 10 s: %.2f MiB/s (cap 8 MiB/s)", rate/(1<<20))
	if rate < 0.9*want || rate > 1.1*want {
		t.Fatalf("sync rate %.2f MiB/s, want 8 MiB/s +-10%%", rate/(1<<20))
	}
}
