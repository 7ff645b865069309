//go:build vm

package vm

// A hypervisor host in a guest: QEMU (TCG) boots the Debian kernel with
// setup.sh's initrd_host (busybox, open-iscsi, sg3-utils, dmsetup,
// e2fsprogs, the iSCSI, SCSI, device-mapper, ext4 and virtio-net modules)
// and integration/vm/init-host, which serves a command agent on the guest's
// second serial port (the protocol is described at the top of init-host).
// The test drives the Linux kernel's iSCSI initiator through it like a
// remote shell.
//
// Networking never leaves loopback: QEMU's user-mode network is restricted
// (the guest reaches nothing but what is forwarded), and portal i of
// startHost is forwarded from 10.0.2.(100+i):3260 inside the guest to the
// node's 127.0.0.1 portal, by a socat that QEMU starts per connection.

import (
	"bufio"
	"bytes"
	"crypto/md5"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/cluster/consulkv/consultest"
)

// host is a QEMU guest with the kernel's iSCSI initiator, driven through
// its command agent.
type host struct {
	*machine
	iname    string        // its initiator name
	boot     time.Duration // QEMU start to AGENT READY
	uptime   string        // the guest's uptime at AGENT READY (s)
	conn     net.Conn      // the agent's serial port
	lines    chan string   // lines from the agent
	closed   chan struct{} // closed when conn is closed
	mu       sync.Mutex    // one command at a time
	seq      int           // the last command id
	startErr string        // why the agent connection ended, if it did
}

// guestPortal is where portal i of startHost is reached inside the guest.
func guestPortal(i int) string { return fmt.Sprintf("10.0.2.%d:3260", 100+i) }

var inameRE = regexp.MustCompile(`[^a-z0-9.:-]+`)

