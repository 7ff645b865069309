//go:build vm

package vm

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/cluster/consulkv/consultest"
)

// The Linux kernel's initiator as a hypervisor host uses it (a host guest,
// host_test.go), against nodes that advertise the addresses the guest
// reaches them at (iscsi.advertise: 10.0.2.100+i:3260, forwarded by QEMU to
// the nodes' loopback portals).

// startAdvertised starts nodes n1..nN; node i advertises guestPortal(i).
func startAdvertised(t *testing.T, consul string, count int) []*node {
	t.Helper()
	var nodes []*node
	for i := range count {
		var join []string
		if i > 0 {
			join = []string{nodes[0].gossip}
		}
		extra := fmt.Sprintf("  advertise: %s\n  chap_secret_store: consul\n", guestPortal(i))
		nodes = append(nodes, startNodeWith(t, fmt.Sprintf("n%d", i+1), string(rune('a'+i)), consul, join, extra))
	}
	return nodes
}

// twoNodeImage starts Consul and two advertising nodes (their logs
// printed if the test fails) and creates img with a copy on each; it
// returns the nodes and the image's IQN.
func twoNodeImage(t *testing.T, img, size string) (n1, n2 *node, iqn string) {
	t.Helper()
	agent := consultest.Start(t, consultest.Persistent(t.TempDir()))
	nodes := startAdvertised(t, agent.Addr, 2)
	t.Cleanup(func() { logsOnFailure(t, nodes...) })
	nodes[0].mustCLI("image", "create", img, "--size", size, "--block-size", "1M", "--locations", "n1,n2")
	return nodes[0], nodes[1], iqnPrefix + ":" + img
}

func logsOnFailure(t *testing.T, nodes ...*node) {
	if !t.Failed() {
		return
	}
	for _, n := range nodes {
		t.Logf("--- ukai %s (full log in %s):\n%s", n.name, n.log,
			grepFile(n.log, 40, "level=WARN", "level=ERROR", "panic", "took over", "takeover"))
	}
}

// writerScript is a guest script that starts a background writer on dev:
// record i is the 4 KiB at 4 KiB block base+i, "rec <i>" lines, written
// with O_DIRECT and a cache flush; /tmp/acks gets "ACK <i> <start> <end>"
// (guest uptimes) once it is acknowledged, "ERR <i> <start> <error>" when
// it fails (and it is tried again). It stops at /tmp/stop.
func writerScript(dev string, base int) string {
	return fmt.Sprintf(`
rm -f /tmp/stop /tmp/acks
cat > /tmp/writer <<'EOF'
i=0
while [ ! -e /tmp/stop ]; do
  yes "rec $i" | head -c 4096 > /tmp/w.rec
  t=$(cut -d' ' -f1 /proc/uptime)
  if dd if=/tmp/w.rec of=%[1]s bs=4096 seek=$((%[2]d + i)) count=1 oflag=direct conv=notrunc,fsync 2>/tmp/w.err; then
    echo "ACK $i $t $(cut -d' ' -f1 /proc/uptime)" >> /tmp/acks
    i=$((i+1))
  else
    echo "ERR $i $t $(tr '\n' ' ' < /tmp/w.err)" >> /tmp/acks
    sleep 1
  fi
done
echo "STOPPED $i" >> /tmp/acks
EOF
nohup sh /tmp/writer > /tmp/writer.log 2>&1 &
echo started`, dev, base)
}

// acks is the writer's log so far.
type acks struct {
	n    int       // records acknowledged
	errs []string  // ERR lines
	end  []float64 // end time (guest uptime) of each acknowledged record
	stop bool
}

