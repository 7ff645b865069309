//go:build bench

package integration

import (
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

var benchReport = flag.String("bench-report", "", "write the markdown table here")
var benchRounds = flag.Int("bench-rounds", 3, "interleaved rounds; the table shows medians")

// benchTarget is one system under test with a qemu block URL.
type benchTarget struct {
	// before and after, when set, run around each of its runs (and the
	// target is the same image as another one: it is filled once).
	before, after func()
	name          string
	url           string // qemu-img / qemu-nbd filename
	raw           bool
	pids          []int // the target's processes, whose CPU time is measured
}

// cpuSeconds is the user+system CPU time of processes, from /proc.
func cpuSeconds(pids []int) float64 {
	var ticks int64
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
		if len(f) > 12 {
			u, _ := strconv.ParseInt(f[11], 10, 64)
			k, _ := strconv.ParseInt(f[12], 10, 64)
			ticks += u + k
		}
	}
	return float64(ticks) / 100 // USER_HZ
}

// machineTicks is the machine's busy and total CPU time in ticks, from
// /proc/stat (busy: everything but idle, iowait and steal).
func machineTicks() (busy, total int64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	for i, v := range f[1:] {
		n, _ := strconv.ParseInt(v, 10, 64)
		if i >= 8 { // guest time is already in user
			break
		}
		total += n
		if i != 3 && i != 4 && i != 7 { // idle, iowait, steal
			busy += n
		}
	}
	return busy, total
}

var qemuBenchRE = regexp.MustCompile(`Run completed in ([0-9.]+) seconds`)

// qemuImgBench runs a sequential qemu-img bench and returns MB/s.
func qemuImgBench(t *testing.T, tg benchTarget, write bool, size, count, depth int) float64 {
	args := []string{"bench", "-f", "raw", "-t", "none", "-s", fmt.Sprint(size), "-d", fmt.Sprint(depth), "-c", fmt.Sprint(count)}
	if write {
		args = append(args, "-w")
	}
	out, err := run(t, 10*time.Minute, "qemu-img", append(args, tg.url)...)
	m := qemuBenchRE.FindStringSubmatch(out)
	if err != nil || m == nil {
		t.Fatalf("qemu-img %v on %s: %v\n%s", args, tg.name, err, out)
	}
	secs, _ := strconv.ParseFloat(m[1], 64)
	return float64(size) * float64(count) / secs / 1e6
}

