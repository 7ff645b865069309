package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/cluster/consulkv/consultest"
)

// cluster is a Consul server (persistent, so it survives a restart) and
// ukai nodes that gossip with each other.
type cluster struct {
	t      *testing.T
	consul *consultest.Agent
	nodes  []*node
}

func newCluster(t *testing.T, names ...string) *cluster { return newClusterWith(t, "", names...) }

// newClusterWith is newCluster with more YAML in every node's config.
func newClusterWith(t *testing.T, extra string, names ...string) *cluster {
	c := &cluster{t: t, consul: consultest.Start(t, consultest.Persistent(t.TempDir()))}
	zones := []string{"a", "a", "b", "b", "c"}
	for i, name := range names {
		var join []string
		if i > 0 {
			join = []string{c.nodes[0].gossip}
		}
		n := newClusterNode(t, name, clusterOpts{consul: c.consul.Addr, join: join, labels: map[string]string{"zone": zones[i%len(zones)]}, extra: extra})
		n.start()
		c.nodes = append(c.nodes, n)
	}
	return c
}

type nodeView struct {
	Name   string            `json:"name"`
	State  string            `json:"state"`
	API    string            `json:"api_addr"`
	ISCSI  string            `json:"iscsi_addr"`
	Gossip string            `json:"gossip_addr"`
	Labels map[string]string `json:"labels"`
	Free   int64             `json:"free_bytes"`
	Images []string          `json:"images"`
}

// view returns `ukai node list -o json` as seen from n, by name.
func view(t *testing.T, n *node) map[string]nodeView {
	t.Helper()
	out, errOut, err := n.cli("node", "list", "-o", "json")
	if err != nil {
		t.Fatalf("node list on %s: %v %s", n.name, err, errOut)
	}
	var l []nodeView
	if err := json.Unmarshal([]byte(out), &l); err != nil {
		t.Fatal(err)
	}
	m := map[string]nodeView{}
	for _, v := range l {
		m[v.Name] = v
	}
	return m
}

// waitState waits until every node in observers sees name in state.
func (c *cluster) waitState(observers []*node, name, state string, timeout time.Duration) time.Duration {
	c.t.Helper()
	start := time.Now()
	waitFor(c.t, timeout, fmt.Sprintf("%s to be %s everywhere", name, state), func() bool {
		for _, o := range observers {
			if view(c.t, o)[name].State != state {
				return false
			}
		}
		return true
	})
	return time.Since(start)
}

func TestClusterMembership(t *testing.T) {
	c := newCluster(t, "n1", "n2", "n3")
	n1, n2, n3 := c.nodes[0], c.nodes[1], c.nodes[2]
	for _, n := range c.nodes {
		c.waitState(c.nodes, n.name, "alive", 20*time.Second)
	}
	v := view(t, n3)
	if v["n1"].API != n1.api || v["n1"].ISCSI != n1.portal || v["n1"].Gossip != n1.gossip || v["n3"].Labels["zone"] != "b" || v["n2"].Labels["zone"] != "a" {
		t.Fatalf("n3's view of the cluster: %+v", v)
	}
	if v["n1"].Free <= 0 {
		t.Fatalf("free space not gossiped: %+v", v["n1"])
	}

	// kill -9: seen dead by the others within 10 s.
	n2.kill9()
	d := c.waitState([]*node{n1, n3}, "n2", "dead", 10*time.Second)
	t.Logf("kill -9 of n2 seen as dead by n1 and n3 after %v", d)
	// It comes back.
	n2.start()
	c.waitState(c.nodes, "n2", "alive", 20*time.Second)
	// A clean stop is a leave, not a failure.
	n3.stop()
	c.waitState([]*node{n1, n2}, "n3", "left", 20*time.Second)
	n3.start()
	c.waitState([]*node{n1, n2, n3}, "n3", "alive", 20*time.Second)

	// A second node with a taken name is refused, and the cluster keeps
	// the first one.
	dup := newClusterNode(t, "n1", clusterOpts{consul: c.consul.Addr, join: []string{n2.gossip}})
	out, err := runWithTimeout(exec.Command(ukaiBin, "serve", "--config", dup.cfgPath), 30*time.Second)
	if err == nil || !strings.Contains(out, `node name "n1" is already used`) {
		t.Fatalf("a duplicate n1 was not refused clearly: %v\n%s", err, out)
	}
	if v := view(t, n3)["n1"]; v.State != "alive" || v.Gossip != n1.gossip {
		t.Fatalf("the duplicate changed the cluster's view of n1: %+v", v)
	}
}

