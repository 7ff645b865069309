// Package integration runs real ukai processes, real iSCSI clients
// (libiscsi tools, qemu-io, qemu-img) and tgtd on loopback.
package integration

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/cluster/consulkv/consultest"
)

// ukaiBin is the binary under test, built once by TestMain.
var ukaiBin string

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		// Integration tests need processes and clients: `make test-short` is
		// for unit tests only, so nothing runs here.
		os.Exit(0)
	}
	dir, err := os.MkdirTemp("", "ukai-it-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ukaiBin = filepath.Join(dir, "ukai")
	build := exec.Command("go", "build", "-o", ukaiBin, "../cmd/ukai")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build ukai:", err)
		os.Exit(1)
	}
	for _, tool := range []string{"iscsi-ls", "iscsi-inq", "iscsi-test-cu", "qemu-io", "qemu-img", "tgtd", "tgtadm"} {
		if _, err := exec.LookPath(tool); err != nil {
			fmt.Fprintf(os.Stderr, "%s not found: run `make deps` (Debian packages libiscsi-bin qemu-utils qemu-block-extra tgt)\n", tool)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// freePort returns a loopback TCP port nobody listens on now.
func freePort(t *testing.T) int {
	t.Helper()
	p, err := consultest.FreePorts(1)
	if err != nil {
		t.Fatal(err)
	}
	return p[0]
}

// node is one ukai serve process.
type node struct {
	t       *testing.T
	name    string
	dir     string
	cfgPath string
	api     string
	portal  string
	gossip  string
	peer    string
	prefix  string
	cmd     *exec.Cmd
	logs    *logBuffer
	done    chan error
	// bin is the ukai binary the node runs (default ukaiBin).
	bin string
	// cliArgs go before every CLI command (--ca, --token-file); https:
	// the API serves TLS.
	cliArgs []string
	https   bool
}

// clusterOpts put a node in a cluster: Consul metadata and gossip.
type clusterOpts struct {
	consul string   // Consul HTTP address; empty = embedded store
	join   []string // gossip seeds; gossip is on whenever consul is set
	labels map[string]string
	extra  string        // more YAML appended to the config
	copyTO time.Duration // peer.timeout (default 3s)
	// requireACL: images admit only exported initiators (the product's
	// default); most tests are not about access control and turn it off.
	requireACL bool
}

func (o clusterOpts) peerTimeout() time.Duration {
	if o.copyTO == 0 {
		return 3 * time.Second
	}
	return o.copyTO
}

func newNode(t *testing.T, name string) *node { return newClusterNode(t, name, clusterOpts{}) }

func newClusterNode(t *testing.T, name string, o clusterOpts) *node {
	t.Helper()
	dir := t.TempDir()
	n := &node{
		t: t, name: name, dir: dir,
		api:    fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		portal: fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		prefix: "iqn.2026-11.io.ukai.test",
	}
	n.cfgPath = filepath.Join(dir, "node.yaml")
	var b strings.Builder
	fmt.Fprintf(&b, "node:\n  name: %s\n  data_dir: %s\n", name, filepath.Join(dir, "data"))
	if len(o.labels) > 0 {
		b.WriteString("  labels:\n")
		for k, v := range o.labels {
			fmt.Fprintf(&b, "    %s: %s\n", k, v)
		}
	}
	fmt.Fprintf(&b, "api:\n  listen: %s\niscsi:\n  listen: %s\n  iqn_prefix: %s\n  require_acl: %v\nlog:\n  level: info\n", n.api, n.portal, n.prefix, o.requireACL)
	if o.consul == "" {
		b.WriteString("metadata:\n  backend: embedded\n")
	} else {
		n.gossip = fmt.Sprintf("127.0.0.1:%d", freePort(t))
		n.peer = fmt.Sprintf("127.0.0.1:%d", freePort(t))
		fmt.Fprintf(&b, "metadata:\n  backend: consul\nconsul:\n  address: %s\npeer:\n  listen: %s\n  timeout: %s\ngossip:\n  bind: %s\n", o.consul, n.peer, o.peerTimeout(), n.gossip)
		if len(o.join) > 0 {
			fmt.Fprintf(&b, "  join: [%s]\n", strings.Join(o.join, ", "))
		}
	}
	b.WriteString(o.extra)
	if err := os.MkdirAll(filepath.Join(dir, "data"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(n.cfgPath, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	return n
}

// start launches the daemon and waits until its API answers.
func (n *node) start() {
	n.t.Helper()
	n.logs = &logBuffer{}
	bin := ukaiBin
	if n.bin != "" {
		bin = n.bin
	}
	n.cmd = exec.Command(bin, "serve", "--config", n.cfgPath)
	n.cmd.Stdout = n.logs
	n.cmd.Stderr = n.logs
	if err := n.cmd.Start(); err != nil {
		n.t.Fatal(err)
	}
	n.done = make(chan error, 1)
	go func(c *exec.Cmd, d chan error) { d <- c.Wait() }(n.cmd, n.done)
	n.t.Cleanup(func() {
		if n.cmd != nil && n.cmd.ProcessState == nil {
			n.cmd.Process.Kill()
			<-n.done
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	get := http.Get
	url := "http://" + n.api + "/v1/version"
	if n.https {
		c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
		get, url = c.Get, "https://"+n.api+"/v1/version"
	}
	for {
		resp, err := get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK { // ukai's answer, not another listener's
				return
			}
		}
		select {
		case err := <-n.done:
			n.t.Fatalf("node %s exited during start: %v\n%s", n.name, err, n.logs)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			n.t.Fatalf("node %s: API %s not up after 20s\n%s", n.name, n.api, n.logs)
		}
	}
}

// stop sends SIGTERM and requires a clean exit.
func (n *node) stop() {
	n.t.Helper()
	n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-n.done:
		if err != nil {
			n.t.Fatalf("node %s did not stop cleanly: %v\n%s", n.name, err, n.logs)
		}
	case <-time.After(30 * time.Second):
		n.t.Fatalf("node %s ignored SIGTERM for 30s\n%s", n.name, n.logs)
	}
}

// kill9 kills the daemon without warning.
func (n *node) kill9() {
	n.t.Helper()
	n.cmd.Process.Kill()
	<-n.done
}

// url is the libiscsi URL of an image's LUN 0.
func (n *node) url(image string) string {
	return fmt.Sprintf("iscsi://%s/%s:%s/0", n.portal, n.prefix, image)
}

// cli runs the ukai CLI against the node and returns stdout, stderr, error.
func (n *node) cli(args ...string) (string, string, error) { return n.cliWith(n.cliArgs, args...) }

// cliWith runs the CLI with base flags instead of the node's usual ones.
func (n *node) cliWith(base []string, args ...string) (string, string, error) {
	cmd := exec.Command(ukaiBin, append(append([]string{"--api", n.api}, base...), args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

// mustCLI runs the CLI and fails the test on error.
func (n *node) mustCLI(args ...string) string {
	n.t.Helper()
	out, errOut, err := n.cli(args...)
	if err != nil {
		n.t.Fatalf("ukai %s: %v\n%s%s", strings.Join(args, " "), err, out, errOut)
	}
	return out
}

// imageJSON returns `ukai image info NAME -o json` decoded.
func (n *node) imageJSON(name string, blocks bool) map[string]any {
	n.t.Helper()
	args := []string{"image", "info", name, "-o", "json"}
	if blocks {
		args = append(args, "--blocks")
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(n.mustCLI(args...)), &m); err != nil {
		n.t.Fatal(err)
	}
	return m
}

// run runs a command with a timeout and returns its combined output.
func run(t *testing.T, timeout time.Duration, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}

// qemuIO runs qemu-io commands against an iSCSI URL and requires success
// with no failed or mismatched I/O in the output.
func qemuIO(t *testing.T, url string, cmds ...string) string {
	t.Helper()
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, url)
	out, err := run(t, 2*time.Minute, "qemu-io", args...)
	if err != nil || strings.Contains(out, "failed") || strings.Contains(out, "Pattern verification") {
		t.Fatalf("qemu-io %v: %v\n%s", cmds, err, out)
	}
	return out
}

// logBuffer is a node's output: written by the process's output copier,
// read by the test while the node runs.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (l *logBuffer) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Len()
}