// fioNBD exports the target with qemu-nbd (same for all three targets, so
// the NBD hop costs all of them alike) and runs fio's nbd engine; it
// returns IOPS.
func fioNBD(t *testing.T, tg benchTarget, rw string, depth int, verify bool) float64 {
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	nbd := exec.Command("qemu-nbd", "-f", "raw", "--cache=none", "--aio=threads", "-k", sock, "--persistent", "--shared=4", tg.url)
	if err := nbd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { nbd.Process.Kill(); nbd.Wait() }()
	waitFor(t, 20*time.Second, "qemu-nbd socket", func() bool { _, err := os.Stat(sock); return err == nil })
	args := []string{"--name=b", "--ioengine=nbd", "--uri=nbd+unix:///?socket=" + sock, "--rw=" + rw, "--bs=4k",
		fmt.Sprintf("--iodepth=%d", depth), "--size=256m", "--output-format=json"}
	if verify {
		args = append(args, "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0")
	} else {
		args = append(args, "--time_based", "--runtime=5", "--ramp_time=1")
	}
	out, err := run(t, 5*time.Minute, "fio", args...)
	if err != nil {
		t.Fatalf("fio %s qd%d on %s: %v\n%s", rw, depth, tg.name, err, out)
	}
	if verify {
		return 0
	}
	var res struct {
		Jobs []struct {
			Read  struct{ IOPS float64 } `json:"read"`
			Write struct{ IOPS float64 } `json:"write"`
		} `json:"jobs"`
	}
	if i := strings.Index(out, "{"); i >= 0 {
		out = out[i:]
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || len(res.Jobs) == 0 {
		t.Fatalf("fio output: %v\n%s", err, out)
	}
	return res.Jobs[0].Read.IOPS + res.Jobs[0].Write.IOPS
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// TestBench compares ukai with tgtd and the raw file on the same file
// system, interleaved, and writes a markdown table (make bench). ukai runs
// as a two-node cluster: an image with one local copy, one with a local
// and a remote copy, and one whose only copy is on the other node.
func TestBench(t *testing.T) {
	const size = 1 << 30
	c := newCluster(t, "n1", "n2")
	n1 := c.nodes[0]
	n1.mustCLI("image", "create", "local", "--size", fmt.Sprint(size))
	n1.mustCLI("image", "create", "two", "--size", fmt.Sprint(size), "--locations", "n1,n2")
	n1.mustCLI("image", "create", "remote", "--size", fmt.Sprint(size), "--locations", "n2")
	// "ukai, metrics off" is the same node and image with image I/O
	// counting turned off by a reload (api.metrics_io false, SIGHUP)
	// just before its runs and on again after: the cost of the metrics
	// is "ukai" over it, with nothing else different.
	metricsIO := func(on bool) { setMetricsIO(t, n1, on) }
	rawPath := filepath.Join(n1.dir, "data", "raw.img")
	if err := os.WriteFile(rawPath, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	os.Truncate(rawPath, size)
	tgtURL := startTgtd(t, size)
	ukaiPids := []int{c.nodes[0].cmd.Process.Pid, c.nodes[1].cmd.Process.Pid}
	targets := []benchTarget{
		{name: "raw file", url: rawPath, raw: true},
		{name: "tgtd", url: tgtURL, pids: []int{lastTgtdPid}},
		{name: "ukai", url: n1.url("local"), pids: ukaiPids},
		{name: "ukai, metrics off", url: n1.url("local"), pids: ukaiPids,
			before: func() { metricsIO(false) }, after: func() { metricsIO(true) }},
		{name: "ukai 2 copies", url: n1.url("two"), pids: ukaiPids},
		{name: "ukai remote copy", url: n1.url("remote"), pids: ukaiPids},
	}
	// Fill every target once so reads hit allocated data.
	for _, tg := range targets {
		if tg.before == nil { // the same image as another target
			qemuImgBench(t, tg, true, 4<<20, size/(4<<20), 8)
		}
	}
	if !strings.Contains(httpGet(t, "http://"+n1.api+"/metrics"), `ukai_image_write_ops_total{image="local"}`) {
		t.Fatal("n1 does not count image I/O")
	}
	// Correctness pass first: random writes verified with crc32c through
	// every ukai image.
	for _, tg := range targets[2:] {
		if tg.before == nil {
			fioNBD(t, tg, "randwrite", 16, true)
		}
	}

	type row struct {
		name, unit string
		fn         func(benchTarget) float64
		bytes      func(v float64) float64 // bytes moved by a run that measured v
	}
	seq := func(v float64) float64 { return 2048 << 20 }
	rnd := func(v float64) float64 { return v * 4096 * 6 } // 1 s ramp + 5 s run
	rows := []row{
		{"seq write 1 MiB QD8", "MB/s", func(tg benchTarget) float64 { return qemuImgBench(t, tg, true, 1<<20, 2048, 8) }, seq},
		{"seq read 1 MiB QD8", "MB/s", func(tg benchTarget) float64 { return qemuImgBench(t, tg, false, 1<<20, 2048, 8) }, seq},
		{"rand read 4 KiB QD1", "IOPS", func(tg benchTarget) float64 { return fioNBD(t, tg, "randread", 1, false) }, rnd},
		{"rand write 4 KiB QD1", "IOPS", func(tg benchTarget) float64 { return fioNBD(t, tg, "randwrite", 1, false) }, rnd},
		{"rand read 4 KiB QD16", "IOPS", func(tg benchTarget) float64 { return fioNBD(t, tg, "randread", 16, false) }, rnd},
		{"rand write 4 KiB QD16", "IOPS", func(tg benchTarget) float64 { return fioNBD(t, tg, "randwrite", 16, false) }, rnd},
	}
	vals := make([][][]float64, len(rows))
	cpu := make([][][]float64, len(rows))  // CPU seconds of the target per GB moved
	busy := make([][][]float64, len(rows)) // the machine's busy fraction during the run
	for i := range vals {
		vals[i] = make([][]float64, len(targets))
		cpu[i] = make([][]float64, len(targets))
		busy[i] = make([][]float64, len(targets))
	}
	var syncMBs, ddMBs []float64
	for r := 0; r < *benchRounds; r++ {
		for i, rw := range rows {
			for j, tg := range targets {
				if tg.before != nil {
					tg.before()
				}
				c0 := cpuSeconds(tg.pids)
				b0, t0 := machineTicks()
				v := rw.fn(tg)
				b1, t1 := machineTicks()
				if tg.after != nil {
					tg.after()
				}
				vals[i][j] = append(vals[i][j], v)
				cpu[i][j] = append(cpu[i][j], (cpuSeconds(tg.pids)-c0)/(rw.bytes(v)/1e9))
				busy[i][j] = append(busy[i][j], float64(b1-b0)/float64(max(t1-t0, 1)))
			}
		}
		s, d := benchSync(t, c, r, rawPath)
		syncMBs, ddMBs = append(syncMBs, s), append(ddMBs, d)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "Benchmark %s, %s, medians of %d interleaved rounds\n\n", time.Now().UTC().Format("2006-01-02"), machine(), *benchRounds)
	b.WriteString("| pattern | unit |")
	for _, tg := range targets {
		b.WriteString(" " + tg.name + " |")
	}
	b.WriteString(" ukai/raw | ukai/tgtd | 2 copies/tgtd | remote/tgtd | 2 copies/ukai | metrics on/off | CPU s/GB tgtd, ukai, 2 copies, remote | machine busy % raw, tgtd, ukai, 2 copies, remote |\n|---|---|")
	for range len(targets) + 8 {
		b.WriteString("---|")
	}
	b.WriteString("\n")
	for i, rw := range rows {
		m := make([]float64, len(targets))
		fmt.Fprintf(&b, "| %s | %s |", rw.name, rw.unit)
		for j := range targets {
			m[j] = median(vals[i][j])
			fmt.Fprintf(&b, " %.0f |", m[j])
		}
		fmt.Fprintf(&b, " %.2f | %.2f | %.2f | %.2f | %.2f | %.3f | %.2f, %.2f, %.2f, %.2f | %.0f, %.0f, %.0f, %.0f, %.0f |\n", m[2]/m[0], m[2]/m[1], m[4]/m[1], m[5]/m[1], m[4]/m[2], m[2]/m[3],
			median(cpu[i][1]), median(cpu[i][2]), median(cpu[i][4]), median(cpu[i][5]),
			100*median(busy[i][0]), 100*median(busy[i][1]), 100*median(busy[i][2]), 100*median(busy[i][4]), 100*median(busy[i][5]))
	}
	worst := math.Inf(1)
	for i, rw := range rows {
		if strings.HasPrefix(rw.name, "rand") {
			worst = min(worst, median(vals[i][2])/median(vals[i][3]))
		}
	}
	verdict := "within"
	if worst < 0.97 {
		verdict = "OUTSIDE"
	}
	fmt.Fprintf(&b, "\nmetrics on/off, worst 4 KiB random row: %.3f (%s the goal of at most 3%% lost)\n", worst, verdict)
	fmt.Fprintf(&b, "\nsync of a fully written 256 MiB image to a new location (loopback): %.0f MB/s; dd of the same bytes on the same disk (bs=4M, fdatasync): %.0f MB/s; ratio %.2f\n",
		median(syncMBs), median(ddMBs), median(syncMBs)/median(ddMBs))
	t.Log("\n" + b.String())
	if *benchReport != "" {
		os.MkdirAll(filepath.Dir(*benchReport), 0o755)
		if err := os.WriteFile(*benchReport, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// benchSync measures `ukai image sync` of a freshly written 256 MiB image
// to a new location, and dd copying as many bytes on the same disk.
func benchSync(t *testing.T, c *cluster, round int, rawPath string) (syncMBs, ddMBs float64) {
	const size = 256 << 20
	n1 := c.nodes[0]
	name := fmt.Sprintf("sync%d", round)
	n1.mustCLI("image", "create", name, "--size", fmt.Sprint(size))
	qemuImgBench(t, benchTarget{name: name, url: n1.url(name)}, true, 4<<20, size/(4<<20), 8)
	n1.mustCLI("image", "sync", name, "--pause")
	n1.mustCLI("location", "add", name, "n2")
	start := time.Now()
	n1.mustCLI("image", "sync", name)
	syncMBs = size / time.Since(start).Seconds() / 1e6
	n1.mustCLI("image", "delete", name, "--now")

	dst := rawPath + ".dd"
	start = time.Now()
	if out, err := run(t, 5*time.Minute, "dd", "if="+rawPath, "of="+dst, "bs=4M", fmt.Sprintf("count=%d", size/(4<<20)), "conv=fdatasync"); err != nil {
		t.Fatalf("dd: %v %s", err, out)
	}
	ddMBs = size / time.Since(start).Seconds() / 1e6
	os.Remove(dst)
	return syncMBs, ddMBs
}

func machine() string {
	out, _ := exec.Command("sh", "-c", "nproc; grep -m1 'model name' /proc/cpuinfo | cut -d: -f2; df -T . | tail -1 | awk '{print $2}'").Output()
	f := strings.Split(strings.TrimSpace(string(out)), "\n")
	for i := range f {
		f[i] = strings.TrimSpace(f[i])
	}
	return fmt.Sprintf("%s cores, %s", f[0], strings.Join(f[1:], ", "))
}

// setMetricsIO turns n's image I/O counting on or off through its config
// file and a reload (SIGHUP), and waits until the node applied it.
func setMetricsIO(t *testing.T, n *node, on bool) {
	t.Helper()
	cfg, err := os.ReadFile(n.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(cfg), "  metrics_io: false\n") != on {
		return // already so
	}
	s := strings.Replace(string(cfg), "  metrics_io: false\n", "", 1)
	if !on {
		s = strings.Replace(s, "api:\n  listen: "+n.api+"\n", "api:\n  listen: "+n.api+"\n  metrics_io: false\n", 1)
	}
	if err := os.WriteFile(n.cfgPath, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
	before := strings.Count(n.logs.String(), "image I/O counting changed")
	n.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, 10*time.Second, "the reload of api.metrics_io", func() bool {
		return strings.Count(n.logs.String(), "image I/O counting changed") > before
	})
}
