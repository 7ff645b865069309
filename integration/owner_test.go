package integration

import (
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Two sessions on different nodes, one owner: a migration destination
// logs in to n2 while the source writes through n1; what was acknowledged
// through n1 reads back through n2 at once, and writes through n2 are
// seen through n1.
func TestMigrationDestinationForwardsToTheOwner(t *testing.T) {
	c := newCluster(t, "n1", "n2", "n3")
	n1, n2 := c.nodes[0], c.nodes[1]
	n1.mustCLI("image", "create", "mig", "--size", "64M", "--block-size", "1M", "--locations", "n1,n2")
	n1.mustCLI("image", "attach", "mig", "--node", "n1")
	if m := n2.imageJSON("mig", false); m["owner"] != "n1" || m["attached"] != "n1" {
		t.Fatalf("after attach: owner %v attached %v", m["owner"], m["attached"])
	}
	// The source keeps writing numbered records through n1 while the
	// destination reads them through n2.
	var wg sync.WaitGroup
	stop := make(chan struct{})
	acked := make(chan int, 1000)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				close(acked)
				return
			default:
			}
			off := (i % 60) * 1024 * 1024
			if _, err := run(t, time.Minute, "qemu-io", "-f", "raw", "-c", fmt.Sprintf("write -P %d %d 64k", 1+i%250, off), "-c", "flush", n1.url("mig")); err != nil {
				t.Errorf("source write %d: %v", i, err)
				close(acked)
				return
			}
			acked <- i
		}
	}()
	checked := 0
	for i := range acked {
		off := (i % 60) * 1024 * 1024
		qemuIO(t, n2.url("mig"), fmt.Sprintf("read -P %d %d 64k", 1+i%250, off))
		checked++
		if checked == 20 {
			close(stop)
		}
	}
	wg.Wait()
	// The other way round: written through n2 (forwarded), read through n1.
	qemuIO(t, n2.url("mig"), "write -P 0x99 62M 1M", "flush")
	qemuIO(t, n1.url("mig"), "read -P 0x99 62M 1M")
	if m := n1.imageJSON("mig", false); m["owner"] != "n1" {
		t.Fatalf("the attached owner changed to %v", m["owner"])
	}
	// Explicit handover to n2.
	n1.mustCLI("image", "attach", "mig", "--node", "n2")
	if m := n1.imageJSON("mig", false); m["owner"] != "n2" {
		t.Fatalf("after attach to n2: owner %v", m["owner"])
	}
	qemuIO(t, n1.url("mig"), "read -P 0x99 62M 1M", "write -P 0x77 61M 1M", "flush")
	qemuIO(t, n2.url("mig"), "read -P 0x77 61M 1M")
	if out := n2.mustCLI("image", "verify", "mig"); !strings.Contains(out, "0 differ") {
		t.Fatalf("verify: %s", out)
	}
}

// kill -9 of the owner under a verified write load through another node:
// the load waits out the lease, the other node takes over, reconciles the
// dead owner's in-flight writes, and the load sees no error.
func TestOwnerKilledUnderLoadIsTakenOver(t *testing.T) {
	c := newCluster(t, "n1", "n2", "n3")
	n1, n2, n3 := c.nodes[0], c.nodes[1], c.nodes[2]
	n1.mustCLI("image", "create", "tk", "--size", "128M", "--block-size", "1M", "--locations", "n1,n2")
	n1.mustCLI("image", "attach", "tk", "--node", "n1")
	// The load goes through n2, which forwards to the owner n1.
	wait, out := fioVerifiedLoad(t, n2.url("tk"), "96m")
	waitFor(t, 30*time.Second, "the load to be under way", func() bool { return stats(t, n1).PeerBytesIn+stats(t, n2).PeerBytesIn > 8<<20 })
	start := time.Now()
	n1.kill9()
	// The membership sees n1 die, a survivor destroys its ownership
	// session, and the lock is free after its delay (1.1 lease TTL).
	waitFor(t, 20*time.Second, "another node to own the image", func() bool {
		m := n3.imageJSON("tk", false)
		return m["owner"] != "n1" && m["owner"] != "" && m["owner"] != nil
	})
	t.Logf("taken over %v after the owner was killed", time.Since(start).Round(time.Millisecond))
	if err := wait(); err != nil {
		t.Fatalf("the load saw an error while the owner died: %v\n%s", err, out)
	}
	t.Logf("load finished %v after the owner was killed", time.Since(start).Round(time.Millisecond))
	if m := n3.imageJSON("tk", false); m["owner"] == "n1" {
		t.Fatalf("n1 still owns the image after the load finished: %v", m)
	}
	if out := n3.mustCLI("image", "verify", "tk"); !strings.Contains(out, "0 differ") {
		t.Fatalf("verify after takeover: %s", out)
	}
	// The old owner comes back as a plain copy: fenced, it serves through
	// the new owner, and sync brings its copy back.
	n1.start()
	c.waitState(c.nodes, "n1", "alive", 20*time.Second)
	qemuIO(t, n1.url("tk"), "read 0 1M")
	waitFor(t, 60*time.Second, "n1's copy back in sync", func() bool {
		n3.cli("image", "sync", "tk")
		return locations(t, n3, "tk")["n1"] == 0
	})
	if out := n3.mustCLI("image", "verify", "tk"); !strings.Contains(out, "0 differ") {
		t.Fatalf("verify after n1's return: %s", out)
	}
}

