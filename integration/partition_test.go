package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
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

// sourceGate is a TCP proxy in front of a node's listener that can cut
// the connections of one process (another node) and leave everyone
// else's alone: a partition between two nodes while a third still talks
// to both. A connection's process is found through /proc (the client
// socket's inode among the process's file descriptors).
type sourceGate struct {
	t        *testing.T
	ln       net.Listener
	addr     string
	upstream string
	pid      int // the process whose connections the gate cuts

	mu    sync.Mutex
	cond  *sync.Cond
	mode  string // "": open; "refused": closed and refused; "blackhole": paused
	links []*gateLink
	seen  int // connections from pid accepted so far
}

type gateLink struct {
	client, server net.Conn
	fromPid        bool
}

func newSourceGate(t *testing.T, upstream string, pid int) *sourceGate {
	t.Helper()
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", freePort(t)))
	if err != nil {
		t.Fatal(err)
	}
	g := &sourceGate{t: t, ln: ln, addr: ln.Addr().String(), upstream: upstream, pid: pid}
	g.cond = sync.NewCond(&g.mu)
	go g.accept()
	t.Cleanup(func() {
		ln.Close()
		g.mu.Lock()
		g.mode = "closed"
		for _, l := range g.links {
			l.client.Close()
			l.server.Close()
		}
		g.cond.Broadcast()
		g.mu.Unlock()
	})
	return g
}

func (g *sourceGate) accept() {
	for {
		c, err := g.ln.Accept()
		if err != nil {
			return
		}
		from := connOwnedBy(c.RemoteAddr().(*net.TCPAddr).Port, g.ln.Addr().(*net.TCPAddr).Port, g.pid)
		g.mu.Lock()
		if from && g.mode == "refused" {
			g.mu.Unlock()
			c.(*net.TCPConn).SetLinger(0) // a reset, as from a closed port
			c.Close()
			continue
		}
		g.mu.Unlock()
		s, err := net.Dial("tcp", g.upstream)
		if err != nil {
			c.Close()
			continue
		}
		l := &gateLink{client: c, server: s, fromPid: from}
		g.mu.Lock()
		g.links = append(g.links, l)
		if from {
			g.seen++
		}
		g.mu.Unlock()
		go g.pipe(l, c, s)
		go g.pipe(l, s, c)
	}
}

// pipe copies src to dst; while the link is blackholed it stops reading,
// so what was sent waits (in the kernel buffers) and arrives after the
// heal, as TCP retransmissions do.
func (g *sourceGate) pipe(l *gateLink, src, dst net.Conn) {
	buf := make([]byte, 64<<10)
	for {
		g.mu.Lock()
		for l.fromPid && g.mode == "blackhole" {
			g.cond.Wait()
		}
		g.mu.Unlock()
		n, err := src.Read(buf)
		if n > 0 {
			g.mu.Lock()
			for l.fromPid && g.mode == "blackhole" {
				g.cond.Wait()
			}
			g.mu.Unlock()
			if _, werr := dst.Write(buf[:n]); werr != nil {
				err = werr
			}
		}
		if err != nil {
			src.Close()
			dst.Close()
			return
		}
	}
}

// cut cuts the process's connections: "refused" closes them and refuses
// new ones, "blackhole" holds everything they carry.
func (g *sourceGate) cut(mode string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.mode = mode
	if mode == "refused" {
		for _, l := range g.links {
			if l.fromPid {
				l.client.(*net.TCPConn).SetLinger(0)
				l.client.Close()
				l.server.Close()
			}
		}
	}
}

func (g *sourceGate) heal() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.mode = ""
	g.cond.Broadcast()
}

// connOwnedBy says whether the TCP socket 127.0.0.1:port connected to
// 127.0.0.1:peerPort belongs to process pid.
func connOwnedBy(port, peerPort, pid int) bool {
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return false
	}
	want := fmt.Sprintf("0100007F:%04X", port)
	wantPeer := fmt.Sprintf("0100007F:%04X", peerPort)
	inode := ""
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 9 && f[1] == want && f[2] == wantPeer {
			inode = f[9]
			break
		}
	}
	if inode == "" {
		return false
	}
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	for _, fd := range fds {
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name())); err == nil && l == "socket:["+inode+"]" {
			return true
		}
	}
	return false
}