func TestImagesVisibleFromEveryNode(t *testing.T) {
	c := newCluster(t, "n1", "n2", "n3")
	n1, n3 := c.nodes[0], c.nodes[2]
	n1.mustCLI("image", "create", "vm1", "--size", "64M", "--block-size", "1M")
	qemuIO(t, n1.url("vm1"), "write -P 0x61 0 2M")
	// The same answer from every node, without waiting: Consul is the source.
	a := n1.mustCLI("image", "info", "vm1", "-o", "json", "--blocks")
	b := n3.mustCLI("image", "info", "vm1", "-o", "json", "--blocks")
	if a != b {
		t.Fatalf("image info differs between n1 and n3:\n%s\n%s", a, b)
	}
	if l1, l3 := n1.mustCLI("image", "list", "-o", "json"), n3.mustCLI("image", "list", "-o", "json"); l1 != l3 || !strings.Contains(l3, `"vm1"`) {
		t.Fatalf("image list differs:\n%s\n%s", l1, l3)
	}
	// n1 holds it; every node exports it. Once n1 has released it (idle),
	// n3 serves it from n1's copy over the data transport.
	waitFor(t, 10*time.Second, "node list to show vm1 on n1", func() bool {
		v := view(t, n3)
		return len(v["n1"].Images) == 1 && v["n1"].Images[0] == "vm1" && len(v["n3"].Images) == 0
	})
	waitOwner(t, n3, "vm1", "")
	qemuIO(t, n3.url("vm1"), "read -P 0x61 0 2M", "read -P 0 2M 2M")
	// Deleted through n3: n1 withdraws the target.
	n3.mustCLI("image", "delete", "vm1")
	waitFor(t, 10*time.Second, "n1 to withdraw vm1", func() bool {
		ls, _ := run(t, 20*time.Second, "iscsi-ls", "iscsi://"+n1.portal)
		return !strings.Contains(ls, ":vm1")
	})
}

func consulPut(t *testing.T, addr, key string, val []byte) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPut, "http://"+addr+"/v1/kv/"+key, bytes.NewReader(val))
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("consul put %s: %v %v", key, err, resp)
	}
	resp.Body.Close()
}

func consulGet(t *testing.T, addr, key string) []byte {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/v1/kv/" + key + "?raw")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return b
}

func TestCorruptMetadataIsReportedNotFatal(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	n1, n2 := c.nodes[0], c.nodes[1]
	n1.mustCLI("image", "create", "good", "--size", "8M")
	consulPut(t, c.consul.Addr, "ukai/images/junk", []byte("{not json"))
	consulPut(t, c.consul.Addr, "ukai/images/future", []byte(`{"version":7,"name":"future"}`))
	for _, n := range c.nodes {
		out, errOut, err := n.cli("image", "list")
		if err != nil || !strings.Contains(out, "good") {
			t.Fatalf("list on %s: %v\n%s%s", n.name, err, out, errOut)
		}
		for _, key := range []string{"ukai/images/junk", "ukai/images/future"} {
			if !strings.Contains(errOut, key) {
				t.Fatalf("list on %s does not report %s:\n%s", n.name, key, errOut)
			}
		}
	}
	_, errOut, err := n2.cli("image", "info", "future")
	if err == nil || !strings.Contains(errOut, "ukai/images/future") || !strings.Contains(errOut, "unknown record version 7") {
		t.Fatalf("info of an unknown-version record: %v %s", err, errOut)
	}
	// Nothing was overwritten, nobody crashed, I/O works.
	if string(consulGet(t, c.consul.Addr, "ukai/images/junk")) != "{not json" {
		t.Fatal("a malformed value was rewritten")
	}
	qemuIO(t, n1.url("good"), "write -P 1 0 1M", "read -P 1 0 1M")
	for _, n := range c.nodes {
		if _, _, err := n.cli("version"); err != nil {
			t.Fatalf("%s died:\n%s", n.name, n.logs)
		}
	}
}

