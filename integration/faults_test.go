package integration

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/rs/zerolog"

	"github.com/ukai-storage/ukai/cluster/consulkv/consultest"
)

// faultProxy is a toxiproxy proxy, run in the test process, in front of a
// node's peer listener.
type faultProxy struct {
	t     *testing.T
	addr  string
	proxy *toxiproxy.Proxy
}

func newFaultProxy(t *testing.T, upstream string) *faultProxy {
	t.Helper()
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	p := toxiproxy.NewProxy(srv, "peer", addr, upstream)
	if err := p.Start(); err != nil {
		t.Fatalf("toxiproxy on %s: %v", addr, err)
	}
	t.Cleanup(p.Stop)
	return &faultProxy{t: t, addr: p.Listen, proxy: p}
}

// add adds a toxic, e.g. `{"name":"x","type":"latency","stream":"upstream","attributes":{"latency":50}}`.
func (f *faultProxy) add(js string) {
	f.t.Helper()
	if _, err := f.proxy.Toxics.AddToxicJson(strings.NewReader(js)); err != nil {
		f.t.Fatalf("add toxic %s: %v", js, err)
	}
}

func (f *faultProxy) remove(name string) {
	f.t.Helper()
	if err := f.proxy.Toxics.RemoveToxic(context.Background(), name); err != nil {
		f.t.Fatalf("remove toxic %s: %v", name, err)
	}
}

