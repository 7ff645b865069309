package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/cluster/consulkv/consultest"
)

// partitionAttempt is one write tried through the partitioned owner.
type partitionAttempt struct {
	start, end time.Time
	cmd        string
	acked      bool // qemu-io reported the write done
	hung       bool // no answer within the attempt's timeout
	out        string
}

// blackhole makes a proxy drop everything both ways without closing the
// connections (a network partition, not a refused connection).
func (f *faultProxy) blackhole() {
	f.t.Helper()
	f.add(`{"name":"cut_up","type":"timeout","stream":"upstream","attributes":{"timeout":0}}`)
	f.add(`{"name":"cut_down","type":"timeout","stream":"downstream","attributes":{"timeout":0}}`)
}

func (f *faultProxy) heal() {
	f.t.Helper()
	f.remove("cut_up")
	f.remove("cut_down")
}

// generation returns the image's generation from image info.
func generation(m map[string]any) uint64 {
	g, _ := m["generation"].(float64)
	return uint64(g)
}

// activityBlocks returns the blocks of an image's stored activity log
// (nil when empty or absent).
func activityBlocks(t *testing.T, consulAddr, id string) []int64 {
	t.Helper()
	raw := consulGet(t, consulAddr, "ukai/activity/"+id)
	if len(raw) == 0 {
		return nil
	}
	var r struct {
		Blocks []int64 `json:"blocks"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		t.Fatalf("activity log of %s: %v: %q", id, err, raw)
	}
	return r.Blocks
}

// enablePprof serves the profiler on a node's API (before start), so a
// hang can be reported with the node's goroutines.
func enablePprof(t *testing.T, n *node) {
	t.Helper()
	b, err := os.ReadFile(n.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	old := "api:\n  listen: " + n.api + "\n"
	if !strings.Contains(string(b), old) {
		t.Fatalf("no api block in %s:\n%s", n.cfgPath, b)
	}
	cfg := strings.Replace(string(b), old, old+"  pprof: true\n", 1)
	if os.Getenv("UKAI_PARTITION_DEBUG") != "" {
		cfg = strings.Replace(cfg, "log:\n  level: info\n", "log:\n  level: debug\n", 1)
	}
	if err := os.WriteFile(n.cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
}

// goroutines returns the node's goroutine stacks that run ukai code.
func goroutines(n *node) string {
	resp, err := http.Get("http://" + n.api + "/debug/pprof/goroutine?debug=2")
	if err != nil {
		return "goroutines of " + n.name + ": " + err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var keep []string
	for _, g := range strings.Split(string(b), "\n\n") {
		if strings.Contains(g, "ukai-storage/ukai/") {
			keep = append(keep, g)
		}
	}
	return "goroutines of " + n.name + " running ukai code:\n" + strings.Join(keep, "\n\n")
}

// runQemuIO runs qemu-io with a timeout; UKAI_PARTITION_DEBUG=N adds
// libiscsi's debug output at level N.
func runQemuIO(timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-io", args...)
	if lvl := os.Getenv("UKAI_PARTITION_DEBUG"); lvl != "" {
		cmd.Env = append(os.Environ(), "LIBISCSI_DEBUG="+lvl)
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func sessions(t *testing.T, n *node) int {
	t.Helper()
	var s struct {
		Sessions int `json:"sessions"`
	}
	if err := json.Unmarshal([]byte(n.mustCLI("stats", "-o", "json")), &s); err != nil {
		t.Fatal(err)
	}
	return s.Sessions
}

// TestPartition cuts the owner n1 off from Consul and from the other copy
// (its data transport and Consul access go through toxiproxy; gossip stays
// direct, so the membership may still see n1 alive). n1 must fence itself:
// no write through it is acknowledged. n2 waits out n1's lease and takes
// over; after the heal n1 has written nothing and serves as a plain copy.
func TestPartition(t *testing.T) {
	const (
		img      = "pp"
		leaseTTL = 4 * time.Second
		// attemptTO bounds one qemu-io through the cut node: beyond it the
		// node hangs instead of answering.
		attemptTO = 40 * time.Second
	)
	testStart := time.Now()
	extra := fmt.Sprintf("owner:\n  lease_ttl: %v\n", leaseTTL)
	consul := consultest.Start(t, consultest.Persistent(t.TempDir()))
	c := &cluster{t: t, consul: consul}

	// n1 reaches Consul and is reached by the other copies through proxies.
	consulPx := newFaultProxy(t, consul.Addr)
	n1 := newClusterNode(t, "n1", clusterOpts{consul: consulPx.addr, labels: map[string]string{"zone": "a"}, extra: extra})
	peerPx := newFaultProxy(t, n1.peer)
	setPeerAdvertise(t, n1, peerPx.addr)
	enablePprof(t, n1)
	n1.start()
	n2 := newClusterNode(t, "n2", clusterOpts{consul: consul.Addr, join: []string{n1.gossip}, labels: map[string]string{"zone": "a"}, extra: extra})
	n2.start()
	n3 := newClusterNode(t, "n3", clusterOpts{consul: consul.Addr, join: []string{n1.gossip}, labels: map[string]string{"zone": "b"}, extra: extra})
	n3.start()
	c.nodes = []*node{n1, n2, n3}
	for _, n := range c.nodes {
		c.waitState(c.nodes, n.name, "alive", 20*time.Second)
	}
	dump := func() string {
		return fmt.Sprintf("n1 logs:\n%s\nn2 logs:\n%s\nn3 logs:\n%s", n1.logs, n2.logs, n3.logs)
	}

	n1.mustCLI("image", "create", img, "--size", "64M", "--block-size", "1M", "--locations", "n1,n2")
	n1.mustCLI("image", "attach", img, "--node", "n1")
	m := n3.imageJSON(img, false)
	if m["owner"] != "n1" || m["attached"] != "n1" {
		t.Fatalf("after attach: owner %v attached %v", m["owner"], m["attached"])
	}
	id, _ := m["id"].(string)
	gen0 := generation(m)

	// 1. Pattern A through n1, both copies in sync.
	qemuIO(t, n1.url(img), "write -P 0xa1 0 8M", "flush", "read -P 0xa1 0 8M")
	if l := locations(t, n3, img); l["n1"] != 0 || l["n2"] != 0 {
		t.Fatalf("copies out of sync after pattern A: %v\n%s", l, dump())
	}
	// The owner clears its activity log once the writes are flushed and
	// quiet: cut after that, so the takeover has nothing to reconcile.
	waitFor(t, 15*time.Second, "n1's activity log to be cleared", func() bool {
		return len(activityBlocks(t, consul.Addr, id)) == 0
	})

	// 2. Partition n1: neither Consul nor the other copies are reachable
	// from it (nor it from them); its local copy stays.
	consulPx.blackhole()
	peerPx.blackhole()
	cut := time.Now()
	t.Logf("partition of n1 at +%v (generation %d)", cut.Sub(testStart).Round(time.Millisecond), gen0)

	// 3. Minority side: writes through n1, one after the other, until the
	// majority side is done. None may be acknowledged.
	minorityCmds := []string{"write -P 0xcc 2M 1M", "write -P 0xcc 40M 1M"}
	var (
		mu       sync.Mutex
		attempts []partitionAttempt
	)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			cmd := minorityCmds[i%len(minorityCmds)]
			a := partitionAttempt{start: time.Now(), cmd: cmd}
			// A write still unanswered after half the timeout is a hang:
			// record what n1 is doing then.
			var stacks string
			grab := time.AfterFunc(attemptTO/2, func() { stacks = goroutines(n1) })
			out, err := runQemuIO(attemptTO, "-f", "raw", "-c", cmd, "-c", "flush", n1.url(img))
			grab.Stop()
			a.end, a.out = time.Now(), out
			a.acked = err == nil && strings.Contains(out, "wrote ") && !strings.Contains(out, "failed")
			a.hung = a.end.Sub(a.start) >= attemptTO
			if a.hung {
				a.out += "\n" + stacks
			}
			mu.Lock()
			attempts = append(attempts, a)
			mu.Unlock()
			if a.acked || a.hung {
				return
			}
		}
	}()
	// n1 must answer errors once its lease ran out: the first attempt
	// started after that has an answer soon.
	fenced := cut.Add(leaseTTL)
	waitFor(t, leaseTTL+attemptTO, "an answered write through n1 started after its lease ran out", func() bool {
		mu.Lock()
		defer mu.Unlock()
		for _, a := range attempts {
			if a.acked || a.hung || a.start.After(fenced) {
				return true
			}
		}
		return false
	})

	// 4. Majority side: a write through n2 waits out n1's lease, n2 takes
	// over with a higher generation.
	wStart := time.Now()
	qemuIO(t, n2.url(img), "write -P 0xb2 20M 4M", "flush")
	t.Logf("write of pattern B through n2 acknowledged %v after the cut (took %v)", time.Since(cut).Round(time.Millisecond), time.Since(wStart).Round(time.Millisecond))
	m = n3.imageJSON(img, false)
	gen1 := generation(m)
	if m["owner"] != "n2" || gen1 <= gen0 {
		t.Fatalf("after the write through n2: owner %v generation %d (was n1, %d)\n%s", m["owner"], gen1, gen0, dump())
	}
	if elapsed := time.Since(cut); elapsed < leaseTTL {
		t.Fatalf("n2 took over %v after the cut, before n1's lease (%v) could have run out\n%s", elapsed, leaseTTL, dump())
	}
	qemuIO(t, n2.url(img), "read -P 0xb2 20M 4M")
	qemuIO(t, n3.url(img), "read -P 0xb2 20M 4M", "read -P 0xa1 0 8M")
	// Keep a session on n2 (the VM moved there) so it stays the owner.
	holder := exec.Command("qemu-io", "-f", "raw", n2.url(img))
	holderIn, err := holder.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var holderOut bytes.Buffer
	holder.Stdout, holder.Stderr = &holderOut, &holderOut
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	holderDone := make(chan error, 1)
	go func() { holderDone <- holder.Wait() }()
	t.Cleanup(func() {
		holderIn.Close()
		select {
		case <-holderDone:
		case <-time.After(10 * time.Second):
			holder.Process.Kill()
			<-holderDone
		}
	})
	waitFor(t, 10*time.Second, "a session on n2", func() bool { return sessions(t, n2) > 0 })

	// Stop the minority writes, then check them: all refused, none hung.
	close(stop)
	select {
	case <-done:
	case <-time.After(attemptTO + 5*time.Second):
		t.Fatalf("a write through the partitioned n1 did not return\n%s", dump())
	}
	mu.Lock()
	var summary []string
	afterLease := 0
	for _, a := range attempts {
		summary = append(summary, fmt.Sprintf("%q at +%v: %v", a.cmd, a.start.Sub(cut).Round(time.Millisecond), a.end.Sub(a.start).Round(time.Millisecond)))
		if a.acked {
			t.Errorf("a write through the partitioned n1 was acknowledged (%q started %v after the cut):\n%s", a.cmd, a.start.Sub(cut), a.out)
		}
		if a.hung {
			t.Errorf("a write through the partitioned n1 got no answer in %v (%q started %v after the cut):\n%s", attemptTO, a.cmd, a.start.Sub(cut), a.out)
		}
		if a.start.After(fenced) {
			afterLease++
		}
	}
	n := len(attempts)
	mu.Unlock()
	t.Logf("%d writes through n1 during the partition, all refused: %s", n, strings.Join(summary, "; "))
	if n < 2 || afterLease < 1 {
		t.Errorf("only %d writes through n1 during the partition (%d after its lease ran out)", n, afterLease)
	}
	if t.Failed() {
		t.Fatal(dump())
	}

	// 5. Heal. Nothing n1 tried during the partition is there; n1 serves
	// as a plain copy, forwarding to the owner n2.
	consulPx.heal()
	peerPx.heal()
	healed := time.Now()
	qemuIO(t, n2.url(img), "read -P 0xa1 0 8M", "read -P 0 8M 12M", "read -P 0xb2 20M 4M", "read -P 0 24M 40M")
	logsBefore := len(n1.logs.String())
	waitFor(t, 20*time.Second, "a read through n1 to return pattern B", func() bool {
		out, err := run(t, time.Minute, "qemu-io", "-f", "raw", "-c", "read -P 0xb2 20M 4M", "-c", "read -P 0xa1 2M 1M", "-c", "read -P 0 40M 1M", n1.url(img))
		return err == nil && !strings.Contains(out, "failed") && !strings.Contains(out, "Pattern verification")
	})
	t.Logf("n1 serves pattern B %v after the heal", time.Since(healed).Round(time.Millisecond))
	if m := n3.imageJSON(img, false); m["owner"] != "n2" || generation(m) != gen1 {
		t.Fatalf("after reading through n1: owner %v generation %d (want n2, %d)\n%s", m["owner"], generation(m), gen1, dump())
	}
	if after := n1.logs.String()[logsBefore:]; strings.Contains(after, "took ownership") {
		t.Fatalf("n1 took the image back instead of forwarding to n2:\n%s", after)
	}
	waitFor(t, 30*time.Second, "both copies in sync", func() bool {
		n3.cli("image", "sync", img)
		l := locations(t, n3, img)
		return l["n1"] == 0 && l["n2"] == 0
	})
	if out := n3.mustCLI("image", "verify", img); !strings.Contains(out, "0 differ") || !strings.Contains(out, "64 compared") {
		t.Fatalf("verify after the heal: %s\n%s", out, dump())
	}
	// Through n1 again, after the sync.
	qemuIO(t, n1.url(img), "read -P 0xa1 0 8M", "read -P 0 8M 12M", "read -P 0xb2 20M 4M", "read -P 0 24M 40M")
	if strings.Contains(n2.logs.String(), "a newer owner wrote") {
		t.Fatalf("n2 was fenced by a newer owner:\n%s", dump())
	}
	t.Logf("total %v", time.Since(testStart).Round(time.Millisecond))
}
