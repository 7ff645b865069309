//go:build bench

package integration

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// rssKiB is the resident set of a process, from /proc.
func rssKiB(t *testing.T, pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			v, _ := strconv.ParseInt(f[1], 10, 64)
			return v
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// TestBenchMemory (runs after TestBench: its file sorts after
// bench_test.go, and it appends to the report TestBench writes): a node serving 100 thin images of 1 TiB (4 MiB blocks:
// 262144 blocks each), with I/O on some of them, and its resident memory
// (goal: under 500 MiB). Appended to the bench report.
func TestBenchMemory(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	n1 := c.nodes[0]
	base := rssKiB(t, n1.cmd.Process.Pid)
	const images = 100
	start := time.Now()
	for i := range images {
		locs := "n1"
		if i%2 == 1 {
			locs = "n1,n2" // half of them with a second copy
		}
		n1.mustCLI("image", "create", fmt.Sprintf("big%03d", i), "--size", "1T", "--locations", locs)
	}
	created := time.Since(start)
	// I/O on ten of them, spread over the image.
	for i := 0; i < images; i += 10 {
		qemuIO(t, n1.url(fmt.Sprintf("big%03d", i)), "write -P 0x11 0 4M", "write -P 0x22 512G 4M", "write -P 0x33 1020G 4M", "flush", "read -P 0x22 512G 4M")
	}
	rss := rssKiB(t, n1.cmd.Process.Pid)
	line := fmt.Sprintf("\nmemory: a node serving %d thin images of 1 TiB (4 MiB blocks, half of them with a copy on a second node; I/O on 10): RSS %d MiB (%d MiB before the images; goal < 500 MiB); %d images created in %v\n",
		images, rss/1024, base/1024, images, created.Round(time.Millisecond))
	appendReport(t, line)
}

// appendReport logs line and appends it to the bench report (after the
// table TestBench writes).
func appendReport(t *testing.T, line string) {
	t.Log(line)
	if *benchReport == "" {
		return
	}
	f, err := os.OpenFile(*benchReport, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(line); err != nil {
		t.Fatal(err)
	}
}