// An owner killed and restarted within its session's TTL takes its saved
// session back, so its locks are still its own: I/O the other nodes
// forward to it must make it serve again (it takes the image back on the
// first forwarded command), not bounce between "ask the holder" and "I am
// not the owner" until the forwarder gives up.
func TestOwnerRestartedWithinTTLServesForwardedIO(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	n1, n2 := c.nodes[0], c.nodes[1]
	c.waitState(c.nodes, "n2", "alive", 20*time.Second)
	n1.mustCLI("image", "create", "rs", "--size", "16M", "--block-size", "1M", "--locations", "n1,n2")
	qemuIO(t, n1.url("rs"), "write -P 0x31 0 4M")
	waitOwner(t, n2, "rs", "n1")
	n1.kill9()
	n1.start()
	waitFor(t, 20*time.Second, "n1 to take its saved session back", func() bool {
		return strings.Contains(n1.logs.String(), "ownership session of the previous process still valid")
	})
	c.waitState([]*node{n2}, "n1", "alive", 20*time.Second)
	start := time.Now()
	qemuIO(t, n2.url("rs"), "read -P 0x31 0 4M", "write -P 0x32 4M 4M", "read -P 0x32 4M 4M")
	t.Logf("I/O through n2 served %v after n1's restart", time.Since(start).Round(time.Millisecond))
	if m := n2.imageJSON("rs", false); m["owner"] != "n1" {
		t.Fatalf("owner after the restart: %v, want n1 (it kept its lock)", m["owner"])
	}
}

// An attach hands the image over while the former owner's initiator keeps
// writing through it: the attaching node gets the lock (the former
// owner's I/O leaves the free lock to it, ownership.Yield, and is
// forwarded to it from then on), and the load sees no error. Before, the
// former owner's next write took the lock back the moment it was handed
// over, and the attach waited until it gave up (chaos seed 119).
func TestAttachHandsOverUnderLoad(t *testing.T) {
	c := newCluster(t, "n1", "n2", "n3")
	n1, n2, n3 := c.nodes[0], c.nodes[1], c.nodes[2]
	n1.mustCLI("image", "create", "ho", "--size", "16M", "--block-size", "1M", "--locations", "n1,n2")
	n1.mustCLI("image", "attach", "ho", "--node", "n1")
	var wg sync.WaitGroup
	var rounds atomic.Int64
	stop := make(chan struct{})
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			args := []string{"-f", "raw"}
			for j := range 16 {
				args = append(args, "-c", fmt.Sprintf("write -P %d %d 64k", 1+(i+j)%250, j*1024*1024))
			}
			args = append(args, "-c", "flush", n1.url("ho"))
			if out, err := run(t, time.Minute, "qemu-io", args...); err != nil || strings.Contains(out, "failed") {
				t.Errorf("write round %d through n1: %v %s", i, err, out)
				return
			}
			rounds.Add(1)
		}
	})
	waitRounds := func(n int64) {
		t.Helper()
		for deadline := time.Now().Add(2 * time.Minute); rounds.Load() < n; time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) || t.Failed() {
				close(stop)
				wg.Wait()
				t.Fatalf("the load through n1 did %d rounds, want %d", rounds.Load(), n)
			}
		}
	}
	waitRounds(3)
	start := time.Now()
	n3.mustCLI("image", "attach", "ho", "--node", "n2")
	took := time.Since(start)
	if m := n3.imageJSON("ho", false); m["owner"] != "n2" || m["attached"] != "n2" {
		t.Fatalf("after attach to n2 under load through n1: owner %v attached %v", m["owner"], m["attached"])
	}
	waitRounds(rounds.Load() + 3) // the load goes on, forwarded to n2
	close(stop)
	wg.Wait()
	if m := n3.imageJSON("ho", false); m["owner"] != "n2" {
		t.Fatalf("the load through n1 took the attached image back: owner %v", m["owner"])
	}
	if out := n2.mustCLI("image", "verify", "ho"); !strings.Contains(out, "0 differ") {
		t.Fatalf("verify: %s", out)
	}
	t.Logf("attach under load: %v, %d write rounds through n1", took, rounds.Load())
}
