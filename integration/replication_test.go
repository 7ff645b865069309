package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

type locView struct {
	Node      string `json:"node"`
	OutOfSync int64  `json:"out_of_sync"`
}

// locations returns node -> out_of_sync blocks from image info.
func locations(t *testing.T, n *node, image string) map[string]int64 {
	t.Helper()
	var info struct {
		Locations []locView `json:"locations"`
	}
	if err := json.Unmarshal([]byte(n.mustCLI("image", "info", image, "-o", "json")), &info); err != nil {
		t.Fatal(err)
	}
	out := map[string]int64{}
	for _, l := range info.Locations {
		out[l.Node] = l.OutOfSync
	}
	return out
}

func TestReplicatedImageSurvivesLossOfACopy(t *testing.T) {
	c := newCluster(t, "n1", "n2", "n3")
	n1, n2, n3 := c.nodes[0], c.nodes[1], c.nodes[2]
	n1.mustCLI("image", "create", "rep", "--size", "32M", "--block-size", "1M", "--locations", "n1,n2")
	qemuIO(t, n1.url("rep"), "write -P 0x5a 0 8M", "write -P 0xa5 20M 3M", "flush")
	// verify through a node that holds no copy: it runs on the owner.
	out := n3.mustCLI("image", "verify", "rep")
	if !strings.Contains(out, "0 differ") || !strings.Contains(out, "32 compared") {
		t.Fatalf("verify: %s", out)
	}
	if l := locations(t, n3, "rep"); l["n1"] != 0 || l["n2"] != 0 {
		t.Fatalf("copies out of sync after clean writes: %v", l)
	}
	// n1 dies: n2 serves the data from its own copy.
	n1.kill9()
	c.waitState([]*node{n2, n3}, "n1", "dead", 25*time.Second)
	qemuIO(t, n2.url("rep"), "read -P 0x5a 0 8M", "read -P 0 8M 12M", "read -P 0xa5 20M 3M")
	// Writes go on with one copy; n1 is out of sync for exactly those blocks.
	qemuIO(t, n2.url("rep"), "write -P 0x77 4M 2M", "flush")
	if l := locations(t, n3, "rep"); l["n1"] != 2 || l["n2"] != 0 {
		t.Fatalf("after writing blocks 4-5 without n1: %v", l)
	}
	// n1 comes back; sync brings it in sync, verify agrees.
	n1.start()
	c.waitState(c.nodes, "n1", "alive", 20*time.Second)
	waitFor(t, 30*time.Second, "n1 back in sync", func() bool {
		n3.cli("image", "sync", "rep")
		return locations(t, n3, "rep")["n1"] == 0
	})
	if out := n3.mustCLI("image", "verify", "rep"); !strings.Contains(out, "0 differ") {
		t.Fatalf("verify after sync: %s", out)
	}
	// Now n2's copy goes away: the data comes from n1 alone.
	n2.kill9()
	c.waitState([]*node{n1, n3}, "n2", "dead", 25*time.Second)
	qemuIO(t, n1.url("rep"), "read -P 0x5a 0 4M", "read -P 0x77 4M 2M", "read -P 0x5a 6M 2M", "read -P 0xa5 20M 3M")
}

func TestLocationRemoveRefusedThenRelocate(t *testing.T) {
	c := newCluster(t, "n1", "n2", "n3")
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range c.nodes {
				t.Logf("%s logs:\n%s", n.name, n.logs)
			}
		}
	})
	n1, n3 := c.nodes[0], c.nodes[2]
	n1.mustCLI("image", "create", "mv", "--size", "16M", "--block-size", "1M")
	qemuIO(t, n1.url("mv"), "write -P 0x42 0 16M", "flush")
	_, errOut, err := n1.cli("location", "remove", "mv", "n1")
	if err == nil || !strings.Contains(errOut, "last in-sync copy") && !strings.Contains(errOut, "needs 1 copies") {
		t.Fatalf("removing the only copy: %v %s", err, errOut)
	}
	n1.mustCLI("location", "add", "mv", "n3")
	if l := locations(t, n1, "mv"); l["n3"] != 16 {
		t.Fatalf("a new location must start out of sync: %v", l)
	}
	_, errOut, err = n1.cli("location", "remove", "mv", "n1")
	if err == nil || !strings.Contains(errOut, "last in-sync copy") {
		t.Fatalf("removing n1 before n3 is in sync: %v %s", err, errOut)
	}
	out := n1.mustCLI("image", "sync", "mv")
	if !strings.Contains(out, "16 copied") || !strings.Contains(out, "0 blocks still out of sync") {
		t.Fatalf("sync: %s", out)
	}
	n1.mustCLI("location", "remove", "mv", "n1")
	waitOwner(t, n3, "mv", "")
	qemuIO(t, n3.url("mv"), "read -P 0x42 0 16M")
	waitFor(t, 10*time.Second, "n1's file to go", func() bool {
		files, _ := filepath.Glob(filepath.Join(n1.dir, "data", "images", "*.img"))
		return len(files) == 0
	})
}

