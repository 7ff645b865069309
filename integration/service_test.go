package integration

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestInstall runs `make install` into a fresh prefix: the binary runs,
// the example configuration and the Consul examples are there, the unit
// points at them and systemd accepts it; a second install keeps the
// node's own configuration.
func TestInstall(t *testing.T) {
	prefix := t.TempDir()
	etc := filepath.Join(prefix, "etc")
	install := func() string {
		out, err := run(t, 5*time.Minute, "make", "-C", "..", "install", "PREFIX="+prefix, "SYSCONFDIR="+etc)
		if err != nil {
			t.Fatalf("make install: %v\n%s", err, out)
		}
		return out
	}
	install()
	for _, f := range []string{"bin/ukai", "share/ukai/node.yaml.example", "share/ukai/consul-agent.hcl.example",
		"share/ukai/consul.service.example", "lib/systemd/system/ukai.service", "share/doc/ukai/README.md", "share/doc/ukai/operations.md", "etc/ukai/node.yaml"} {
		if _, err := os.Stat(filepath.Join(prefix, f)); err != nil {
			t.Errorf("not installed: %v", err)
		}
	}
	if out, err := run(t, 30*time.Second, filepath.Join(prefix, "bin/ukai"), "version"); err != nil || !strings.Contains(out, "ukai") {
		t.Fatalf("installed binary: %v %s", err, out)
	}
	unit, err := os.ReadFile(filepath.Join(prefix, "lib/systemd/system/ukai.service"))
	if err != nil {
		t.Fatal(err)
	}
	want := "ExecStart=" + prefix + "/bin/ukai serve --config " + etc + "/ukai/node.yaml"
	if !strings.Contains(string(unit), want) || !strings.Contains(string(unit), "ExecReload=/bin/kill -HUP $MAINPID") || strings.Contains(string(unit), "@") {
		t.Fatalf("unit does not run the installed binary with the installed config (%q):\n%s", want, unit)
	}
	if _, err := exec.LookPath("systemd-analyze"); err == nil {
		if out, err := run(t, time.Minute, "systemd-analyze", "verify", filepath.Join(prefix, "lib/systemd/system/ukai.service")); err != nil {
			t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
		}
	} else {
		t.Log("systemd-analyze not installed: the unit was not verified by systemd")
	}
	cfg := filepath.Join(etc, "ukai/node.yaml")
	if err := os.WriteFile(cfg, []byte("# this node's own\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	if out := install(); !strings.Contains(out, "kept "+cfg) {
		t.Fatalf("second install:\n%s", out)
	}
	if b, _ := os.ReadFile(cfg); string(b) != "# this node's own\n" {
		t.Fatalf("the node's configuration was overwritten: %q", b)
	}
}

// TestReloadOnSIGHUP: SIGHUP applies a new log level at once, reports a
// change that needs a restart, and refuses a configuration that does not
// load while the node goes on serving.
func TestReloadOnSIGHUP(t *testing.T) {
	n := newNode(t, "r1")
	n.start()
	orig, err := os.ReadFile(n.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	write := func(s string) {
		if err := os.WriteFile(n.cfgPath, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	hup := func(expect string) {
		t.Helper()
		before := n.logs.Len()
		if err := n.cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 10*time.Second, "the reload's log line "+expect, func() bool { return strings.Contains(n.logs.String()[before:], expect) })
	}
	n.mustCLI("node", "info")
	if strings.Contains(n.logs.String(), "level=DEBUG") {
		t.Fatal("debug lines at level info")
	}
	write(strings.Replace(string(orig), "level: info", "level: debug", 1))
	hup("reload: log level changed")
	before := n.logs.Len()
	n.mustCLI("node", "info")
	waitFor(t, 10*time.Second, "a debug line", func() bool { return strings.Contains(n.logs.String()[before:], "level=DEBUG") })
	write(strings.Replace(string(orig), "level: info", "level: loud", 1))
	hup("reload refused: the configuration does not load")
	// api.metrics_io applies at once: I/O is no longer counted.
	n.mustCLI("image", "create", "m", "--size", "4M")
	qemuIO(t, n.url("m"), "write -P 1 0 64k")
	ops := func() string {
		for _, l := range strings.Split(httpGet(t, "http://"+n.api+"/metrics"), "\n") {
			if strings.HasPrefix(l, `ukai_image_write_ops_total{image="m"}`) {
				return l
			}
		}
		return ""
	}
	counted := ops()
	if counted == "" {
		t.Fatal("no write counted")
	}
	noIO := strings.Replace(strings.Replace(string(orig), "level: info", "level: debug", 1), "api:\n  listen: "+n.api+"\n", "api:\n  listen: "+n.api+"\n  metrics_io: false\n", 1)
	write(noIO)
	at := n.logs.Len()
	hup("reload: configuration read again") // the reload's last line: nothing waits for a restart
	if !strings.Contains(n.logs.String()[at:], "reload: image I/O counting changed") {
		t.Fatalf("api.metrics_io not applied by the reload:\n%s", n.logs.String()[at:])
	}
	qemuIO(t, n.url("m"), "write -P 2 0 64k")
	if got := ops(); got != counted {
		t.Fatalf("writes counted with api.metrics_io false: %q then %q", counted, got)
	}
	write(noIO + "owner:\n  lease_ttl: 20s\n")
	hup("take effect at the next restart\" node=r1 sections=[owner]")
	if out := n.mustCLI("node", "info"); !strings.Contains(out, "r1") {
		t.Fatalf("node info after the reloads:\n%s", out)
	}
	n.stop()
}