// partitionMode is how a proxy cuts the link and restores it.
type partitionMode struct {
	name      string
	cut, heal func(f *faultProxy)
}

var partitionModes = []partitionMode{
	// Connections refused and reset: the cut node learns at once that
	// nothing answers.
	{"refused", func(f *faultProxy) { f.proxy.Stop() }, func(f *faultProxy) {
		if err := f.proxy.Start(); err != nil {
			f.t.Fatalf("restart proxy %s: %v", f.addr, err)
		}
	}},
	// Everything dropped both ways, connections left open (a network
	// partition): only timeouts tell.
	{"blackhole", func(f *faultProxy) {
		f.add(`{"name":"cut_up","type":"timeout","stream":"upstream","attributes":{"timeout":0}}`)
		f.add(`{"name":"cut_down","type":"timeout","stream":"downstream","attributes":{"timeout":0}}`)
	}, func(f *faultProxy) {
		f.remove("cut_up")
		f.remove("cut_down")
	}},
}

// ptGeneration returns the image's generation from image info.
func ptGeneration(m map[string]any) uint64 {
	g, _ := m["generation"].(float64)
	return uint64(g)
}

// ptActivityBlocks returns the blocks of an image's stored activity log
// (nil when empty or absent).
func ptActivityBlocks(t *testing.T, consulAddr, id string) []int64 {
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

// ptEnablePprof serves the profiler on a node's API (before start), so a
// hang can be reported with the node's goroutines.
func ptEnablePprof(t *testing.T, n *node) {
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

// ptGoroutines returns the node's goroutine stacks that run ukai code.
func ptGoroutines(n *node) string {
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get("http://" + n.api + "/debug/pprof/goroutine?debug=2")
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

// ptRunQemuIO runs qemu-io with a timeout; UKAI_PARTITION_DEBUG=N adds
// libiscsi's debug output at level N.
func ptRunQemuIO(timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-io", args...)
	if lvl := os.Getenv("UKAI_PARTITION_DEBUG"); lvl != "" {
		cmd.Env = append(os.Environ(), "LIBISCSI_DEBUG="+lvl)
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// ptHoldSession keeps an iSCSI session open on url until the test ends.
func ptHoldSession(t *testing.T, url string) {
	t.Helper()
	cmd := exec.Command("qemu-io", "-f", "raw", url)
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		in.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
}

func ptSessions(t *testing.T, n *node) int {
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
// (its Consul access and its data transport go through toxiproxy; gossip
// stays direct, so the membership may still see n1 alive: ownership must
// not rely on it). n1 must fence itself: no write through it is
// acknowledged, and it answers errors instead of hanging. n2 waits out
// n1's lease and takes over with a higher generation; after the heal n1
// has written nothing and serves as a plain copy through n2. Run once
// with refused connections and once with a black hole.
func TestPartition(t *testing.T) {
	for _, mode := range partitionModes {
		t.Run(mode.name, func(t *testing.T) { testPartition(t, mode, 0) })
	}
	// The node that takes over has a clock minutes ahead: a design that
	// compared its clock with the owner's lease would take over at once,
	// while the cut owner still serves. Nothing may change.
	t.Run("blackhole-clock-ahead", func(t *testing.T) { testPartition(t, partitionModes[1], 5*time.Minute) })
}

// testPartition runs the partition scenario; n2 (the node that takes
// over) runs with its clock shifted by skew.
func testPartition(t *testing.T, mode partitionMode, skew time.Duration) {
	const (
		img      = "pp"
		leaseTTL = 4 * time.Second
		// answerTO bounds one qemu-io (open, write, flush) through the cut
		// node: each command there costs at most a Consul request (5 s
		// timeout) and a copy timeout (3 s), about 15 s in all when
		// everything is black-holed; no answer after this long is a hang.
		answerTO = 25 * time.Second
	)
	testStart := time.Now()
	extra := fmt.Sprintf("owner:\n  lease_ttl: %v\n", leaseTTL)
	consul := consultest.Start(t, consultest.Persistent(t.TempDir()))
	c := &cluster{t: t, consul: consul}

	// n1 reaches Consul, and is reached by the other copies, through proxies.
	consulPx := newFaultProxy(t, consul.Addr)
	n1 := newClusterNode(t, "n1", clusterOpts{consul: consulPx.addr, labels: map[string]string{"zone": "a"}, extra: extra})
	peerPx := newFaultProxy(t, n1.peer)
	setPeerAdvertise(t, n1, peerPx.addr)
	ptEnablePprof(t, n1)
	n1.start()
	n2extra := extra
	if skew != 0 {
		n2extra = fmt.Sprintf("owner:\n  lease_ttl: %v\n  clock_offset: %v\n", leaseTTL, skew)
	}
	n2 := newClusterNode(t, "n2", clusterOpts{consul: consul.Addr, join: []string{n1.gossip}, labels: map[string]string{"zone": "a"}, extra: n2extra})
	// n1's own connections to n2's copy (and only those: n3 still reaches
	// n2) go through a gate.
	gate := newSourceGate(t, n2.peer, n1.cmd.Process.Pid)
	setPeerAdvertise(t, n2, gate.addr)
	n2.start()
	n3 := newClusterNode(t, "n3", clusterOpts{consul: consul.Addr, join: []string{n1.gossip}, labels: map[string]string{"zone": "b"}, extra: extra})
	n3.start()
	c.nodes = []*node{n1, n2, n3}
	for _, n := range c.nodes {
		c.waitState(c.nodes, n.name, "alive", 20*time.Second)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("n1 logs:\n%s\nn2 logs:\n%s\nn3 logs:\n%s", n1.logs, n2.logs, n3.logs)
		}
	})

	n1.mustCLI("image", "create", img, "--size", "64M", "--block-size", "1M", "--locations", "n1,n2")
	n1.mustCLI("image", "attach", img, "--node", "n1")
	m := n3.imageJSON(img, false)
	if m["owner"] != "n1" || m["attached"] != "n1" {
		t.Fatalf("after attach: owner %v attached %v", m["owner"], m["attached"])
	}
	id, _ := m["id"].(string)
	gen0 := ptGeneration(m)

	// 1. Pattern A through n1, both copies in sync.
	qemuIO(t, n1.url(img), "write -P 0xa1 0 8M", "flush", "read -P 0xa1 0 8M")
	if l := locations(t, n3, img); l["n1"] != 0 || l["n2"] != 0 {
		t.Fatalf("copies out of sync after pattern A: %v", l)
	}
	// The owner clears its activity log once the writes are flushed and
	// quiet: cut after that, so the takeover has nothing to reconcile.
	waitFor(t, 15*time.Second, "n1's activity log to be cleared", func() bool {
		return len(ptActivityBlocks(t, consul.Addr, id)) == 0
	})

	// 2. Partition n1: neither Consul nor the other copy is reachable from
	// it (nor it from the other nodes' data transport); its local copy stays.
	gate.mu.Lock()
	seen := gate.seen
	gate.mu.Unlock()
	if seen == 0 {
		t.Fatalf("n1 wrote pattern A to n2's copy without going through the gate")
	}
	mode.cut(consulPx)
	mode.cut(peerPx)
	gate.cut(mode.name)
	cut := time.Now()
	fenced := cut.Add(leaseTTL) // n1's lease has run out by then at the latest
	t.Logf("%s partition of n1 at +%v (owner n1, generation %d)", mode.name, cut.Sub(testStart).Round(time.Millisecond), gen0)

	// 3. Minority side: writes through n1, one after the other, from the
	// cut until the majority side is done. None may be acknowledged, each
	// must be answered.
	minorityCmds := []string{"write -P 0xcc 2M 1M", "write -P 0xcc 40M 1M"}
	var (
		mu        sync.Mutex
		attempts  []partitionAttempt
		lastStart time.Time
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
			mu.Lock()
			lastStart = a.start
			mu.Unlock()
			// Unanswered at 3/4 of the time: record what n1 is doing.
			stacks := make(chan string, 1)
			grab := time.AfterFunc(answerTO*3/4, func() { stacks <- ptGoroutines(n1) })
			out, err := ptRunQemuIO(answerTO, "-f", "raw", "-c", cmd, "-c", "flush", n1.url(img))
			grab.Stop()
			a.end, a.out = time.Now(), out
			a.acked = err == nil && strings.Contains(out, "wrote ") && !strings.Contains(out, "failed")
			a.hung = a.end.Sub(a.start) >= answerTO
			if a.hung {
				select {
				case st := <-stacks:
					a.out += "\n" + st
				case <-time.After(10 * time.Second):
				}
			}
			mu.Lock()
			attempts = append(attempts, a)
			mu.Unlock()
			if a.acked || a.hung {
				return
			}
			select {
			case <-stop:
				return
			case <-time.After(250 * time.Millisecond): // pace the attempts
			}
		}
	}()
	// Go on once a write through n1 started after its lease ran out (or
	// n1 stopped answering): its answer is checked below.
	waitFor(t, leaseTTL+2*answerTO, "a write through n1 started after its lease ran out", func() bool {
		mu.Lock()
		defer mu.Unlock()
		if lastStart.After(fenced) {
			return true
		}
		for _, a := range attempts {
			if a.acked || a.hung {
				return true
			}
		}
		return false
	})

	// 4. Majority side: a write through n2 waits out n1's lease; n2 takes
	// over with a higher generation.
	wStart := time.Now()
	qemuIO(t, n2.url(img), "write -P 0xb2 20M 4M", "flush")
	t.Logf("pattern B written through n2 %v after the cut (the write took %v)", time.Since(cut).Round(time.Millisecond), time.Since(wStart).Round(time.Millisecond))
	if elapsed := time.Since(cut); elapsed < leaseTTL {
		t.Errorf("the write through n2 was acknowledged %v after the cut, before n1's lease (%v) could have run out", elapsed, leaseTTL)
	}
	m = n3.imageJSON(img, false)
	gen1 := ptGeneration(m)
	if m["owner"] != "n2" || gen1 <= gen0 {
		t.Fatalf("after the write through n2, n3 sees owner %v generation %d (was n1, %d)", m["owner"], gen1, gen0)
	}
	qemuIO(t, n2.url(img), "read -P 0xb2 20M 4M")
	qemuIO(t, n3.url(img), "read -P 0xb2 20M 4M", "read -P 0xa1 0 8M")
	// Keep a session on n2 (the VM moved there) so that it stays the owner.
	ptHoldSession(t, n2.url(img))
	waitFor(t, 10*time.Second, "a session on n2", func() bool { return ptSessions(t, n2) > 0 })

	// Stop the minority writes: all refused, all answered.
	close(stop)
	select {
	case <-done:
	case <-time.After(answerTO + 5*time.Second):
		t.Fatalf("a write through the partitioned n1 did not return")
	}
	mu.Lock()
	var summary []string
	afterLease := 0
	for _, a := range attempts {
		verdict := "refused"
		switch {
		case a.acked:
			verdict = "ACKNOWLEDGED"
			t.Errorf("a write through the partitioned n1 was acknowledged (%q started %v after the cut):\n%s", a.cmd, a.start.Sub(cut).Round(time.Millisecond), a.out)
		case a.hung:
			verdict = "NO ANSWER"
			t.Errorf("a write through the partitioned n1 got no answer in %v (%q started %v after the cut); qemu-io and n1's goroutines:\n%s", answerTO, a.cmd, a.start.Sub(cut).Round(time.Millisecond), a.out)
		}
		summary = append(summary, fmt.Sprintf("%q at +%v: %s after %v", a.cmd, a.start.Sub(cut).Round(time.Millisecond), verdict, a.end.Sub(a.start).Round(time.Millisecond)))
		if a.start.After(fenced) {
			afterLease++
		}
	}
	nAttempts := len(attempts)
	mu.Unlock()
	t.Logf("%d writes through n1 during the partition: %s", nAttempts, strings.Join(summary, "; "))
	if !t.Failed() && (nAttempts < 2 || afterLease < 1) {
		t.Errorf("only %d writes through n1 during the partition (%d after its lease ran out)", nAttempts, afterLease)
	}

	// n1's own copy (a raw file) still holds, where n1 was asked to write,
	// what was there before the cut: no refused write landed anywhere.
	checkLocal := func(when string) {
		t.Helper()
		files, _ := filepath.Glob(filepath.Join(n1.dir, "data", "images", "*.img"))
		if len(files) != 1 {
			t.Fatalf("n1's image files: %v", files)
		}
		b, err := os.ReadFile(files[0])
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range []struct {
			block int
			want  byte
		}{{2, 0xa1}, {40, 0}} {
			blk := b[r.block<<20 : (r.block+1)<<20]
			for i, c := range blk {
				if c != r.want {
					t.Errorf("%s: n1's local copy of block %d holds %#x at +%d, not %#x as before the cut: n1 wrote it during the partition", when, r.block, c, i, r.want)
					break
				}
			}
		}
	}
	checkLocal("before the heal")

	// 5. Heal. Nothing n1 tried during the partition is anywhere; n1
	// serves as a plain copy, forwarding to the owner n2.
	mode.heal(consulPx)
	mode.heal(peerPx)
	gate.heal()
	healed := time.Now()
	qemuIO(t, n2.url(img), "read -P 0xa1 0 8M", "read -P 0 8M 12M", "read -P 0xb2 20M 4M", "read -P 0 24M 40M")
	logsBefore := n1.logs.Len()
	for deadline := time.Now().Add(20 * time.Second); ; {
		out, err := ptRunQemuIO(time.Minute, "-f", "raw", "-c", "read -P 0xb2 20M 4M", "-c", "read -P 0xa1 2M 1M", "-c", "read -P 0 40M 1M", n1.url(img))
		if err == nil && !strings.Contains(out, "failed") && !strings.Contains(out, "Pattern verification") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("reads through n1 after the heal still fail: %v\n%s", err, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("n1 serves pattern B %v after the heal", time.Since(healed).Round(time.Millisecond))
	if m := n3.imageJSON(img, false); m["owner"] != "n2" || ptGeneration(m) != gen1 {
		t.Errorf("after the read through n1: owner %v generation %d (want n2, %d)", m["owner"], ptGeneration(m), gen1)
	}
	if after := n1.logs.String()[logsBefore:]; strings.Contains(after, "took ownership") {
		t.Errorf("n1 took the image back instead of forwarding to n2:\n%s", after)
	}
	// Before any sync: the copies agree on every block both hold in sync
	// (n1's copy of blocks 20-23 is out of sync: it missed pattern B).
	out, errOut, err := n3.cli("image", "verify", img)
	if err != nil || !strings.Contains(out, " 0 differ") {
		t.Errorf("verify after the heal, before sync: copies recorded in sync differ (a refused write landed on n1's copy and nothing recorded it): %v\n%s%s", err, out, errOut)
	}
	waitFor(t, 30*time.Second, "both copies in sync", func() bool {
		n3.cli("image", "sync", img)
		l := locations(t, n3, img)
		return l["n1"] == 0 && l["n2"] == 0
	})
	out, errOut, err = n3.cli("image", "verify", img)
	if err != nil || !strings.Contains(out, " 0 differ") || !strings.Contains(out, "64 compared") {
		t.Errorf("verify after sync: %v\n%s%s", err, out, errOut)
	}
	qemuIO(t, n1.url(img), "read -P 0xa1 0 8M", "read -P 0 8M 12M", "read -P 0xb2 20M 4M", "read -P 0 24M 40M")
	if strings.Contains(n2.logs.String(), "a newer owner wrote") {
		t.Errorf("n2 was fenced by a newer owner")
	}
	t.Logf("%s partition: %v in all", mode.name, time.Since(testStart).Round(time.Millisecond))
}