// setPeerAdvertise adds peer.advertise to a node's config (before start).
func setPeerAdvertise(t *testing.T, n *node, addr string) {
	t.Helper()
	b, err := os.ReadFile(n.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	old := "peer:\n  listen: " + n.peer + "\n"
	if !strings.Contains(string(b), old) {
		t.Fatalf("no peer block in %s:\n%s", n.cfgPath, b)
	}
	cfg := strings.Replace(string(b), old, old+"  advertise: "+addr+"\n", 1)
	if err := os.WriteFile(n.cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
}

var qemuIOReport = regexp.MustCompile(`(?m)^.*ops; .*$`)

// timedQemuIO runs qemuIO and returns its wall time and qemu-io's own
// report lines.
func timedQemuIO(t *testing.T, url string, cmds ...string) (time.Duration, string) {
	t.Helper()
	start := time.Now()
	out := qemuIO(t, url, cmds...)
	return time.Since(start), strings.Join(qemuIOReport.FindAllString(out, -1), " | ")
}

func verifyClean(t *testing.T, n *node, image string) {
	t.Helper()
	if out := n.mustCLI("image", "verify", image); !strings.Contains(out, "0 differ") || !strings.Contains(out, "64 compared") {
		t.Fatalf("verify %s: %s\nn1 logs:\n%s", image, out, n.logs)
	}
}

// syncBack runs `image sync` through n until both copies are in sync.
func syncBack(t *testing.T, n *node, image string) {
	t.Helper()
	waitFor(t, 20*time.Second, "n2 back in sync", func() bool {
		n.cli("image", "sync", image)
		l := locations(t, n, image)
		return l["n1"] == 0 && l["n2"] == 0
	})
}

// TestPeerFaults puts a toxiproxy between n1 (the owner, where all writes
// go) and n2's copy: latency, connection resets and a stalled peer. Writes
// through n1 must be acknowledged, n2 marked out of sync for exactly what
// it missed, sync must repair it, and at the end n2 alone must hold every
// acknowledged write.
func TestPeerFaults(t *testing.T) {
	const img = "flt"
	const copyTO = time.Second
	consul := consultest.Start(t, consultest.Persistent(t.TempDir()))
	c := &cluster{t: t, consul: consul}
	n1 := newClusterNode(t, "n1", clusterOpts{consul: consul.Addr, copyTO: copyTO, labels: map[string]string{"zone": "a"}})
	n1.start()
	n2 := newClusterNode(t, "n2", clusterOpts{consul: consul.Addr, join: []string{n1.gossip}, labels: map[string]string{"zone": "a"}})
	px := newFaultProxy(t, n2.peer)
	setPeerAdvertise(t, n2, px.addr)
	n2.start()
	n3 := newClusterNode(t, "n3", clusterOpts{consul: consul.Addr, join: []string{n1.gossip}, labels: map[string]string{"zone": "b"}})
	n3.start()
	c.nodes = []*node{n1, n2, n3}
	for _, n := range c.nodes {
		c.waitState(c.nodes, n.name, "alive", 20*time.Second)
	}
	n1.mustCLI("image", "create", img, "--size", "64M", "--block-size", "1M", "--locations", "n1,n2")
	url := n1.url(img)
	inSync := func(when string) {
		t.Helper()
		if l := locations(t, n1, img); l["n1"] != 0 || l["n2"] != 0 {
			t.Fatalf("%s: copies out of sync: %v\nn1 logs:\n%s", when, l, n1.logs)
		}
	}

	// 1. 50 ms each way: slower, but both copies take every write.
	d0, r0 := timedQemuIO(t, url, "write -P 0x11 0 8M", "flush")
	inSync("after the write without latency")
	px.add(`{"name":"lat_up","type":"latency","stream":"upstream","attributes":{"latency":50}}`)
	px.add(`{"name":"lat_down","type":"latency","stream":"downstream","attributes":{"latency":50}}`)
	d1, r1 := timedQemuIO(t, url, "write -P 0x12 8M 8M", "flush")
	t.Logf("8 MiB write through n1: %v without latency (%s), %v with 50 ms each way to n2 (%s)", d0.Round(time.Millisecond), r0, d1.Round(time.Millisecond), r1)
	inSync("after the write with 50 ms latency")
	verifyClean(t, n1, img) // verify reads n2's copy through the latency too
	px.remove("lat_up")
	px.remove("lat_down")

	// 2. Connections to n2 reset: the write is acknowledged (n1 has it),
	// n2 is out of sync for exactly the 4 blocks written.
	px.add(`{"name":"reset","type":"reset_peer","stream":"upstream","attributes":{"timeout":0}}`)
	d2, _ := timedQemuIO(t, url, "write -P 0x22 16M 4M", "flush")
	l := locations(t, n1, img)
	t.Logf("4 MiB write with n2's connections reset: %v; out of sync %v", d2.Round(time.Millisecond), l)
	if l["n1"] != 0 || l["n2"] != 4 {
		t.Fatalf("after writing blocks 16-19 with n2's connections reset: %v (want n1 0, n2 4)\nn1 logs:\n%s", l, n1.logs)
	}
	px.remove("reset")
	syncBack(t, n1, img)
	verifyClean(t, n1, img)

	// 3. n2 stalls (accepts, never answers): the write is acknowledged
	// within the peer timeout plus a margin, n2 is out of sync for it.
	px.add(`{"name":"stall","type":"timeout","stream":"upstream","attributes":{"timeout":0}}`)
	d3, r3 := timedQemuIO(t, url, "write -P 0x33 32M 2M", "flush")
	l = locations(t, n1, img)
	t.Logf("2 MiB write+flush with n2 stalled (peer.timeout %v): %v (%s); out of sync %v", copyTO, d3.Round(time.Millisecond), r3, l)
	if d3 > 10*time.Second {
		t.Fatalf("a write with a stalled copy took %v (peer.timeout %v)\nn1 logs:\n%s", d3, copyTO, n1.logs)
	}
	if l["n1"] != 0 || l["n2"] != 2 {
		t.Fatalf("after writing blocks 32-33 with n2 stalled: %v (want n1 0, n2 2)\nn1 logs:\n%s", l, n1.logs)
	}
	px.remove("stall")
	syncBack(t, n1, img)
	verifyClean(t, n1, img)

	// 4. No acknowledged write lost: n2 alone serves all of it.
	waitOwner(t, n3, img, "")
	n3.mustCLI("location", "remove", img, "n1")
	qemuIO(t, n2.url(img),
		"read -P 0x11 0 8M", "read -P 0x12 8M 8M", "read -P 0x22 16M 4M", "read -P 0 20M 12M",
		"read -P 0x33 32M 2M", "read -P 0 34M 30M")
}