func readAcks(t *testing.T, h *host) acks {
	t.Helper()
	out := h.mustRun(t, 30*time.Second, "cat /tmp/acks 2>/dev/null; true")
	var a acks
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		switch {
		case len(f) == 4 && f[0] == "ACK":
			i, _ := strconv.Atoi(f[1])
			e, _ := strconv.ParseFloat(f[3], 64)
			if i != a.n {
				t.Fatalf("writer acknowledged record %d after %d records", i, a.n)
			}
			a.n++
			a.end = append(a.end, e)
		case len(f) > 0 && f[0] == "ERR":
			a.errs = append(a.errs, l)
		case len(f) > 0 && f[0] == "STOPPED":
			a.stop = true
		}
	}
	return a
}

// waitAcks waits until the writer acknowledged at least n records.
func waitAcks(t *testing.T, h *host, n int, timeout time.Duration, what string) acks {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		a := readAcks(t, h)
		if a.n >= n {
			return a
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d records acknowledged after %v, want %d; errors: %v\n%s", what, a.n, timeout, n, a.errs,
				h.mustRun(t, 30*time.Second, "tail -5 /tmp/acks; cat /tmp/writer.log; iscsiadm -m session -P1 2>&1 | tail -20; dmsetup status 2>/dev/null; true"))
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// stopWriter stops the writer and returns its final log.
func stopWriter(t *testing.T, h *host) acks {
	t.Helper()
	h.mustRun(t, 2*time.Minute, `touch /tmp/stop; i=0; until grep -q STOPPED /tmp/acks; do i=$((i+1)); [ $i -le 1200 ] || exit 1; sleep 0.1; done`)
	return readAcks(t, h)
}

// verifyRecords reads the first n records back through dev and compares
// them with what the writer wrote.
func verifyRecords(t *testing.T, h *host, dev string, base, n int) {
	t.Helper()
	out, rc := h.run(t, 5*time.Minute, fmt.Sprintf(`
dd if=%[1]s of=/tmp/got bs=4096 skip=%[2]d count=%[3]d iflag=direct 2>/dev/null
i=0
while [ $i -lt %[3]d ]; do yes "rec $i" | head -c 4096; i=$((i+1)); done > /tmp/want
cmp /tmp/got /tmp/want && echo RECORDS OK`, dev, base, n))
	if rc != 0 || !strings.Contains(out, "RECORDS OK") {
		t.Fatalf("the %d acknowledged records read back through %s differ: %s", n, dev, out)
	}
	t.Logf("all %d acknowledged records read back through %s", n, dev)
}

// stallAfter is the longest the writer waited for an acknowledgement
// after at (guest uptime): the largest gap between two consecutive
// acknowledgements (or from at to the first) among those that came after
// at. ok is false when none came after it.
func stallAfter(a acks, at float64) (stall float64, ok bool) {
	prev := at
	for _, e := range a.end {
		if e <= at {
			prev = max(prev, e)
			continue
		}
		stall = max(stall, e-prev)
		prev, ok = e, true
	}
	return stall, ok
}

func uptime(t *testing.T, h *host) float64 {
	t.Helper()
	v, err := strconv.ParseFloat(strings.Fields(h.mustRun(t, 10*time.Second, "cat /proc/uptime"))[0], 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestKernelInitiator: discovery, CHAP set through iscsiadm's node
// settings, a pattern and a file system, the node killed and restarted
// during writes (the session recovers: no error, no lost write), logout.
func TestKernelInitiator(t *testing.T) {
	const img = "k1"
	n1, n2, iqn := twoNodeImage(t, img, "256M")

	h := startHost(t, "K", []string{n1.portal, n2.portal})
	const user, secret = "hv-k", "ukai-kernel-chap-1"
	secretFile := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secretFile, []byte(secret), 0o600); err != nil {
		t.Fatal(err)
	}
	n1.mustCLI("image", "export", img, "--initiator", h.iname, "--chap-user", user, "--chap-secret-file", secretFile)

	h.startIscsid(t)
	// Discovery through n2 names both nodes, each at the address the
	// guest reaches it at, each with its own portal group tag.
	disc := h.mustRun(t, time.Minute, "iscsiadm -m discovery -t sendtargets -p "+guestPortal(1))
	t.Logf("discovery through %s:\n%s", guestPortal(1), strings.TrimSpace(disc))
	tags := map[string]string{}
	for _, l := range strings.Split(disc, "\n") {
		f := strings.Fields(l)
		if len(f) == 2 && f[1] == iqn {
			addr, tag, _ := strings.Cut(f[0], ",")
			tags[addr] = tag
		}
	}
	if len(tags) != 2 || tags[guestPortal(0)] == "" || tags[guestPortal(1)] == "" || tags[guestPortal(0)] == tags[guestPortal(1)] {
		t.Fatalf("discovery does not name %s at %s and %s with a tag each: %v", iqn, guestPortal(0), guestPortal(1), tags)
	}
	p0 := fmt.Sprintf("-T %s -p %s", iqn, guestPortal(0))

	// Without CHAP the login is refused; with the node settings it works.
	if out, rc := h.run(t, time.Minute, "iscsiadm -m node "+p0+" --login"); rc == 0 {
		t.Fatalf("login without CHAP accepted:\n%s", out)
	}
	h.mustRun(t, 30*time.Second, fmt.Sprintf(`set -e
iscsiadm -m node %[1]s -o update -n node.session.auth.authmethod -v CHAP
iscsiadm -m node %[1]s -o update -n node.session.auth.username -v %[2]s
iscsiadm -m node %[1]s -o update -n node.session.auth.password -v %[3]s`, p0, user, secret))
	t0 := time.Now()
	dev := h.mustRun(t, 90*time.Second, "set -e; iscsiadm -m node "+p0+" --login > /dev/null\n"+diskScript(iqn, guestPortal(0), 30)+"\ndisk")
	dev = lastLine(dev)
	t.Logf("CHAP login through %s: %s in %v (host clock)", guestPortal(0), dev, time.Since(t0).Round(10*time.Millisecond))

	// A 64 MiB file system at the start, the writer's records from 128 MiB.
	h.mustRun(t, 3*time.Minute, fmt.Sprintf(`set -e
head -c 8388608 /dev/urandom > /tmp/pattern
mkfs.ext4 -F -q -b 4096 %[1]s 16384
mkdir -p /mnt/k
mount -t ext4 %[1]s /mnt/k
cp /tmp/pattern /mnt/k/pattern
sync
umount /mnt/k`, dev))

	const base = 32768 // 128 MiB in 4 KiB blocks
	h.mustRun(t, 30*time.Second, writerScript(dev, base))
	waitAcks(t, h, 20, 2*time.Minute, "before the restart")
	killedAt := uptime(t, h)
	n1.kill9()
	n1.launch()
	t.Logf("n1 killed and restarted (guest uptime %.1f)", killedAt)
	waitAcks(t, h, readAcks(t, h).n+30, 3*time.Minute, "after n1's restart")
	a := stopWriter(t, h)
	if len(a.errs) > 0 {
		t.Fatalf("the writer saw I/O errors across the restart: %v", a.errs)
	}
	stall, _ := stallAfter(a, killedAt)
	rec := grepFile(h.serial, 12, "conn error", "recover", "reset occurred")
	t.Logf("node restart during writes: %d records, no error, the writer stalled %.1f s (session recovery); kernel log:\n%s", a.n, stall, rec)
	verifyRecords(t, h, dev, base, a.n)
	h.mustRun(t, 3*time.Minute, fmt.Sprintf(`set -e
e2fsck -fn %[1]s
mount -t ext4 -o ro %[1]s /mnt/k
cmp /mnt/k/pattern /tmp/pattern
umount /mnt/k`, dev))

	h.mustRun(t, time.Minute, "iscsiadm -m node "+p0+" --logout")
	if out, rc := h.run(t, 10*time.Second, "test -b "+dev); rc == 0 {
		t.Fatalf("%s still exists after logout: %s", dev, out)
	}
}

var (
	rtpgIDRE    = regexp.MustCompile(`target port group id\s*:\s*0x([0-9a-fA-F]+)`)
	rtpgStateRE = regexp.MustCompile(`asymmetric access state\s*:\s*0x([0-9a-fA-F]+)`)
	relPortRE   = regexp.MustCompile(`(?i)Relative target port:\s*0x([0-9a-fA-F]+)`)
	tpgRE       = regexp.MustCompile(`(?i)Target port group:\s*0x([0-9a-fA-F]+)`)
)

// rtpg asks REPORT TARGET PORT GROUPS through dev (sg_rtpg): group -> state.
func rtpg(t *testing.T, h *host, dev string) map[int]int {
	t.Helper()
	out := h.mustRun(t, 30*time.Second, "sg_rtpg -d "+dev)
	ids, states := rtpgIDRE.FindAllStringSubmatch(out, -1), rtpgStateRE.FindAllStringSubmatch(out, -1)
	if len(ids) == 0 || len(ids) != len(states) {
		t.Fatalf("sg_rtpg %s: cannot read:\n%s", dev, out)
	}
	m := map[int]int{}
	for i := range ids {
		id, _ := strconv.ParseInt(ids[i][1], 16, 32)
		st, _ := strconv.ParseInt(states[i][1], 16, 32)
		m[int(id)] = int(st)
	}
	return m
}

// portOf is the relative target port and group of the path dev (sg_vpd).
func portOf(t *testing.T, h *host, dev string) (rel, group int, naa string) {
	t.Helper()
	out := h.mustRun(t, 30*time.Second, "sg_vpd -p di "+dev)
	r, g := relPortRE.FindStringSubmatch(out), tpgRE.FindStringSubmatch(out)
	n := regexp.MustCompile(`0x6[0-9a-f]{31}`).FindString(out)
	if r == nil || g == nil || n == "" {
		t.Fatalf("sg_vpd -p di %s: no relative port, group or NAA:\n%s", dev, out)
	}
	rv, _ := strconv.ParseInt(r[1], 16, 32)
	gv, _ := strconv.ParseInt(g[1], 16, 32)
	return int(rv), int(gv), n
}

// kernelState is the ALUA state the kernel's handler holds for a path.
func kernelState(t *testing.T, h *host, dev string) string {
	t.Helper()
	return strings.TrimSpace(h.mustRun(t, 10*time.Second, "cat /sys/block/"+strings.TrimPrefix(dev, "/dev/")+"/device/access_state"))
}

func waitKernelState(t *testing.T, h *host, dev, want string, timeout time.Duration) time.Duration {
	t.Helper()
	t0 := time.Now()
	for {
		got := kernelState(t, h, dev)
		if got == want {
			return time.Since(t0)
		}
		if time.Since(t0) > timeout {
			t.Fatalf("%s: the kernel holds %q after %v, want %q", dev, got, timeout, want)
		}
		// A command through the path lets the handler see the unit attention.
		h.run(t, 10*time.Second, "sg_turs "+dev+" > /dev/null 2>&1")
		time.Sleep(500 * time.Millisecond)
	}
}

// TestKernelMultipath: two nodes are two paths to one device; ALUA tells
// the kernel which is the owner's; a device-mapper multipath device (the
// kernel's alua handler, queue_if_no_path) writes through the owner's path;
// the owner is killed: I/O goes on through the other node once it took the
// image over, without an error and without losing a write; the owner comes
// back and its path returns, non-optimized.
func TestKernelMultipath(t *testing.T) {
	const img = "mp"
	n1, n2, iqn := twoNodeImage(t, img, "128M")
	n1.mustCLI("image", "attach", img, "--node", "n1")

	h := startHost(t, "M", []string{n1.portal, n2.portal})
	h.startIscsid(t)
	h.mustRun(t, time.Minute, "iscsiadm -m discovery -t sendtargets -p "+guestPortal(1)+" > /dev/null")
	// Multipath wants a failed path given up quickly (multipath.conf's
	// advice for iSCSI): I/O then moves to the other path instead of
	// waiting for this one's session for 120 s.
	h.mustRun(t, 30*time.Second, "iscsiadm -m node -T "+iqn+" -o update -n node.session.timeo.replacement_timeout -v 5")
	t0 := time.Now()
	h.mustRun(t, 2*time.Minute, "iscsiadm -m node -T "+iqn+" --login > /dev/null")
	devs := make([]string, 2)
	for i := range devs {
		devs[i] = lastLine(h.mustRun(t, time.Minute, diskScript(iqn, guestPortal(i), 30)+"\ndisk"))
	}
	t.Logf("logged in to both paths in %v: %v", time.Since(t0).Round(10*time.Millisecond), devs)

	// Each path: the same device, its own port; both report n1's group
	// active/optimized, n2's active/non-optimized, and the kernel agrees.
	rel0, grp0, naa0 := portOf(t, h, devs[0])
	rel1, grp1, naa1 := portOf(t, h, devs[1])
	if naa0 != naa1 || rel0 == rel1 || grp0 == grp1 {
		t.Fatalf("paths: NAA %s/%s relative port %d/%d group %d/%d: want one device, two ports", naa0, naa1, rel0, rel1, grp0, grp1)
	}
	for _, dev := range devs {
		st := rtpg(t, h, dev)
		if len(st) != 2 || st[grp0] != 0 || st[grp1] != 1 {
			t.Fatalf("REPORT TARGET PORT GROUPS through %s: %v, want group %d (n1, owner) 0 and %d (n2) 1", dev, st, grp0, grp1)
		}
	}
	if s0, s1 := kernelState(t, h, devs[0]), kernelState(t, h, devs[1]); s0 != "active/optimized" || s1 != "active/non-optimized" {
		t.Fatalf("the kernel's alua handler holds %q for n1's path and %q for n2's", s0, s1)
	}
	t.Logf("n1's path %s: port %d, group %d; n2's path %s: port %d, group %d; device %s", devs[0], rel0, grp0, devs[1], rel1, grp1, naa0)

	// Reservations and COMPARE AND WRITE hold across the paths: what one
	// node's path does is what the other's sees (both run on the owner's
	// LU). Each direction: a key registered and a write-exclusive
	// reservation taken through one path; READ KEYS and READ RESERVATION
	// through the other show them; the other path's write is refused
	// (reservation conflict), the holder's lands; then released.
	for i, holder := range devs {
		other := devs[1-i]
		key := fmt.Sprintf("0x%x", 0xb0+i)
		out := h.mustRun(t, 2*time.Minute, fmt.Sprintf(`set -e
yes h%[4]d | head -c 4096 > /tmp/h
yes o%[4]d | head -c 4096 > /tmp/o
sg_persist --out --register --param-sark=%[3]s %[1]s > /dev/null
sg_persist --out --reserve --param-rk=%[3]s --prout-type=1 %[1]s > /dev/null
echo "keys through the other path:"; sg_persist --in -k %[2]s
echo "reservation through the other path:"; sg_persist --in -r %[2]s
if dd if=/tmp/o of=%[2]s bs=4096 seek=%[5]d count=1 oflag=direct conv=notrunc,fsync 2>/tmp/err; then echo "OTHER WRITE LANDED"; else echo "other path's write refused: $(tr '\n' ' ' < /tmp/err)"; fi
dd if=/tmp/h of=%[1]s bs=4096 seek=%[5]d count=1 oflag=direct conv=notrunc,fsync 2>/dev/null
if dd if=%[2]s of=/tmp/r bs=4096 skip=%[5]d count=1 iflag=direct 2>/tmp/err && cmp /tmp/r /tmp/h; then echo "HOLDER'S WRITE READ BACK THROUGH THE OTHER PATH"; else echo "read through the other path: $(tr '\n' ' ' < /tmp/err)"; od -c /tmp/r | head -3; fi
sg_persist --out --release --param-rk=%[3]s --prout-type=1 %[2]s > /dev/null 2>&1 || true
sg_persist --out --release --param-rk=%[3]s --prout-type=1 %[1]s > /dev/null
sg_persist --out --register --param-rk=%[3]s --param-sark=0 %[1]s > /dev/null
echo "keys after:"; sg_persist --in -k %[2]s
echo "kernel: $(dmesg | grep -c -i 'reservation conflict') reservation conflicts"`, holder, other, key, i, 20000+i))
		t.Logf("reservation through %s, checked through %s:\n%s", holder, other, strings.TrimSpace(out))
		if strings.Contains(out, "kernel: 0 reservation conflicts") {
			t.Fatalf("the kernel saw no RESERVATION CONFLICT: the other path's write failed for another reason")
		}
		if !strings.Contains(out, key) || !strings.Contains(strings.ToLower(out), "write exclusive") ||
			strings.Contains(out, "OTHER WRITE LANDED") || !strings.Contains(out, "other path's write refused") ||
			!strings.Contains(out, "HOLDER'S WRITE READ BACK") || !strings.Contains(strings.ToLower(out[strings.Index(out, "keys after:"):]), "no registered") {
			t.Fatalf("a reservation through %s does not hold through %s", holder, other)
		}
	}
	// COMPARE AND WRITE through n2's path (not the owner), then a stale
	// one through n1's: the second must miscompare.
	out := h.mustRun(t, time.Minute, fmt.Sprintf(`set -e
yes x | head -c 512 > /tmp/x; yes y | head -c 512 > /tmp/y
dd if=/tmp/x of=%[1]s bs=512 seek=120000 count=1 oflag=direct conv=notrunc,fsync 2>/dev/null
cat /tmp/x /tmp/y > /tmp/xy
sg_compare_and_write --in=/tmp/xy --lba=120000 --num=1 %[2]s && echo "CAW THROUGH n2 OK"
set +e
sg_compare_and_write --quiet --in=/tmp/xy --lba=120000 --num=1 %[1]s; echo "stale CAW through n1: exit $?"
dd if=%[1]s bs=512 skip=120000 count=1 iflag=direct 2>/dev/null | cmp - /tmp/y && echo "READS y"`, devs[0], devs[1]))
	t.Logf("COMPARE AND WRITE across paths:\n%s", strings.TrimSpace(out))
	if !strings.Contains(out, "CAW THROUGH n2 OK") || !strings.Contains(out, "stale CAW through n1: exit 14") || !strings.Contains(out, "READS y") {
		t.Fatal("COMPARE AND WRITE across the paths did not behave as one device")
	}

	// The multipath device: the optimized path's group first, the kernel's
	// alua handler, I/O queued while no path is usable. A checker (what
	// multipathd's tur checker does) reinstates a failed path once it
	// answers TEST UNIT READY.
	h.mustRun(t, time.Minute, fmt.Sprintf(`set -e
mm() { cat /sys/block/${1#/dev/}/dev; }
size=$(blockdev --getsz %[1]s)
echo "0 $size multipath 1 queue_if_no_path 1 alua 2 1 round-robin 0 1 1 $(mm %[1]s) 1 round-robin 0 1 1 $(mm %[2]s) 1" | dmsetup create mp
cat > /tmp/checker <<'EOF'
while :; do
  for d in %[1]s %[2]s; do
    mm=$(cat /sys/block/${d#/dev/}/dev 2>/dev/null) || continue
    if dmsetup status mp | grep -q " $mm F " && sg_turs $d > /dev/null 2>&1; then
      dmsetup message mp 0 reinstate_path $mm && echo "$(cut -d' ' -f1 /proc/uptime) reinstated $d" >> /tmp/checker.log
    fi
  done
  sleep 2
done
EOF
nohup sh /tmp/checker > /dev/null 2>&1 &
dmsetup table mp; dmsetup status mp`, devs[0], devs[1]))
	const mp = "/dev/mapper/mp"
	h.mustRun(t, 30*time.Second, writerScript(mp, 0))
	waitAcks(t, h, 30, 2*time.Minute, "through the multipath device")

	// Kill the owner.
	killedAt := uptime(t, h)
	n1.kill9()
	t.Logf("n1 (the owner) killed at guest uptime %.1f", killedAt)
	before := readAcks(t, h).n
	a := waitAcks(t, h, before+30, 3*time.Minute, "after the owner was killed")
	failover, ok := stallAfter(a, killedAt)
	if !ok {
		t.Fatal("no write acknowledged after the kill")
	}
	status := h.mustRun(t, 10*time.Second, "dmsetup status mp")
	t.Logf("failover: the writer waited at most %.1f s for a write after the kill; dmsetup status: %s", failover, strings.TrimSpace(status))
	if len(a.errs) > 0 {
		t.Fatalf("the writer saw I/O errors: %v", a.errs)
	}
	if failover > 30 {
		t.Errorf("failover took %.1f s, want under 30 s", failover)
	}
	var info imageInfo
	if err := json.Unmarshal([]byte(n2.mustCLI("image", "info", img, "-o", "json")), &info); err != nil {
		t.Fatal(err)
	}
	if info.Owner != "n2" {
		t.Fatalf("n2 serves the writes but the owner is %q", info.Owner)
	}
	d := waitKernelState(t, h, devs[1], "active/optimized", 30*time.Second)
	t.Logf("the kernel holds n2's path active/optimized %v after the check began", d.Round(10*time.Millisecond))

	// n1 comes back: its session logs in again, the checker reinstates its
	// path, which is now non-optimized.
	backAt := uptime(t, h)
	n1.launch()
	t0 = time.Now()
	for {
		st := h.mustRun(t, 10*time.Second, "dmsetup status mp; cat /tmp/checker.log 2>/dev/null; true")
		mm := strings.TrimSpace(h.mustRun(t, 10*time.Second, "cat /sys/block/"+strings.TrimPrefix(devs[0], "/dev/")+"/dev"))
		if strings.Contains(st, " "+mm+" A ") {
			t.Logf("n1's path %s active again %v after n1's restart:\n%s", devs[0], time.Since(t0).Round(100*time.Millisecond), strings.TrimSpace(st))
			break
		}
		if time.Since(t0) > 3*time.Minute {
			t.Fatalf("n1's path %s not reinstated 3 min after n1's restart:\n%s\n%s", devs[0], st,
				h.mustRun(t, 30*time.Second, "iscsiadm -m session -P1 2>&1 | tail -30; tail -30 /tmp/iscsid.log; cat /sys/block/"+strings.TrimPrefix(devs[0], "/dev/")+"/device/state"))
		}
		time.Sleep(time.Second)
	}
	waitKernelState(t, h, devs[0], "active/non-optimized", 30*time.Second)
	if st := rtpg(t, h, devs[0]); st[grp0] != 1 || st[grp1] != 0 {
		t.Fatalf("after n1's return, REPORT TARGET PORT GROUPS through n1: %v, want n1's group %d non-optimized, n2's %d optimized", st, grp0, grp1)
	}
	a = waitAcks(t, h, readAcks(t, h).n+20, 2*time.Minute, "after n1's return")
	a = stopWriter(t, h)
	if len(a.errs) > 0 {
		t.Fatalf("the writer saw I/O errors: %v", a.errs)
	}
	gaps := make([]float64, 0, len(a.end))
	for i := 1; i < len(a.end); i++ {
		if a.end[i-1] > backAt {
			gaps = append(gaps, a.end[i]-a.end[i-1])
		}
	}
	sort.Float64s(gaps)
	if len(gaps) > 0 {
		t.Logf("after n1's return: %d writes, the longest gap between two acknowledgements %.2f s", len(gaps), gaps[len(gaps)-1])
	}
	verifyRecords(t, h, mp, 0, a.n)
	// And through each path alone.
	for _, dev := range devs {
		verifyRecords(t, h, dev, 0, a.n)
	}
	h.mustRun(t, time.Minute, "dmsetup remove mp && iscsiadm -m node -T "+iqn+" --logout > /dev/null")
}