// startHost boots a host guest whose guestPortal(i) forwards to portals[i]
// (loopback addresses only) and waits until its agent answers.
func startHost(t *testing.T, label string, portals []string) *host {
	t.Helper()
	if initrdHost == "" {
		t.Fatal("setup.sh printed no initrd_host=")
	}
	if len(portals) > 100 {
		t.Fatalf("%d portals: at most 100", len(portals))
	}
	m := &machine{
		name:   label,
		serial: filepath.Join(artifacts, label+".console"),
		stderr: filepath.Join(artifacts, label+".qemu"),
		qmp:    filepath.Join(artifacts, label+".qmp"),
		done:   make(chan struct{}),
	}
	h := &host{
		machine: m,
		iname:   "iqn.2026-11.io.ukai.test:" + inameRE.ReplaceAllString(strings.ToLower(label), "-"),
		lines:   make(chan string, 16),
		closed:  make(chan struct{}),
	}
	sock := filepath.Join(artifacts, label+".agent")
	netdev := "user,id=n0,restrict=on"
	for i, p := range portals {
		hp, _, err := net.SplitHostPort(p)
		if ip := net.ParseIP(hp); err != nil || ip == nil || !ip.IsLoopback() {
			t.Fatalf("portal %q: only loopback portals may be forwarded to the guest", p)
		}
		// -lf /dev/null: socat's own error text must not reach the guest's
		// TCP stream (the initiator would read it as a PDU).
		// retry: QEMU's user-mode stack accepts the guest's connection
		// before socat connects on; a refused connect closed the accepted
		// one at once, which a real network never does (the initiator's
		// SYN is refused or unanswered), and iscsid then looped on "can't
		// bind conn ... -107" for good after the node came back (seen in 1
		// of 4 TestKernelMultipath runs). Retrying for 30 s makes a dead
		// node look like an unreachable one.
		netdev += fmt.Sprintf(",guestfwd=tcp:%s-cmd:socat -lf /dev/null - TCP:%s,,retry=60,,interval=0.5", guestPortal(i), p) // ",," is a comma inside a QEMU option value
	}
	args := []string{
		"-name", "ukai-vm-" + label,
		"-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "1",
		"-display", "none", "-no-reboot", "-nodefaults",
		"-kernel", kernel, "-initrd", initrdHost,
		"-append", "console=ttyS0 quiet panic=-1 ukai.iname=" + h.iname,
		"-netdev", netdev,
		"-device", "virtio-net-pci,netdev=n0",
		"-serial", "file:" + m.serial, // ttyS0: the console
		"-chardev", "socket,id=agent,path=" + sock + ",server=on,wait=off",
		"-serial", "chardev:agent", // ttyS1: the agent
		"-qmp", "unix:" + m.qmp + ",server=on,wait=off",
		"-monitor", "none",
	}
	errf, err := os.Create(m.stderr)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(errf, "# qemu-system-x86_64 %s\n", strings.Join(args, " "))
	t0 := time.Now()
	m.cmd = exec.Command("qemu-system-x86_64", args...)
	m.cmd.Stdout, m.cmd.Stderr = errf, errf
	if err := m.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { m.err = m.cmd.Wait(); errf.Close(); close(m.done) }()
	t.Cleanup(m.kill)
	t.Logf("%s: QEMU pid %d, host guest %s, portals %v", label, m.cmd.Process.Pid, h.iname, portals)

	// Connect before the guest boots: QEMU drops what the guest writes to
	// the port while no client is connected.
	deadline := time.Now().Add(30 * time.Second)
	for {
		if h.conn, err = net.Dial("unix", sock); err == nil {
			break
		}
		if m.exited() || time.Now().After(deadline) {
			t.Fatalf("%s: agent socket %s: %v\n%s", label, sock, err, m.describe())
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Cleanup(func() { close(h.closed); h.conn.Close() })
	go h.read()

	readyRE := regexp.MustCompile(`(?m)^AGENT READY uptime=([0-9.]+)`)
	m.waitConsole(t, 3*time.Minute, "AGENT READY", func() bool { return readyRE.MatchString(m.console()) })
	h.boot = time.Since(t0)
	h.uptime = readyRE.FindStringSubmatch(m.console())[1]
	for _, l := range strings.Split(m.console(), "\n") {
		if strings.HasPrefix(l, "insmod ") || strings.HasPrefix(l, "modules not in") || strings.HasPrefix(l, "GUEST FAIL") {
			t.Logf("%s: %s", label, strings.TrimSpace(l))
		}
	}
	h.ping(t)
	t.Logf("%s: agent ready %v after QEMU started (guest uptime %s s)", label, h.boot.Round(10*time.Millisecond), h.uptime)
	return h
}

// read passes the agent's lines to h.lines until the connection closes.
func (h *host) read() {
	defer close(h.lines)
	r := bufio.NewReaderSize(h.conn, 1<<16)
	for {
		l, err := r.ReadString('\n')
		if err != nil {
			return
		}
		select {
		case h.lines <- strings.TrimRight(l, "\r\n"):
		case <-h.closed:
			return
		}
	}
}

// send writes one line to the agent, after a newline that ends any partial
// line.
func (h *host) send(t *testing.T, timeout time.Duration, line string) {
	t.Helper()
	h.conn.SetWriteDeadline(time.Now().Add(timeout))
	if _, err := h.conn.Write([]byte("\n" + line + "\n")); err != nil {
		t.Fatalf("%s: writing to the agent: %v\n%s", h.name, err, h.describe())
	}
}

// await returns the next agent line for which match returns true; other
// lines (late answers to commands given up on) are dropped.
func (h *host) await(t *testing.T, timeout time.Duration, what string, match func(string) bool) string {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case l, ok := <-h.lines:
			if !ok {
				t.Fatalf("%s: the agent's serial port closed while waiting for %s\n%s", h.name, what, h.describe())
			}
			if match(l) {
				return l
			}
			if l != "" {
				if len(l) > 80 {
					l = l[:80] + "..."
				}
				t.Logf("%s: agent: ignoring %q", h.name, l)
			}
		case <-h.done:
			t.Fatalf("%s: QEMU exited while waiting for %s\n%s", h.name, what, h.describe())
		case <-deadline:
			t.Fatalf("%s: no %s from the agent within %v\n%s", h.name, what, timeout, h.describe())
		}
	}
}

