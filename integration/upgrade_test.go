package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// fioTimedLoad runs fio random writes for runtime against an iSCSI URL
// through qemu-nbd, verifying what it wrote as it goes (verify_backlog)
// and at the end; wait returns when fio ends and when it did.
func fioTimedLoad(t *testing.T, url, size string, runtime time.Duration) (wait func() (time.Time, error), out *strings.Builder) {
	t.Helper()
	sock, stopNBD := nbdServe(t, url)
	out = &strings.Builder{}
	fio := exec.Command("fio", "--name=load", "--ioengine=nbd", "--uri=nbd+unix:///?socket="+sock, "--rw=randwrite",
		"--bs=64k", "--iodepth=4", "--size="+size, "--time_based", fmt.Sprintf("--runtime=%ds", int(runtime.Seconds())),
		"--verify=crc32c", "--do_verify=1", "--verify_backlog=64", "--verify_fatal=1", "--verify_state_save=0")
	fio.Stdout, fio.Stderr = out, out
	if err := fio.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- fio.Wait() }()
	return func() (time.Time, error) {
		err := <-done
		at := time.Now()
		stopNBD()
		return at, err
	}, out
}

// TestRollingUpgrade follows docs/upgrade.md on three nodes: each in
// turn has its owners moved away (cordon --move-owners; its copies stay),
// is stopped, started again with a new binary (the same code built with
// another version string), rejoins, has its copies brought back in sync,
// and is uncordoned, which hands its owners back. Verified fio loads on
// every image run through the other nodes during each turn, one of them
// forwarded to the node's image before and after: none sees an error;
// the records the old binary wrote serve the new one; verify passes.
func TestRollingUpgrade(t *testing.T) {
	newBin := filepath.Join(t.TempDir(), "ukai-new")
	if out, err := run(t, 5*time.Minute, "go", "build", "-ldflags", "-X main.version=rolling-new", "-o", newBin, "../cmd/ukai"); err != nil {
		t.Fatalf("build the new binary: %v\n%s", err, out)
	}
	c := newCluster(t, "n1", "n2", "n3")
	logsOnFailure(t, c)
	nodes := c.nodes
	images := []string{"u1", "u2", "u3"}
	for i, img := range images {
		locs := nodes[i].name + "," + nodes[(i+1)%3].name // u1 n1,n2; u2 n2,n3; u3 n3,n1
		nodes[0].mustCLI("image", "create", img, "--size", "32M", "--block-size", "1M", "--locations", locs)
		qemuIO(t, nodes[0].url(img), fmt.Sprintf("write -P 0x%02x 0 32M", 0x71+i), "flush")
	}
	const runtime = 20 * time.Second
	for i, ni := range nodes {
		other := nodes[(i+1)%3]
		// u_i (a copy on ni) is owned by ni, as if its VM ran there; the
		// loads reach every image through another node.
		other.mustCLI("image", "attach", images[i], "--node", ni.name)
		type load struct {
			image string
			wait  func() (time.Time, error)
			out   *strings.Builder
		}
		var loads []load
		for _, img := range images {
			w, o := fioTimedLoad(t, other.url(img), "16m", runtime)
			loads = append(loads, load{img, w, o})
		}
		turn := time.Now()
		out := other.mustCLI("node", "cordon", ni.name, "--move-owners")
		if !strings.Contains(out, images[i]+": owner moved to") {
			t.Fatalf("turn %s: cordon --move-owners:\n%s", ni.name, out)
		}
		ni.stop()
		// Every node lists others to join (docs/upgrade.md): the first
		// node of the harness had none.
		rejoin(t, ni, other)
		ni.bin = newBin
		ni.start()
		waitFor(t, 30*time.Second, ni.name+" alive again with the new version, as its peers see it", func() bool {
			for _, n := range nodes {
				if n == ni {
					continue
				}
				v := view(t, n)[ni.name]
				if v.State != "alive" {
					return false
				}
			}
			return strings.Contains(other.mustCLI("node", "info", ni.name), "rolling-new")
		})
		waitFor(t, 60*time.Second, "the copies on "+ni.name+" back in sync", func() bool {
			for _, img := range images {
				for _, oos := range locations(t, other, img) {
					if oos != 0 {
						return false
					}
				}
			}
			return true
		})
		out = other.mustCLI("node", "uncordon", ni.name)
		if !strings.Contains(out, images[i]+": owner back on "+ni.name) {
			t.Fatalf("turn %s: uncordon:\n%s", ni.name, out)
		}
		turnTook := time.Since(turn)
		t.Logf("turn %s: owners moved, stopped, new binary started, copies in sync, owners back in %s", ni.name, turnTook.Round(100*time.Millisecond))
		for _, l := range loads {
			at, err := l.wait()
			if err != nil {
				t.Fatalf("turn %s: the load on %s saw an error: %v\n%s", ni.name, l.image, err, l.out)
			}
			if at.Before(turn.Add(turnTook)) {
				t.Fatalf("turn %s: the load on %s ended before the turn did (%s < %s): raise its runtime", ni.name, l.image, at.Sub(turn), turnTook)
			}
		}
		other.mustCLI("image", "detach", images[i])
	}
	for _, n := range nodes {
		if v := n.mustCLI("node", "info"); !strings.Contains(v, "rolling-new") {
			t.Fatalf("%s does not run the new binary:\n%s", n.name, v)
		}
	}
	for _, img := range images {
		if out := nodes[0].mustCLI("image", "verify", img); !strings.Contains(out, " 0 differ") {
			t.Fatalf("verify %s: %s", img, out)
		}
		// fio wrote the first 16 MiB; the rest is the first pattern.
		qemuIO(t, nodes[1].url(img), fmt.Sprintf("read -P 0x%02x 16M 16M", 0x71+slices.Index(images, img)))
	}
}

// rejoin makes sure n's config lists peer as a gossip seed.
func rejoin(t *testing.T, n, peer *node) {
	t.Helper()
	b, err := os.ReadFile(n.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	cfg := string(b)
	if strings.Contains(cfg, "  join: [") {
		return
	}
	bind := "gossip:\n  bind: " + n.gossip + "\n"
	if !strings.Contains(cfg, bind) {
		t.Fatalf("no gossip section in %s:\n%s", n.cfgPath, cfg)
	}
	cfg = strings.Replace(cfg, bind, bind+"  join: ["+peer.gossip+"]\n", 1)
	if err := os.WriteFile(n.cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
}
