package chaos

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
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

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/rs/zerolog"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/consulkv/consultest"
)

// ports hands out loopback ports nobody listens on, never the same twice
// in one test binary (a killed node's ports stay its own for its restart).
type ports struct{}

func (p *ports) next(t testing.TB) int {
	// Below the ephemeral range, never twice (consultest.FreePorts).
	ps, err := consultest.FreePorts(1)
	if err != nil {
		t.Fatal(err)
	}
	return ps[0]
}

func (p *ports) addr(t testing.TB) string { return fmt.Sprintf("127.0.0.1:%d", p.next(t)) }

// link is a toxiproxy proxy in front of one node's peer listener or of
// Consul for one node: the nemesis cuts, slows or resets it.
type link struct {
	name  string
	proxy *toxiproxy.Proxy
	mu    sync.Mutex
	toxic []string
}

func newLink(t testing.TB, srv *toxiproxy.ApiServer, name, listen, upstream string) *link {
	p := toxiproxy.NewProxy(srv, name, listen, upstream)
	if err := p.Start(); err != nil {
		t.Fatalf("toxiproxy %s on %s: %v", name, listen, err)
	}
	t.Cleanup(p.Stop)
	return &link{name: name, proxy: p}
}

// add adds a toxic to both directions.
func (l *link) add(kind string, attrs map[string]any) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, stream := range []string{"upstream", "downstream"} {
		name := fmt.Sprintf("%s-%s-%d", kind, stream, len(l.toxic))
		js, _ := json.Marshal(map[string]any{"name": name, "type": kind, "stream": stream, "attributes": attrs})
		if _, err := l.proxy.Toxics.AddToxicJson(bytes.NewReader(js)); err != nil {
			return fmt.Errorf("%s: add toxic %s: %w", l.name, js, err)
		}
		l.toxic = append(l.toxic, name)
	}
	return nil
}

// heal removes every toxic.
func (l *link) heal() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, name := range l.toxic {
		_ = l.proxy.Toxics.RemoveToxic(context.Background(), name)
	}
	l.toxic = nil
}

// ukaiNode is one `ukai serve` process; it can be killed, paused and
// restarted on the same ports and data directory.
type ukaiNode struct {
	name, dir, cfgPath   string
	api, portal, peer    string
	gossip               string
	peerLink, consulLink *link
	bin                  string
	logPath              string
	mu                   sync.Mutex
	cmd                  *exec.Cmd
	done                 chan error
	state                string // running, killed, paused, stopped
	cli                  func(ctx context.Context, args ...string) (string, error)
}

// cluster is Consul and the ukai nodes, each behind its own links.
type cluster struct {
	t      testing.TB
	bin    string
	dir    string
	consul *consultest.Agent
	nodes  []*ukaiNode
	proxy  *toxiproxy.ApiServer
}

const iqnPrefix = "iqn.2026-12.io.ukai.chaos"

func startCluster(t testing.TB, bin, dir string, names []string, leaseTTL time.Duration) *cluster {
	var pp ports
	c := &cluster{t: t, bin: bin, dir: dir,
		consul: consultest.Start(t, consultest.Persistent(filepath.Join(dir, "consul"))),
		proxy:  toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop()),
	}
	for _, name := range names {
		n := &ukaiNode{name: name, bin: bin, dir: filepath.Join(dir, name),
			api: pp.addr(t), portal: pp.addr(t), peer: pp.addr(t), gossip: pp.addr(t)}
		n.peerLink = newLink(t, c.proxy, "peer-"+name, pp.addr(t), n.peer)
		n.consulLink = newLink(t, c.proxy, "consul-"+name, pp.addr(t), c.consul.Addr)
		n.logPath = filepath.Join(dir, name+".log")
		c.nodes = append(c.nodes, n)
	}
	zones := []string{"a", "a", "b", "b", "c"}
	for i, n := range c.nodes {
		var join []string
		for _, o := range c.nodes {
			if o != n {
				join = append(join, o.gossip)
			}
		}
		cfg := fmt.Sprintf(`node:
  name: %s
  data_dir: %s
  labels:
    zone: %s
api:
  listen: %s
iscsi:
  listen: %s
  iqn_prefix: %s
  require_acl: false
log:
  level: info
metadata:
  backend: consul
consul:
  address: %s
peer:
  listen: %s
  advertise: %s
  timeout: 2s
gossip:
  bind: %s
  join: [%s]
owner:
  lease_ttl: %s
`, n.name, filepath.Join(n.dir, "data"), zones[i%len(zones)], n.api, n.portal, iqnPrefix,
			n.consulLink.proxy.Listen, n.peer, n.peerLink.proxy.Listen, n.gossip, strings.Join(join, ", "), leaseTTL)
		if err := os.MkdirAll(filepath.Join(n.dir, "data"), 0o700); err != nil {
			t.Fatal(err)
		}
		n.cfgPath = filepath.Join(n.dir, "node.yaml")
		if err := os.WriteFile(n.cfgPath, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		n.cli = func(ctx context.Context, args ...string) (string, error) {
			return runCLI(ctx, bin, n.api, args...)
		}
	}
	for _, n := range c.nodes {
		if err := n.start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { n.kill() })
	}
	return c
}