func TestMinCopiesFailsWritesInsteadOfLosingThem(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	n1, n2 := c.nodes[0], c.nodes[1]
	n1.mustCLI("image", "create", "safe", "--size", "8M", "--block-size", "1M", "--locations", "n1,n2", "--min-copies", "2")
	qemuIO(t, n1.url("safe"), "write -P 0x11 0 1M", "flush")
	n2.kill9()
	c.waitState([]*node{n1}, "n2", "dead", 25*time.Second)
	out, _ := run(t, time.Minute, "qemu-io", "-f", "raw", "-c", "write -P 0x22 0 1M", n1.url("safe"))
	if !strings.Contains(out, "write failed") {
		t.Fatalf("a write with one of two required copies was not refused:\n%s", out)
	}
	// Nothing reported success that was not stored twice: n2 comes back
	// and the copies agree.
	n2.start()
	c.waitState(c.nodes, "n2", "alive", 20*time.Second)
	waitFor(t, 30*time.Second, "copies in sync", func() bool {
		n1.cli("image", "sync", "safe")
		l := locations(t, n1, "safe")
		return l["n1"] == 0 && l["n2"] == 0
	})
	if out := n1.mustCLI("image", "verify", "safe"); !strings.Contains(out, "0 differ") {
		t.Fatalf("verify: %s", out)
	}
}

// fioVerifiedLoad runs fio random writes with crc32c verification against
// an iSCSI URL through qemu-nbd; wait waits for fio, then ends qemu-nbd's
// iSCSI session.
func fioVerifiedLoad(t *testing.T, url string, size string) (wait func() error, out *strings.Builder) {
	t.Helper()
	return fioVerifiedLoops(t, url, size, 1)
}

// fioVerifiedLoops is fioVerifiedLoad writing and verifying the region
// loops times (a longer load).
func fioVerifiedLoops(t *testing.T, url string, size string, loops int) (wait func() error, out *strings.Builder) {
	t.Helper()
	sock, stopNBD := nbdServe(t, url)
	out = &strings.Builder{}
	fio := exec.Command("fio", "--name=load", "--ioengine=nbd", "--uri=nbd+unix:///?socket="+sock, "--rw=randwrite",
		"--bs=64k", "--iodepth=8", "--size="+size, "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", fmt.Sprintf("--loops=%d", loops))
	fio.Stdout, fio.Stderr = out, out
	if err := fio.Start(); err != nil {
		t.Fatal(err)
	}
	return func() error {
		err := fio.Wait()
		stopNBD()
		return err
	}, out
}

// nbdServe serves an iSCSI URL over NBD through qemu-nbd on a Unix
// socket; stop ends qemu-nbd and its iSCSI session.
func nbdServe(t *testing.T, url string) (sock string, stop func()) {
	t.Helper()
	sock = filepath.Join(t.TempDir(), "nbd.sock")
	nbd := exec.Command("qemu-nbd", "-f", "raw", "--cache=none", "-k", sock, "--persistent", url)
	if err := nbd.Start(); err != nil {
		t.Fatal(err)
	}
	stop = sync.OnceFunc(func() { nbd.Process.Kill(); nbd.Wait() })
	t.Cleanup(stop)
	waitFor(t, 20*time.Second, "qemu-nbd socket", func() bool { _, err := os.Stat(sock); return err == nil })
	return sock, stop
}

func TestKillACopyUnderVerifiedLoad(t *testing.T) {
	c := newCluster(t, "n1", "n2", "n3")
	n1, n2, n3 := c.nodes[0], c.nodes[1], c.nodes[2]
	n1.mustCLI("image", "create", "busy", "--size", "256M", "--block-size", "1M", "--locations", "n1,n2")
	wait, out := fioVerifiedLoad(t, n1.url("busy"), "192m")
	// Kill n2 once the load is under way and writes reached both copies.
	waitFor(t, 30*time.Second, "200 commands of the load", func() bool {
		var info struct {
			Sessions []struct{ Commands int } `json:"sessions"`
		}
		json.Unmarshal([]byte(n1.mustCLI("node", "info", "-o", "json")), &info)
		return len(info.Sessions) > 0 && info.Sessions[0].Commands >= 200
	})
	n2.kill9()
	if err := wait(); err != nil {
		t.Fatalf("fio saw an error while a copy died: %v\n%s", err, out)
	}
	if !strings.Contains(out.String(), "err= 0") {
		t.Fatalf("fio reported errors:\n%s", out)
	}
	l := locations(t, n3, "busy")
	if l["n2"] == 0 || l["n1"] != 0 {
		t.Fatalf("after losing n2 mid-load: %v (n2 must be out of sync for the blocks written)", l)
	}
	t.Logf("n2 out of sync for %d of 256 blocks", l["n2"])
	n2.start()
	c.waitState(c.nodes, "n2", "alive", 20*time.Second)
	waitFor(t, 60*time.Second, "n2 back in sync", func() bool {
		n3.cli("image", "sync", "busy")
		return locations(t, n3, "busy")["n2"] == 0
	})
	if out := n3.mustCLI("image", "verify", "busy"); !strings.Contains(out, "0 differ") {
		t.Fatalf("verify: %s", out)
	}
	// Every acknowledged write is on n2 too: read the image through n2
	// alone (n1 removed) and compare with what n1 served.
	want := filepath.Join(t.TempDir(), "want.img")
	if o, err := run(t, 2*time.Minute, "qemu-img", "convert", "-f", "raw", "-O", "raw", n1.url("busy"), want); err != nil {
		t.Fatalf("%v %s", err, o)
	}
	waitOwner(t, n3, "busy", "")
	n3.mustCLI("location", "remove", "busy", "n1")
	got := filepath.Join(t.TempDir(), "got.img")
	if o, err := run(t, 2*time.Minute, "qemu-img", "convert", "-f", "raw", "-O", "raw", n2.url("busy"), got); err != nil {
		t.Fatalf("%v %s", err, o)
	}
	if o, err := run(t, time.Minute, "cmp", want, got); err != nil {
		t.Fatalf("n2's copy differs from what was acknowledged: %s", o)
	}
}
