//go:build vm

// Package vm boots real guests (QEMU with TCG, a Debian kernel and the
// busybox initramfs that setup.sh builds from ./init) whose virtio disk is a
// ukai image reached over iSCSI, and live-migrates a running guest from one
// ukai node's target to another's. Run it with `make test-vm`.
//
// The guest writes numbered records and prints "ACK <i>" once record i was
// written and flushed (SYNCHRONIZE CACHE); a check guest reads them back and
// prints "CHECK OK <n>". Every acknowledged record must be readable through
// every node that holds a copy.
package vm

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/cluster/consulkv/consultest"
)

const (
	iqnPrefix = "iqn.2026-11.io.ukai"
	image     = "guest"
	// ACKs the writer must print on the source before the migration starts,
	// and on the destination after it.
	acksBefore = 30
	acksAfter  = 30
)

var (
	ukaiBin        string
	kernel, initrd string
	initrdHost     string // setup.sh's initrd_host: see host_test.go
	artifacts      string // logs of this run: kept when the test fails
)

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	top, err := filepath.Abs("../..")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	for _, tool := range []string{"qemu-system-x86_64"} {
		if _, err := exec.LookPath(tool); err != nil {
			fmt.Fprintf(os.Stderr, "%s not found: run integration/vm/setup.sh (as root) or make test-vm\n", tool)
			return 1
		}
	}
	// setup.sh is idempotent: it only (re)builds the initramfs when needed
	// and prints the kernel and initramfs paths.
	out, err := exec.Command("bash", filepath.Join(top, "integration/vm/setup.sh")).Output()
	if err != nil {
		fmt.Fprintf(os.Stderr, "integration/vm/setup.sh: %v\n%s\n", err, out)
		return 1
	}
	for _, l := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(l, "kernel="); ok {
			kernel = v
		}
		if v, ok := strings.CutPrefix(l, "initrd="); ok {
			initrd = v
		}
		if v, ok := strings.CutPrefix(l, "initrd_host="); ok {
			initrdHost = v // the hypervisor host's (host_test.go)
		}
	}
	if kernel == "" || initrd == "" {
		fmt.Fprintf(os.Stderr, "setup.sh printed no kernel/initrd:\n%s\n", out)
		return 1
	}
	dir, err := os.MkdirTemp("", "ukai-vm-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	ukaiBin = filepath.Join(dir, "ukai")
	if bin := os.Getenv("UKAI_VM_BIN"); bin != "" {
		// A prebuilt binary, for debugging against another tree.
		ukaiBin = bin
	} else {
		build := exec.Command("go", "build", "-o", ukaiBin, "./cmd/ukai")
		build.Dir = top
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "build ukai:", err)
			return 1
		}
	}
	if artifacts, err = os.MkdirTemp("", "ukai-vm-"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	code := m.Run()
	if code == 0 && os.Getenv("UKAI_VM_KEEP") == "" {
		os.RemoveAll(artifacts)
	} else {
		fmt.Fprintf(os.Stderr, "logs of this run (serial consoles, QEMU, ukai nodes) kept in %s\n", artifacts)
	}
	return code
}

// ---------------------------------------------------------------- ports

