//go:build bench

package integration

import (
	"fmt"
	"testing"
	"time"
)

// TestBenchSyncImpact (after TestBench, appending to its report): a VM's
// random 4 KiB I/O at depth 16 on one image, idle and while another image
// of the node synchronizes 4 GiB to a new location unthrottled (goal: the
// VM keeps at least 0.8 of its idle rate).
func TestBenchSyncImpact(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	n1 := c.nodes[0]
	n1.mustCLI("image", "create", "vm", "--size", "1G")
	vm := benchTarget{name: "vm", url: n1.url("vm")}
	qemuImgBench(t, vm, true, 4<<20, 256, 8)
	const big = 4 << 30
	n1.mustCLI("image", "create", "big", "--size", fmt.Sprint(big))
	qemuImgBench(t, benchTarget{name: "big", url: n1.url("big")}, true, 4<<20, big/(4<<20), 8)
	// The idle rates: with the fill written back first (writeback of the
	// 4 GiB would slow the idle runs and flatter the ratio), and again
	// after the sync; the reference is their mean.
	flushAll(t)
	idleR, idleW := fioNBD(t, vm, "randread", 16, false), fioNBD(t, vm, "randwrite", 16, false)
	// The new location is filled by the node's synchronizer, unthrottled;
	// the VM's I/O runs meanwhile.
	start := time.Now()
	n1.mustCLI("location", "add", "big", "n2")
	busyR := fioNBD(t, vm, "randread", 16, false)
	busyW := fioNBD(t, vm, "randwrite", 16, false)
	busyEnd := time.Since(start)
	waitFor(t, 10*time.Minute, "the new copy in sync", func() bool { return locations(t, n1, "big")["n2"] == 0 })
	took := time.Since(start)
	if took < busyEnd {
		t.Errorf("the sync (%v) ended before the VM's runs (%v): make the image bigger", took, busyEnd)
	}
	flushAll(t)
	afterR, afterW := fioNBD(t, vm, "randread", 16, false), fioNBD(t, vm, "randwrite", 16, false)
	t.Logf("idle before/after the sync: read %.0f/%.0f, write %.0f/%.0f IOPS", idleR, afterR, idleW, afterW)
	idleR, idleW = (idleR+afterR)/2, (idleW+afterW)/2
	line := fmt.Sprintf("\nVM I/O during a sync (4 GiB of another image to a new location, unthrottled, %.0f MB/s; idle rates: mean of before and after): rand read 4 KiB QD16 %.0f -> %.0f IOPS (%.2f), rand write 4 KiB QD16 %.0f -> %.0f IOPS (%.2f) (goal >= 0.8)\n",
		big/took.Seconds()/1e6, idleR, busyR, busyR/idleR, idleW, busyW, busyW/idleW)
	appendReport(t, line)
}

// flushAll writes back every dirty page of the machine (sync(1)), so a
// measurement does not pay for the writeback of an earlier one.
func flushAll(t *testing.T) {
	t.Helper()
	if out, err := run(t, 5*time.Minute, "sync"); err != nil {
		t.Fatalf("sync: %v\n%s", err, out)
	}
}
