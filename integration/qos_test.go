package integration

import (
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

// fioRate is what one fio run measured: operations and bytes per second.
type fioRate struct{ IOPS, BPS float64 }

// fioOn runs fio (random reads or writes of bs, iodepth depth) for
// runtime against an NBD socket of nbdServe, after a ramp second that
// is not measured (it takes an idle image's burst), and returns the rate.
func fioOn(t *testing.T, sock, rw, bs string, depth int, runtime time.Duration) fioRate {
	t.Helper()
	r, err := fioRun(t, sock, rw, bs, depth, time.Second, runtime)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// fioRun is fioOn for any goroutine, with a ramp of its own (not
// measured); it returns its failure.
func fioRun(t *testing.T, sock, rw, bs string, depth int, ramp, runtime time.Duration) (fioRate, error) {
	args := []string{"--name=q", "--ioengine=nbd", "--uri=nbd+unix:///?socket=" + sock, "--rw=" + rw, "--bs=" + bs,
		fmt.Sprintf("--iodepth=%d", depth), "--size=32m", "--time_based", fmt.Sprintf("--ramp_time=%dms", ramp.Milliseconds()),
		fmt.Sprintf("--runtime=%dms", runtime.Milliseconds()), "--output-format=json"}
	out, err := run(t, 2*time.Minute, "fio", args...)
	if err != nil {
		return fioRate{}, fmt.Errorf("fio %s: %v\n%s", rw, err, out)
	}
	var res struct {
		Jobs []struct {
			Read  fioDir `json:"read"`
			Write fioDir `json:"write"`
			Error int    `json:"error"`
		} `json:"jobs"`
	}
	if i := strings.Index(out, "{"); i >= 0 {
		out = out[i:]
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || len(res.Jobs) == 0 {
		return fioRate{}, fmt.Errorf("fio output: %v\n%s", err, out)
	}
	j := res.Jobs[0]
	if j.Error != 0 {
		return fioRate{}, fmt.Errorf("fio saw I/O error %d: QoS must delay, never fail", j.Error)
	}
	return fioRate{IOPS: j.Read.IOPS + j.Write.IOPS, BPS: j.Read.BWBytes + j.Write.BWBytes}, nil
}

type fioDir struct {
	IOPS    float64 `json:"iops"`
	BWBytes float64 `json:"bw_bytes"`
}

// within fails unless got is at most limit·(1+over) and at least
// limit·under: held, and not starved (a limiter that stopped I/O, or
// enforced a tenth of the limit, fails too).
func within(t *testing.T, what string, got, limit, under, over float64) {
	t.Helper()
	if got > limit*(1+over) || got < limit*under {
		t.Fatalf("%s: %.0f, want between %.0f and %.0f (limit %.0f)", what, got, limit*under, limit*(1+over), limit)
	}
	t.Logf("%s: %.0f (limit %.0f)", what, got, limit)
}

// sessionCommands is the commands count of n's only session on target
// image (-1 when there is none, or several).
func sessionCommands(t *testing.T, n *node, image string) int64 {
	t.Helper()
	var info struct {
		Sessions []struct {
			Target   string `json:"target"`
			Commands int64  `json:"commands"`
		} `json:"sessions"`
	}
	if err := json.Unmarshal([]byte(n.mustCLI("node", "info", "-o", "json")), &info); err != nil {
		t.Fatal(err)
	}
	found := int64(-1)
	for _, s := range info.Sessions {
		if strings.HasSuffix(s.Target, ":"+image) {
			if found >= 0 {
				return -1
			}
			found = s.Commands
		}
	}
	return found
}

// TestQoS runs fio over iSCSI (qemu-nbd) against real nodes: an image
// limited to 200 IOPS holds the limit while an unlimited image beside it
// on the same owner runs well above it; a change to a read bandwidth
// limit takes effect on the session already logged in (no reconnect);
// after ownership moves to another node (attach), the new owner holds
// the limit it read from the record.
func TestQoS(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	logsOnFailure(t, c)
	n1, n2 := c.nodes[0], c.nodes[1]
	for _, img := range []string{"lim", "free"} {
		n1.mustCLI("image", "create", img, "--size", "64M", "--block-size", "1M", "--locations", "n1,n2")
		n1.mustCLI("image", "attach", img, "--node", "n1")
	}
	const iops = 200
	if out := n1.mustCLI("image", "set", "lim", "--iops-limit", fmt.Sprint(iops)); !strings.Contains(out, "iops 200/s") {
		t.Fatalf("image set: %q", out)
	}
	if q, _ := n2.imageJSON("lim", false)["qos"].(map[string]any); q["iops_limit"] != float64(iops) {
		t.Fatalf("image info -o json: qos %v", q)
	}
	if out := n2.mustCLI("image", "info", "lim"); !strings.Contains(out, "qos:") || !strings.Contains(out, "iops 200/s") {
		t.Fatalf("image info does not show the limit:\n%s", out)
	}
	if _, ok := n2.imageJSON("free", false)["qos"]; ok {
		t.Fatal("an image without limits shows qos")
	}

	// Both at once through n1, the owner of both.
	limSock, _ := nbdServe(t, n1.url("lim"))
	freeSock, _ := nbdServe(t, n1.url("free"))
	var lim, free fioRate
	var limErr, freeErr error
	var wg sync.WaitGroup
	wg.Go(func() { lim, limErr = fioRun(t, limSock, "randread", "4k", 16, time.Second, 4*time.Second) })
	wg.Go(func() { free, freeErr = fioRun(t, freeSock, "randread", "4k", 16, time.Second, 4*time.Second) })
	wg.Wait()
	if limErr != nil || freeErr != nil {
		t.Fatalf("limited: %v; unlimited: %v", limErr, freeErr)
	}
	within(t, "limited image, IOPS", lim.IOPS, iops, 0.5, 0.1)
	if free.IOPS < 3*iops {
		t.Fatalf("the unlimited image beside it ran %.0f IOPS, want well above the other's limit (%d)", free.IOPS, 3*iops)
	}
	t.Logf("unlimited neighbour: %.0f IOPS", free.IOPS)

	// A live change on the same session: the IOPS limit goes, a read
	// bandwidth limit of 2M/s comes (512 4k reads a second).
	before := sessionCommands(t, n1, "lim")
	n2.mustCLI("image", "set", "lim", "--iops-limit", "0", "--read-bw-limit", "2M")
	waitFor(t, 10*time.Second, "n1 applies the new limits", func() bool {
		q, _ := n1.imageJSON("lim", false)["qos"].(map[string]any)
		return q["read_bw_limit"] == float64(2<<20) && q["iops_limit"] == nil
	})
	lim = fioOn(t, limSock, "randread", "4k", 16, 4*time.Second)
	within(t, "after the live change, read bytes/s", lim.BPS, 2<<20, 0.5, 0.1)
	if lim.IOPS < 1.5*iops {
		t.Fatalf("after the IOPS limit was removed: %.0f IOPS, want above the old limit %d", lim.IOPS, iops)
	}
	if after := sessionCommands(t, n1, "lim"); before < 0 || after < before+int64(lim.IOPS*3) {
		t.Fatalf("the session's commands went from %d to %d: the initiator reconnected, or the change was not measured on it", before, after)
	}

	// Writes under a write limit; reads are not held by it.
	n1.mustCLI("image", "set", "lim", "--clear-qos", "--write-iops-limit", "150")
	waitFor(t, 10*time.Second, "n1 applies the write limit", func() bool {
		q, _ := n1.imageJSON("lim", false)["qos"].(map[string]any)
		return q["write_iops_limit"] == float64(150) && q["read_bw_limit"] == nil
	})
	within(t, "write IOPS under a write limit", fioOn(t, limSock, "randwrite", "4k", 16, 4*time.Second).IOPS, 150, 0.5, 0.1)
	if r := fioOn(t, limSock, "randread", "4k", 16, 3*time.Second); r.IOPS < 3*150 {
		t.Fatalf("reads under a write limit: %.0f IOPS, want well above it", r.IOPS)
	}

	// Ownership moves to n2: it reads the limit with the record and
	// holds it, for I/O through it and forwarded from n1.
	n1.mustCLI("image", "set", "lim", "--clear-qos", "--iops-limit", fmt.Sprint(iops))
	n1.mustCLI("image", "attach", "lim", "--node", "n2")
	n2Sock, _ := nbdServe(t, n2.url("lim"))
	waitFor(t, 30*time.Second, "n2 owns lim", func() bool {
		qemuIO(t, n2.url("lim"), "read 0 4k")
		return n2.imageJSON("lim", false)["owner"] == "n2"
	})
	within(t, "after the handover, IOPS on the new owner", fioOn(t, n2Sock, "randread", "4k", 16, 4*time.Second).IOPS, iops, 0.5, 0.1)
	within(t, "after the handover, IOPS forwarded from the old owner", fioOn(t, limSock, "randread", "4k", 16, 4*time.Second).IOPS, iops, 0.5, 0.1)
	if out := n1.mustCLI("image", "verify", "lim"); !strings.Contains(out, "0 differ") {
		t.Fatalf("verify after the QoS runs: %s", out)
	}
}