func (h *host) ping(t *testing.T) {
	t.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	h.seq++
	want := fmt.Sprintf("PONG %d", h.seq)
	h.send(t, 10*time.Second, fmt.Sprintf("PING %d", h.seq))
	h.await(t, 30*time.Second, want, func(l string) bool { return l == want })
}

// run runs a shell script in the guest and returns its output (stdout and
// stderr) and exit code. The guest kills the script after timeout: rc is
// then -1. A guest that does not answer within timeout + 30 s fails the
// test.
func (h *host) run(t *testing.T, timeout time.Duration, script string) (out string, rc int) {
	t.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	h.seq++
	id := h.seq
	secs := max(1, int(math.Ceil(timeout.Seconds())))
	t0 := time.Now()
	h.send(t, timeout+30*time.Second, fmt.Sprintf("CMD %d %d %s", id, secs, base64.StdEncoding.EncodeToString([]byte(script))))
	prefix := fmt.Sprintf("END %d ", id)
	l := h.await(t, timeout+30*time.Second, fmt.Sprintf("the end of command %d (%.60q)", id, script),
		func(l string) bool { return strings.HasPrefix(l, prefix) })
	f := strings.SplitN(l[len(prefix):], " ", 3)
	if len(f) < 2 {
		t.Fatalf("%s: garbled answer %.200q", h.name, l)
	}
	rc, err1 := strconv.Atoi(f[0])
	n, err2 := strconv.Atoi(f[1])
	var b []byte
	var err3 error
	if len(f) == 3 {
		b, err3 = base64.StdEncoding.DecodeString(f[2])
	}
	if err1 != nil || err2 != nil || err3 != nil || len(b) != n {
		t.Fatalf("%s: garbled answer (%v %v %v, %d bytes for %d): %.200q", h.name, err1, err2, err3, len(b), n, l)
	}
	if rc == 137 && time.Since(t0) >= timeout {
		return string(b) + fmt.Sprintf("\n(agent: killed after %v)", timeout), -1
	}
	return string(b), rc
}

// mustRun is run failing the test unless the script exits 0.
func (h *host) mustRun(t *testing.T, timeout time.Duration, script string) string {
	t.Helper()
	out, rc := h.run(t, timeout, script)
	if rc != 0 {
		t.Fatalf("%s: exit code %d from:\n%s\n--- output:\n%s\n--- console:\n%s", h.name, rc, script, out, tail(h.serial, 25))
	}
	return out
}

// startIscsid starts iscsid in the background (its log in /tmp/iscsid.log)
// and waits until it listens for iscsiadm.
func (h *host) startIscsid(t *testing.T) {
	t.Helper()
	h.mustRun(t, 30*time.Second, `
nohup iscsid -f > /tmp/iscsid.log 2>&1 &
i=0
until grep -q ISCSIADM_ABSTRACT_NAMESPACE /proc/net/unix; do
  i=$((i+1)); [ $i -le 200 ] || { echo "iscsid does not listen"; cat /tmp/iscsid.log; exit 1; }
  sleep 0.1
done`)
}

// login creates a node record for iqn at guestPortal(portal) (by hand:
// discovery answers with the target's own 127.0.0.1 address, which the
// guest cannot reach), logs in and returns the disk, e.g. /dev/sda, once
// it exists.
func (h *host) login(t *testing.T, iqn string, portal int) string {
	t.Helper()
	p := guestPortal(portal)
	out := h.mustRun(t, 90*time.Second, fmt.Sprintf(`
set -e
iscsiadm -m node -T %[1]s -p %[2]s -o new > /dev/null
t0=$(cut -d' ' -f1 /proc/uptime)
iscsiadm -m node -T %[1]s -p %[2]s --login > /dev/null
t1=$(cut -d' ' -f1 /proc/uptime)
%[3]s
t2=$(cut -d' ' -f1 /proc/uptime)
echo "$t0 $t1 $t2"
disk`, iqn, p, diskScript(iqn, p, 30)))
	dev := lastLine(out)
	if !strings.HasPrefix(dev, "/dev/") {
		t.Fatalf("%s: no disk after login to %s at %s:\n%s", h.name, iqn, p, out)
	}
	var a, b, c float64
	if _, err := fmt.Sscanf(out, "%g %g %g", &a, &b, &c); err == nil {
		t.Logf("%s: logged in to %s at %s in %.2f s, %s %.2f s later (guest clock)", h.name, iqn, p, b-a, dev, c-b)
	} else {
		t.Logf("%s: logged in to %s at %s: %s (%v: %q)", h.name, iqn, p, dev, err, out)
	}
	return dev
}

