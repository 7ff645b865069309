//go:build bench

package integration

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestBenchRevert (after TestBench, appending to its report): how long a
// revert keeps an image's I/O waiting. A 256 MiB image on two nodes,
// 64 MiB of it changed after a snapshot; the reference is writing those
// 64 MiB through iSCSI (qemu-io, flushed) in the same run: a revert reads
// the snapshot's blocks and writes them to both copies, so it should cost
// about one such write plus the snapshot reads.
func TestBenchRevert(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	n1 := c.nodes[0]
	n1.mustCLI("image", "create", "rv", "--size", "256M", "--block-size", "1M", "--locations", "n1,n2")
	qemuIO(t, n1.url("rv"), "write -P 0x11 0 256M", "flush")
	n1.mustCLI("snapshot", "create", "rv@s1")
	start := time.Now()
	qemuIO(t, n1.url("rv"), "write -P 0x22 64M 64M", "flush") // preserves 64 blocks first
	firstWrite := time.Since(start)
	start = time.Now()
	qemuIO(t, n1.url("rv"), "write -P 0x33 64M 64M", "flush") // plain overwrite: the reference
	write := time.Since(start)
	start = time.Now()
	if out := n1.mustCLI("snapshot", "revert", "rv@s1"); !strings.Contains(out, "reverted") {
		t.Fatalf("revert: %s", out)
	}
	revert := time.Since(start)
	qemuIO(t, n1.url("rv"), "read -P 0x11 0 256M")
	line := fmt.Sprintf("\nRevert (256 MiB image on two copies, 64 MiB changed since the snapshot): revert %v (the image's I/O fenced meanwhile), %.2f of writing those 64 MiB through iSCSI (%v; the first write after the snapshot, which preserved them, %v)\n",
		revert.Round(time.Millisecond), revert.Seconds()/write.Seconds(), write.Round(time.Millisecond), firstWrite.Round(time.Millisecond))
	appendReport(t, line)
}