// A record whose id is a path, written into Consul by hand, is reported
// with its key and ignored: the node creates, opens or overwrites nothing
// outside its data dir for it (the id would make data_dir/images/<id>.img
// and <id>.json land in a directory beside data_dir).
func TestHostileImageIDStaysInDataDir(t *testing.T) {
	c := newCluster(t, "n1")
	n1 := c.nodes[0]
	outside := filepath.Join(n1.dir, "outside") // data/images/../../outside
	if err := os.MkdirAll(outside, 0o700); err != nil {
		t.Fatal(err)
	}
	// A file the id points at, of the size the record says, so that
	// nothing but the id stands between the node and it.
	victim := filepath.Join(outside, "victimvictimvictim.img")
	if err := os.WriteFile(victim, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(victim, 1<<20); err != nil {
		t.Fatal(err)
	}
	id := "../../outside/victimvictimvictim" // 32 bytes, as long as an id
	rec := `{"version":1,"id":"` + id + `","name":"evil","size":1048576,"block_size":1048576,` +
		`"created":"2026-11-28T13:00:00Z","locations":["n1"],"min_copies":1,"generation":1}`
	consulPut(t, c.consul.Addr, "ukai/images/evil", []byte(rec))
	n1.mustCLI("image", "create", "after", "--size", "8M")
	// A record written by hand rings no doorbell: the node reads it at its
	// next full listing (at start, then every 10 minutes).
	n1.stop()
	n1.start()
	waitFor(t, 15*time.Second, "n1 to report ukai/images/evil", func() bool {
		_, err := os.Stat(filepath.Join(outside, "victimvictimvictim.json"))
		return err == nil || strings.Contains(n1.logs.String(), "ukai/images/evil")
	})
	_, errOut, err := n1.cli("image", "list")
	if err != nil || !strings.Contains(errOut, "ukai/images/evil") {
		t.Errorf("image list does not report ukai/images/evil: %v\n%s", err, errOut)
	}
	waitFor(t, 15*time.Second, "n1 to export after", func() bool {
		return strings.Contains(n1.mustCLI("node", "info"), "after")
	})
	ents, _ := os.ReadDir(outside)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if len(names) != 1 || names[0] != "victimvictimvictim.img" {
		t.Errorf("files outside data_dir: %v, want only the victim", names)
	}
	if b, err := os.ReadFile(victim); err != nil || len(b) != 1<<20 || string(b[:8]) != "precious" {
		t.Errorf("the file the id points at was changed: %d bytes, %v", len(b), err)
	}
	if _, _, err := n1.cli("version"); err != nil {
		t.Fatalf("n1 died:\n%s", n1.logs)
	}
}

func TestConsulOutageKeepsIOGoing(t *testing.T) {
	c := newCluster(t, "n1")
	n1 := c.nodes[0]
	n1.mustCLI("image", "create", "vm", "--size", "64M")
	url := n1.url("vm")
	qemuIO(t, url, "write -P 0x11 0 4M")

	c.consul.Stop()
	// I/O that needs no metadata change goes on.
	qemuIO(t, url, "read -P 0x11 0 4M", "write -P 0x22 4M 4M", "read -P 0x22 4M 4M", "flush")
	// Changes fail and say why.
	_, errOut, err := n1.cli("image", "create", "other", "--size", "8M")
	if err == nil || !strings.Contains(errOut, "unreachable") {
		t.Fatalf("create with Consul down: %v %q", err, errOut)
	}
	// A node restarted while Consul is down serves its images from its cache.
	n1.stop()
	n1.start()
	qemuIO(t, url, "read -P 0x11 0 4M", "read -P 0x22 4M 4M")
	if !strings.Contains(n1.logs.String(), "unreachable") {
		t.Fatalf("the node did not report Consul unreachable:\n%s", n1.logs)
	}

	c.consul.Restart()
	waitFor(t, 60*time.Second, "the node to use Consul again", func() bool {
		_, _, err := n1.cli("image", "create", "other", "--size", "8M")
		return err == nil
	})
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("n1 logs:\n%s", n1.logs)
		}
	})
	// I/O on an image the node must take needs its ownership session
	// back: Consul restarted without the old one, which the node believes
	// gone on the second answer that says so (a renewal every 3.3 s).
	// Until then the I/O is NOT READY, which initiators retry.
	waitFor(t, 60*time.Second, "I/O on a new image after Consul came back", func() bool {
		_, err := run(t, time.Minute, "qemu-io", "-f", "raw", "-c", "write -P 3 0 1M", "-c", "read -P 3 0 1M", n1.url("other"))
		return err == nil
	})
	qemuIO(t, url, "read -P 0x22 4M 4M")
}

// waitOwner waits until image info (through n) names owner ("" = none).
func waitOwner(t *testing.T, n *node, image, owner string) {
	t.Helper()
	waitFor(t, 30*time.Second, fmt.Sprintf("owner of %s to be %q", image, owner), func() bool {
		m := n.imageJSON(image, false)
		o, _ := m["owner"].(string)
		return o == owner
	})
}