// logout logs out of iqn at guestPortal(portal) and deletes its record.
func (h *host) logout(t *testing.T, iqn string, portal int) {
	t.Helper()
	p := guestPortal(portal)
	h.mustRun(t, 60*time.Second, fmt.Sprintf(`
iscsiadm -m node -T %[1]s -p %[2]s --logout && iscsiadm -m node -T %[1]s -p %[2]s -o delete`, iqn, p))
}

// diskScript is a guest script that defines disk (prints the /dev path of
// the disk of the session with iqn at portal, fails when there is none yet)
// and waits up to secs seconds for it.
func diskScript(iqn, portal string, secs int) string {
	return fmt.Sprintf(`
disk() {
  local s c b
  for s in /sys/class/iscsi_session/session*; do
    [ -e "$s/targetname" ] && [ "$(cat $s/targetname)" = %[1]q ] || continue
    c=/sys/class/iscsi_connection/connection${s##*session}:0
    [ "$(cat $c/persistent_address):$(cat $c/persistent_port)" = %[2]q ] || continue
    for b in $s/device/target*/*:*:*:*/block/*; do
      [ -b "/dev/${b##*/}" ] && { echo "/dev/${b##*/}"; return 0; }
    done
  done
  return 1
}
i=0
until disk > /dev/null; do
  i=$((i+1)); [ $i -le %[3]d ] || { echo "no disk for %[1]s at %[2]s"; iscsiadm -m session -P3; exit 1; }
  sleep 0.1
done`, iqn, portal, secs*10)
}