// freePort returns a loopback TCP port nobody listens on now.
func freePort(t *testing.T) int {
	t.Helper()
	p, err := consultest.FreePorts(1) // below the ephemeral range, never twice
	if err != nil {
		t.Fatal(err)
	}
	return p[0]
}

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	lines := strings.Split(strings.TrimRight(strings.ReplaceAll(string(b), "\r", ""), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// grepFile returns the lines of a file that contain any of words.
func grepFile(path string, max int, words ...string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		for _, w := range words {
			if strings.Contains(l, w) {
				out = append(out, l)
				break
			}
		}
	}
	if len(out) > max {
		out = append(out[:max/2], append([]string{fmt.Sprintf("... (%d lines)", len(out)-max)}, out[len(out)-max/2:]...)...)
	}
	return strings.Join(out, "\n")
}

// ---------------------------------------------------------------- ukai nodes

// node is one `ukai serve` process in the cluster.
type node struct {
	t      *testing.T
	name   string
	api    string
	portal string
	gossip string
	log    string // path of its stdout+stderr
	cfg    string // path of its config
	cmd    *exec.Cmd
	done   chan struct{} // closed when the process exited; err is then set
	err    error
}

func startNode(t *testing.T, name, zone, consul string, join []string) *node {
	t.Helper()
	return startNodeWith(t, name, zone, consul, join, "")
}

// startNodeWith is startNode with more lines in the config's iscsi
// section (each indented by two spaces, ending in a newline).
func startNodeWith(t *testing.T, name, zone, consul string, join []string, iscsiExtra string) *node {
	t.Helper()
	dir := t.TempDir()
	n := &node{
		t: t, name: name,
		api:    fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		portal: fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		gossip: fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		log:    filepath.Join(artifacts, name+".log"),
	}
	peer := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	var b strings.Builder
	fmt.Fprintf(&b, "node:\n  name: %s\n  data_dir: %s\n  labels:\n    zone: %s\n", name, filepath.Join(dir, "data"), zone)
	fmt.Fprintf(&b, "api:\n  listen: %s\niscsi:\n  listen: %s\n  iqn_prefix: %s\n  require_acl: false\n%s", n.api, n.portal, iqnPrefix, iscsiExtra)
	fmt.Fprintf(&b, "peer:\n  listen: %s\n  timeout: 5s\nmetadata:\n  backend: consul\nconsul:\n  address: %s\n", peer, consul)
	fmt.Fprintf(&b, "gossip:\n  bind: %s\n", n.gossip)
	if len(join) > 0 {
		fmt.Fprintf(&b, "  join: [%s]\n", strings.Join(join, ", "))
	}
	b.WriteString("log:\n  level: info\n")
	if err := os.MkdirAll(filepath.Join(dir, "data"), 0o700); err != nil {
		t.Fatal(err)
	}
	n.cfg = filepath.Join(dir, "node.yaml")
	if err := os.WriteFile(n.cfg, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	n.launch()
	return n
}

// launch starts the node's process (again, after kill9) and waits until
// its API answers.
func (n *node) launch() {
	t := n.t
	t.Helper()
	logf, err := os.OpenFile(n.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(ukaiBin, "serve", "--config", n.cfg)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	n.cmd, n.done = cmd, done
	go func() { n.err = cmd.Wait(); logf.Close(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + n.api + "/v1/version")
		if err == nil {
			resp.Body.Close()
			return
		}
		select {
		case <-done:
			t.Fatalf("node %s exited during start: %v\n%s", n.name, n.err, tail(n.log, 40))
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("node %s: API %s not up after 30s\n%s", n.name, n.api, tail(n.log, 40))
		}
	}
}

// kill9 kills the node's process at once (no shutdown: its ownership
// session and locks stay in the store until they expire).
func (n *node) kill9() {
	n.cmd.Process.Kill()
	<-n.done
}

// target is the libiscsi URL of the image's LUN 0 on this node.
func (n *node) target() string {
	return fmt.Sprintf("iscsi://%s/%s:%s/0", n.portal, iqnPrefix, image)
}

func (n *node) cli(args ...string) (string, error) {
	cmd := exec.Command(ukaiBin, append([]string{"--api", n.api}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("ukai %s: %v: %s%s", strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String(), nil
}

func (n *node) mustCLI(args ...string) string {
	n.t.Helper()
	out, err := n.cli(args...)
	if err != nil {
		n.t.Fatal(err)
	}
	return out
}

type imageInfo struct {
	Owner      string `json:"owner"`
	Generation uint64 `json:"generation"`
	Locations  []struct {
		Node      string `json:"node"`
		OutOfSync int64  `json:"out_of_sync"`
		Syncing   int64  `json:"syncing"`
	} `json:"locations"`
}

func (n *node) info(t *testing.T) imageInfo {
	t.Helper()
	var i imageInfo
	if err := json.Unmarshal([]byte(n.mustCLI("image", "info", image, "-o", "json")), &i); err != nil {
		t.Fatal(err)
	}
	return i
}

func (i imageInfo) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "owner=%q generation=%d locations=", i.Owner, i.Generation)
	for _, l := range i.Locations {
		fmt.Fprintf(&b, "[%s out_of_sync=%d syncing=%d]", l.Node, l.OutOfSync, l.Syncing)
	}
	return b.String()
}

// waitNoOwner waits until the owner gave the idle image up (about 5 s after
// its last session), so that the next guest's node takes ownership itself
// and serves the guest from its own copy.
func waitNoOwner(t *testing.T, n *node) {
	t.Helper()
	var last imageInfo
	deadline := time.Now().Add(60 * time.Second)
	for {
		last = n.info(t)
		if last.Owner == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the image still has an owner 60 s after its last session: %v", last)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// ---------------------------------------------------------------- QEMU

// machine is one QEMU process.
type machine struct {
	name   string
	serial string // the guest's serial console, a file
	stderr string // QEMU's own output
	qmp    string // QMP unix socket
	cmd    *exec.Cmd
	done   chan struct{}
	err    error
}

var ackRE = regexp.MustCompile(`(?m)^ACK (\d+)\r?\n`)

// startMachine boots a guest in mode (write or check) on a node's target;
// incoming, when set, is the migration address this QEMU waits on instead.
// The machine is killed at t's cleanup.
func startMachine(t *testing.T, label, vmName, mode string, n *node, incoming string) *machine {
	t.Helper()
	m := &machine{
		name:   label,
		serial: filepath.Join(artifacts, label+".serial"),
		stderr: filepath.Join(artifacts, label+".qemu"),
		qmp:    filepath.Join(artifacts, label+".qmp"),
		done:   make(chan struct{}),
	}
	args := []string{
		"-name", vmName,
		"-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1",
		"-display", "none", "-no-reboot", "-nodefaults",
		"-kernel", kernel, "-initrd", initrd,
		"-append", "console=ttyS0 quiet panic=-1 ukai.mode=" + mode,
		"-drive", "id=d0,file=" + n.target() + ",format=raw,if=none,cache=none,werror=report,rerror=report",
		"-device", "virtio-blk-pci,drive=d0",
		"-nic", "none",
		"-serial", "file:" + m.serial,
		"-qmp", "unix:" + m.qmp + ",server=on,wait=off",
		"-monitor", "none",
	}
	if incoming != "" {
		args = append(args, "-incoming", incoming)
	}
	errf, err := os.Create(m.stderr)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(errf, "# qemu-system-x86_64 %s\n", strings.Join(args, " "))
	m.cmd = exec.Command("qemu-system-x86_64", args...)
	m.cmd.Stdout, m.cmd.Stderr = errf, errf
	if err := m.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { m.err = m.cmd.Wait(); errf.Close(); close(m.done) }()
	t.Cleanup(m.kill)
	t.Logf("%s: QEMU pid %d, guest %s mode, disk %s%s", label, m.cmd.Process.Pid, mode, n.target(),
		map[bool]string{true: ", incoming " + incoming}[incoming != ""])
	return m
}

func (m *machine) exited() bool {
	select {
	case <-m.done:
		return true
	default:
		return false
	}
}

func (m *machine) kill() {
	if !m.exited() {
		m.cmd.Process.Kill()
		<-m.done
	}
}

// console is the serial output so far, complete lines only, without \r.
func (m *machine) console() string {
	b, _ := os.ReadFile(m.serial)
	if i := bytes.LastIndexByte(b, '\n'); i >= 0 {
		b = b[:i+1]
	} else {
		b = nil
	}
	return string(b)
}

// maxAck is the highest "ACK <i>" on the console, -1 if none.
func (m *machine) maxAck() int {
	best := -1
	for _, s := range ackRE.FindAllStringSubmatch(m.console(), -1) {
		if v, _ := strconv.Atoi(s[1]); v > best {
			best = v
		}
	}
	return best
}

// errors returns the console lines that tell of a failed write or a broken
// guest.
func (m *machine) errors() []string {
	var out []string
	for _, l := range strings.Split(strings.ReplaceAll(m.console(), "\r", ""), "\n") {
		if strings.HasPrefix(l, "ERR ") || strings.HasPrefix(l, "GUEST FAIL") || strings.Contains(l, "I/O error") || strings.Contains(l, "Buffer I/O") {
			out = append(out, l)
		}
	}
	return out
}

// describe is what to show when something about this machine went wrong.
func (m *machine) describe() string {
	state := "running"
	if m.exited() {
		state = fmt.Sprintf("exited: %v", m.err)
	}
	return fmt.Sprintf("--- %s (QEMU %s) console, last lines:\n%s\n--- %s QEMU output:\n%s",
		m.name, state, tail(m.serial, 25), m.name, tail(m.stderr, 30))
}

// waitConsole polls the console until cond holds, failing when QEMU exits
// first or the timeout passes.
func (m *machine) waitConsole(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if m.exited() {
			if cond() {
				return
			}
			t.Fatalf("%s: QEMU exited while waiting for %s\n%s", m.name, what, m.describe())
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: timed out after %v waiting for %s\n%s", m.name, timeout, what, m.describe())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitExit waits for QEMU to exit by itself.
func (m *machine) waitExit(timeout time.Duration) bool {
	select {
	case <-m.done:
		return true
	case <-time.After(timeout):
		return false
	}
}

// quit asks QEMU to quit over QMP and kills it if it does not within 30 s.
func (m *machine) quit(t *testing.T) {
	t.Helper()
	if m.exited() {
		return
	}
	if q, err := dialQMP(m.qmp, 5*time.Second); err == nil {
		q.cmd("quit", nil)
		q.close()
	}
	if !m.waitExit(30 * time.Second) {
		t.Logf("%s: QEMU did not quit within 30 s: killed", m.name)
		m.kill()
	}
}

// ---------------------------------------------------------------- QMP

type qmpConn struct {
	c net.Conn
	r *bufio.Reader
}

func dialQMP(path string, timeout time.Duration) (*qmpConn, error) {
	var c net.Conn
	var err error
	deadline := time.Now().Add(timeout)
	for {
		if c, err = net.Dial("unix", path); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return nil, err
		}
		time.Sleep(100 * time.Millisecond)
	}
	q := &qmpConn{c: c, r: bufio.NewReader(c)}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := q.r.ReadBytes('\n'); err != nil { // greeting
		c.Close()
		return nil, fmt.Errorf("QMP greeting: %w", err)
	}
	if _, err := q.cmd("qmp_capabilities", nil); err != nil {
		c.Close()
		return nil, err
	}
	return q, nil
}

func (q *qmpConn) close() { q.c.Close() }

// cmd runs a QMP command and returns its "return" value; asynchronous
// events are skipped.
func (q *qmpConn) cmd(name string, args any) (json.RawMessage, error) {
	req := map[string]any{"execute": name}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	q.c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := q.c.Write(append(b, '\n')); err != nil {
		return nil, err
	}
	for {
		line, err := q.r.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("QMP %s: %w", name, err)
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := json.Unmarshal(line, &resp); err != nil {
			return nil, fmt.Errorf("QMP %s: %w: %s", name, err, line)
		}
		if resp.Event != "" {
			continue
		}
		if resp.Error != nil {
			return nil, fmt.Errorf("QMP %s: %s: %s", name, resp.Error.Class, resp.Error.Desc)
		}
		return resp.Return, nil
	}
}

func (q *qmpConn) status() (string, error) {
	r, err := q.cmd("query-status", nil)
	if err != nil {
		return "", err
	}
	var s struct {
		Status string `json:"status"`
	}
	return s.Status, json.Unmarshal(r, &s)
}

type migrateInfo struct {
	Status    string `json:"status"`
	ErrorDesc string `json:"error-desc"`
	TotalTime int64  `json:"total-time"`
	Downtime  int64  `json:"downtime"`
	RAM       struct {
		Transferred int64 `json:"transferred"`
	} `json:"ram"`
}

func (q *qmpConn) queryMigrate() (migrateInfo, error) {
	var mi migrateInfo
	r, err := q.cmd("query-migrate", nil)
	if err != nil {
		return mi, err
	}
	return mi, json.Unmarshal(r, &mi)
}

// ---------------------------------------------------------------- the test

type cluster struct {
	nodes map[string]*node
	order []*node
}

func startCluster(t *testing.T) *cluster {
	agent := consultest.Start(t, consultest.Persistent(t.TempDir()))
	c := &cluster{nodes: map[string]*node{}}
	for i, name := range []string{"n1", "n2", "n3"} {
		var join []string
		if i > 0 {
			join = []string{c.order[0].gossip}
		}
		n := startNode(t, name, map[bool]string{true: "a", false: "b"}[i < 2], agent.Addr, join)
		c.nodes[name] = n
		c.order = append(c.order, n)
	}
	n1 := c.order[0]
	waitFor(t, 60*time.Second, "three alive nodes", func() bool {
		out, err := n1.cli("node", "list", "-o", "json")
		return err == nil && strings.Count(out, `"state": "alive"`) == 3
	})
	return c
}

// logs is the ukai nodes' log lines worth reading after a failure.
func (c *cluster) logs() string {
	var b strings.Builder
	for _, n := range c.order {
		fmt.Fprintf(&b, "--- ukai %s log (warnings, errors, ownership; full log in %s):\n%s\n", n.name, n.log,
			grepFile(n.log, 60, "level=WARN", "level=ERROR", "owner", "NOT READY", "not ready", "served by", "panic"))
	}
	return b.String()
}

// check boots a guest in check mode on n's target and requires CHECK OK n
// with n at least minAck.
func check(t *testing.T, label string, n *node, minAck int) {
	t.Helper()
	m := startMachine(t, label, "check", "check", n, "")
	if !m.waitExit(4 * time.Minute) {
		t.Fatalf("%s: the check guest did not power off within 4 minutes\n%s", label, m.describe())
	}
	re := regexp.MustCompile(`(?m)^CHECK (OK|BAD) (-?\d+)(.*?)\r?$`)
	s := re.FindStringSubmatch(m.console())
	if s == nil {
		t.Fatalf("%s: no CHECK line\n%s", label, m.describe())
	}
	got, _ := strconv.Atoi(s[2])
	switch {
	case s[1] != "OK":
		t.Fatalf("%s through %s: CHECK BAD at record %d%s (highest acknowledged record: %d)\n%s", label, n.name, got, s[3], minAck, m.describe())
	case got < minAck:
		t.Fatalf("%s through %s: CHECK OK %d, but record %d was acknowledged: records %d..%d are lost\n%s",
			label, n.name, got, minAck, got+1, minAck, m.describe())
	}
	if errs := m.errors(); len(errs) > 0 {
		t.Fatalf("%s: the check guest saw errors:\n%s", label, strings.Join(errs, "\n"))
	}
	t.Logf("%s through %s: CHECK OK %d (highest acknowledged record %d)", label, n.name, got, minAck)
}

func TestLiveMigration(t *testing.T) {
	start := time.Now()
	top := t // the machines that outlive a step belong to the whole test
	c := startCluster(t)
	n1, n2, n3 := c.nodes["n1"], c.nodes["n2"], c.nodes["n3"]
	n1.mustCLI("image", "create", image, "--size", "64M", "--block-size", "1M", "--locations", "n1,n2")
	defer func() {
		if t.Failed() {
			t.Logf("ukai image info: %s\n%s", func() string {
				out, err := n3.cli("image", "info", image)
				if err != nil {
					return err.Error()
				}
				return out
			}(), c.logs())
		}
		t.Logf("total %v", time.Since(start).Round(time.Second))
	}()

	// highest is the highest record any guest acknowledged.
	highest := -1
	var a, b *machine

	if !t.Run("write-through-n1", func(t *testing.T) {
		a = startMachine(top, "A", image, "write", n1, "")
		t0 := time.Now()
		a.waitConsole(t, 3*time.Minute, "PATTERN OK", func() bool { return strings.Contains(a.console(), "PATTERN OK") })
		a.waitConsole(t, 2*time.Minute, fmt.Sprintf("ACK %d", acksBefore), func() bool { return a.maxAck() >= acksBefore })
		if errs := a.errors(); len(errs) > 0 {
			t.Fatalf("A saw write errors:\n%s\n%s", strings.Join(errs, "\n"), a.describe())
		}
		t.Logf("A: booted and acknowledged %d records in %v", a.maxAck()+1, time.Since(t0).Round(100*time.Millisecond))
	}) {
		t.FailNow()
	}

	migrated := t.Run("migrate-n1-to-n2", func(t *testing.T) {
		port := freePort(t)
		b = startMachine(top, "B", image, "write", n2, fmt.Sprintf("tcp:127.0.0.1:%d", port))
		// B listens once its QMP monitor answers (QEMU opens the incoming
		// socket before it serves QMP); its disk is open by then too.
		qb, err := dialQMP(b.qmp, 2*time.Minute)
		if err != nil {
			t.Fatalf("B's QMP: %v\n%s", err, b.describe())
		}
		defer qb.close()
		if st, err := qb.status(); err != nil || st != "inmigrate" {
			t.Fatalf("B: status %q, %v (want inmigrate)\n%s", st, err, b.describe())
		}
		qa, err := dialQMP(a.qmp, 30*time.Second)
		if err != nil {
			t.Fatalf("A's QMP: %v\n%s", err, a.describe())
		}
		defer qa.close()
		before := a.maxAck()
		t0 := time.Now()
		if _, err := qa.cmd("migrate", map[string]any{"uri": fmt.Sprintf("tcp:127.0.0.1:%d", port)}); err != nil {
			t.Fatalf("migrate: %v\n%s", err, a.describe())
		}
		var mi migrateInfo
		waitFor(t, 3*time.Minute, "the migration to complete", func() bool {
			if mi, err = qa.queryMigrate(); err != nil {
				t.Fatalf("query-migrate on A: %v\n%s", err, a.describe())
			}
			switch mi.Status {
			case "failed", "cancelled":
				t.Fatalf("migration %s: %s\n%s\n%s", mi.Status, mi.ErrorDesc, a.describe(), b.describe())
			}
			return mi.Status == "completed"
		})
		t.Logf("migration completed in %v (QEMU: total %d ms, downtime %d ms, %d MiB of RAM); A had acknowledged up to %d when it started",
			time.Since(t0).Round(10*time.Millisecond), mi.TotalTime, mi.Downtime, mi.RAM.Transferred>>20, before)
		if st, err := qa.status(); err != nil || st != "postmigrate" {
			t.Errorf("A after the migration: status %q, %v (want postmigrate)", st, err)
		}
		waitFor(t, 30*time.Second, "B to run", func() bool {
			st, err := qb.status()
			if err != nil {
				t.Fatalf("B: %v\n%s", err, b.describe())
			}
			return st == "running"
		})
		lastA := a.maxAck()
		highest = max(highest, lastA)
		t.Logf("highest ACK printed by A: %d", lastA)
		// The guest goes on on B: the next records are acknowledged there.
		b.waitConsole(t, 2*time.Minute, fmt.Sprintf("ACK %d on B", lastA+acksAfter), func() bool {
			if errs := b.errors(); len(errs) > 0 {
				t.Fatalf("the guest on B saw write errors after the migration (highest ACK on A %d, on B %d):\n%s\n%s",
					lastA, b.maxAck(), strings.Join(errs, "\n"), b.describe())
			}
			return b.maxAck() >= lastA+acksAfter
		})
		if first := firstAck(b); first != lastA+1 {
			t.Errorf("B's first ACK is %d, A's last %d: the guest should have gone on with the next record", first, lastA)
		}
		if a.maxAck() != lastA {
			t.Errorf("A printed ACKs after the migration completed (%d > %d)", a.maxAck(), lastA)
		}
		t.Logf("B: the guest goes on, ACK %d", b.maxAck())
	})

	// Stop every writer. The highest ACK is read from the consoles after
	// QEMU exits: every ACK printed was a completed, flushed write.
	t.Run("stop-writers", func(t *testing.T) {
		if b != nil {
			b.quit(t)
			highest = max(highest, b.maxAck())
			if errs := b.errors(); len(errs) > 0 && migrated {
				// (a failed migration step has shown them already)
				t.Errorf("B's guest saw errors:\n%s", strings.Join(errs, "\n"))
			}
		}
		a.quit(t)
		highest = max(highest, a.maxAck())
		if errs := a.errors(); len(errs) > 0 {
			t.Errorf("A's guest saw errors:\n%s", strings.Join(errs, "\n"))
		}
		t.Logf("highest acknowledged record: %d (A %d, B %d)", highest, a.maxAck(), func() int {
			if b == nil {
				return -1
			}
			return b.maxAck()
		}())
	})
	if highest < 0 {
		t.Fatal("no record was acknowledged")
	}

	// Every acknowledged record, through each node that holds a copy. Each
	// check waits for the previous owner to let the idle image go, so that
	// the checking node serves it from its own copy.
	if !t.Run("check-through-n2", func(t *testing.T) {
		waitNoOwner(t, n2)
		check(t, "C-n2", n2, highest)
	}) {
		return
	}
	if !t.Run("check-through-n1", func(t *testing.T) {
		waitNoOwner(t, n1)
		check(t, "C-n1", n1, highest)
	}) {
		return
	}

	if !t.Run("relocate-n1-to-n3", func(t *testing.T) {
		t0 := time.Now()
		n1.mustCLI("image", "relocate", image, "--to", "n3", "--from", "n1")
		var last imageInfo
		waitFor(t, 5*time.Minute, "locations exactly [n2 n3], in sync, no owner", func() bool {
			last = n3.info(t)
			var names []string
			for _, l := range last.Locations {
				if l.OutOfSync != 0 || l.Syncing != 0 {
					return false
				}
				names = append(names, l.Node)
			}
			sort.Strings(names)
			return strings.Join(names, " ") == "n2 n3" && last.Owner == ""
		})
		t.Logf("relocated in %v: %v", time.Since(t0).Round(100*time.Millisecond), last)
	}) {
		return
	}
	t.Run("check-through-n3", func(t *testing.T) {
		check(t, "C-n3", n3, highest)
	})
}

// firstAck is the lowest ACK on a console, -1 if none.
func firstAck(m *machine) int {
	best := -1
	for _, s := range ackRE.FindAllStringSubmatch(m.console(), -1) {
		if v, _ := strconv.Atoi(s[1]); best < 0 || v < best {
			best = v
		}
	}
	return best
}