// runCLI runs the ukai CLI against one node's API.
func runCLI(ctx context.Context, bin, apiAddr string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, append([]string{"--api", apiAddr}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("ukai %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()+out.String()))
	}
	return out.String(), nil
}

// start launches the daemon (logs appended to its log file) and waits for
// its API.
func (n *ukaiNode) start() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	logf, err := os.OpenFile(n.logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	cmd := exec.Command(n.bin, "serve", "--config", n.cfgPath)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", n.name, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait(); logf.Close() }()
	n.cmd, n.done, n.state = cmd, done, "running"
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + n.api + "/v1/version")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK { // ukai's answer, not another listener's
				return nil
			}
		}
		select {
		case err := <-done:
			n.state = "killed"
			return fmt.Errorf("node %s exited during start: %v (log %s)", n.name, err, n.logPath)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("node %s: API not up after 30s (log %s)", n.name, n.logPath)
		}
	}
}

// kill sends SIGKILL (resuming a paused process first is not needed:
// SIGKILL works on stopped processes) and waits for the exit.
func (n *ukaiNode) kill() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd == nil || n.state == "killed" || n.state == "stopped" {
		return
	}
	_ = n.cmd.Process.Kill()
	<-n.done
	n.state = "killed"
}

// stop asks for a clean exit (SIGTERM) and waits for it.
func (n *ukaiNode) stop() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd == nil || n.state == "killed" || n.state == "stopped" {
		return nil
	}
	if n.state == "paused" {
		_ = n.cmd.Process.Signal(syscall.SIGCONT)
	}
	_ = n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-n.done:
		n.state = "stopped"
		if err != nil {
			return fmt.Errorf("node %s: unclean exit: %w", n.name, err)
		}
		return nil
	case <-time.After(30 * time.Second):
		_ = n.cmd.Process.Kill()
		<-n.done
		n.state = "killed"
		return fmt.Errorf("node %s ignored SIGTERM for 30s", n.name)
	}
}

func (n *ukaiNode) signal(sig syscall.Signal, state string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd != nil && (n.state == "running" || n.state == "paused") {
		_ = n.cmd.Process.Signal(sig)
		n.state = state
	}
}

func (n *ukaiNode) pause()  { n.signal(syscall.SIGSTOP, "paused") }
func (n *ukaiNode) resume() { n.signal(syscall.SIGCONT, "running") }

func (n *ukaiNode) currentState() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.state
}

// image returns `ukai image info NAME -o json` as this node answers it.
func (n *ukaiNode) image(ctx context.Context, name string) (api.Image, error) {
	var img api.Image
	out, err := n.cli(ctx, "image", "info", name, "-o", "json")
	if err != nil {
		return img, err
	}
	if err := json.Unmarshal([]byte(out), &img); err != nil {
		return img, fmt.Errorf("image info %s: %w", name, err)
	}
	return img, nil
}

// logWindow returns the lines of the node's log whose time= stamp lies in
// [from, to] and that hold the field match (e.g. "image=vm0"), at most max: the last ones, nearest
// the end of the window (where a violating read completed).
func (n *ukaiNode) logWindow(from, to time.Time, match string, max int) []string {
	f, err := os.Open(n.logPath)
	if err != nil {
		return nil
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 8<<20)
	for sc.Scan() {
		line := sc.Text()
		ts, ok := strings.CutPrefix(line, "time=")
		if !ok || !strings.Contains(line, match+" ") && !strings.HasSuffix(line, match) {
			continue
		}
		ts, _, _ = strings.Cut(ts, " ")
		at, err := time.Parse(time.RFC3339Nano, ts)
		if err != nil || at.Before(from) || at.After(to) {
			continue
		}
		lines = append(lines, line)
	}
	if len(lines) > max {
		lines = lines[len(lines)-max:]
	}
	return lines
}

// alive reports whether every node answers and sees every other as alive.
func (c *cluster) settled(ctx context.Context) error {
	for _, n := range c.nodes {
		out, err := n.cli(ctx, "node", "list", "-o", "json")
		if err != nil {
			return err
		}
		var nodes []api.Node
		if err := json.Unmarshal([]byte(out), &nodes); err != nil {
			return fmt.Errorf("node list on %s: %w", n.name, err)
		}
		alive := 0
		for _, m := range nodes {
			if m.State == "alive" {
				alive++
			}
		}
		if alive != len(c.nodes) {
			return fmt.Errorf("%s sees %d of %d nodes alive", n.name, alive, len(c.nodes))
		}
	}
	return nil
}

// waitFor polls cond until it returns nil or the timeout passes.
func waitFor(ctx context.Context, timeout time.Duration, cond func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("after %v: %w", timeout, err)
		}
		select {
		case <-ctx.Done():
			return errors.Join(ctx.Err(), err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}