func lastLine(s string) string {
	s = strings.TrimRight(s, "\n")
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// ---------------------------------------------------------------- the smoke test

// TestKernelInitiatorSmoke: one ukai node, one image, the kernel's
// initiator in a host guest: discovery, login, O_DIRECT I/O, SCSI
// inquiries, ext4, logout; then the image's data as the node holds it.
func TestKernelInitiatorSmoke(t *testing.T) {
	start := time.Now()
	agent := consultest.Start(t, consultest.Persistent(t.TempDir()))
	n1 := startNode(t, "n1", "a", agent.Addr, nil)
	const img = "smoke"
	iqn := iqnPrefix + ":" + img
	n1.mustCLI("image", "create", img, "--size", "64M", "--block-size", "1M")
	defer func() {
		if t.Failed() {
			t.Logf("--- ukai n1 log (full log in %s):\n%s", n1.log,
				grepFile(n1.log, 60, "level=WARN", "level=ERROR", "panic"))
		}
		t.Logf("total %v", time.Since(start).Round(time.Second))
	}()

	h := startHost(t, "H", []string{n1.portal})

	// The agent itself: 100 KiB of binary output, intact.
	t0 := time.Now()
	big, rc := h.run(t, time.Minute, `head -c 102400 /dev/urandom > /tmp/big && cat /tmp/big`)
	sum := md5.Sum([]byte(big))
	if want := h.mustRun(t, 10*time.Second, `md5sum /tmp/big`); rc != 0 || len(big) != 102400 || !strings.HasPrefix(want, hex.EncodeToString(sum[:])) {
		t.Fatalf("agent: 100 KiB of output came back wrong: rc %d, %d bytes, md5 %x, in the guest %s", rc, len(big), sum, want)
	}
	t.Logf("agent: 100 KiB of output in %v", time.Since(t0).Round(10*time.Millisecond))

	h.startIscsid(t)
	disc := h.mustRun(t, time.Minute, "iscsiadm -m discovery -t sendtargets -p "+guestPortal(0))
	t.Logf("discovery through %s:\n%s", guestPortal(0), strings.TrimSpace(disc))
	if !strings.Contains(disc, iqn) {
		t.Fatalf("discovery did not list %s", iqn)
	}
	// The records discovery made point at the target's 127.0.0.1 portal.
	h.mustRun(t, 30*time.Second, "iscsiadm -m node -o delete")

	t0 = time.Now()
	dev := h.login(t, iqn, 0)
	t.Logf("login to %s: %s in %v (host clock, agent round trips included)", iqn, dev, time.Since(t0).Round(10*time.Millisecond))
	size := strings.TrimSpace(h.mustRun(t, 10*time.Second, "blockdev --getsize64 "+dev))
	if size != strconv.Itoa(64<<20) {
		t.Errorf("%s is %s bytes, want %d", dev, size, 64<<20)
	}

	// 4 MiB at 8 MiB, O_DIRECT, and back.
	out := h.mustRun(t, 2*time.Minute, fmt.Sprintf(`
set -e
head -c 4194304 /dev/urandom > /tmp/pattern
md5sum < /tmp/pattern | cut -d' ' -f1
a=$(cut -d' ' -f1 /proc/uptime)
dd if=/tmp/pattern of=%[1]s bs=1M seek=8 count=4 oflag=direct conv=notrunc,fsync 2>/dev/null
b=$(cut -d' ' -f1 /proc/uptime)
dd if=%[1]s bs=1M skip=8 count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1
c=$(cut -d' ' -f1 /proc/uptime)
echo "write $a..$b read $b..$c"`, dev))
	f := strings.Fields(out)
	if len(f) < 2 || len(f[0]) != 32 || f[0] != f[1] {
		t.Fatalf("4 MiB written and read back through %s: md5 differ:\n%s", dev, out)
	}
	t.Logf("4 MiB O_DIRECT written and read back, md5 %s (guest uptime %s)", f[0], lastLine(out))

	inq := h.mustRun(t, 30*time.Second, "sg_inq "+dev)
	t.Logf("sg_inq %s:\n%s", dev, strings.TrimRight(inq, "\n"))
	vpd := h.mustRun(t, 30*time.Second, "sg_vpd -p di "+dev)
	t.Logf("sg_vpd -p di %s:\n%s", dev, strings.TrimRight(vpd, "\n"))
	if !strings.Contains(inq, "Peripheral device type: disk") {
		t.Errorf("sg_inq: not a disk")
	}
	// The rest of what a host's tools ask (multipath's ALUA handler among them).
	h.mustRun(t, time.Minute, fmt.Sprintf("set -e; for c in sg_turs 'sg_readcap --16' sg_luns sg_rtpg 'sg_persist -k'; do $c %s > /dev/null; done", dev))

	// ext4: make, mount, write, unmount, check.
	const content = "ukai kernel initiator smoke"
	h.mustRun(t, 3*time.Minute, fmt.Sprintf(`
set -e
mkfs.ext4 -F -q -L smoke %[1]s
mkdir -p /mnt/smoke
mount -t ext4 %[1]s /mnt/smoke
echo '%[2]s' > /mnt/smoke/hello.txt
head -c 1048576 /tmp/pattern > /mnt/smoke/pattern
sync
umount /mnt/smoke
e2fsck -fn %[1]s`, dev, content))
	h.logout(t, iqn, 0)
	if out, rc := h.run(t, 10*time.Second, "test -b "+dev); rc == 0 {
		t.Errorf("%s still exists after logout: %s", dev, out)
	}

	// What the node holds: the file system the kernel wrote.
	raw := filepath.Join(t.TempDir(), "smoke.raw")
	n1.mustCLI("image", "download", img, raw)
	if b, err := exec.Command("e2fsck", "-fn", raw).CombinedOutput(); err != nil {
		t.Errorf("e2fsck of the downloaded image: %v\n%s", err, b)
	}
	got, err := exec.Command("debugfs", "-R", "cat /hello.txt", raw).Output()
	if err != nil || !bytes.Equal(got, []byte(content+"\n")) {
		t.Errorf("/hello.txt in the downloaded image: %q, %v (want %q)", got, err, content+"\n")
	}
	t.Logf("host guest booted in %v (guest uptime %s s at AGENT READY)", h.boot.Round(10*time.Millisecond), h.uptime)
}
