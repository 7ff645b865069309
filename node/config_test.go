package node

import (
	"bytes"
	"encoding/base64"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

func writeCfg(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "node.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadConfigPrecedence(t *testing.T) {
	dir := t.TempDir()
	p := writeCfg(t, "node:\n  name: filename\n  data_dir: "+dir+"\n  labels:\n    zone: a\napi:\n  listen: 127.0.0.1:7001\niscsi:\n  listen: 127.0.0.1:3001\n")
	t.Setenv("UKAI_API_LISTEN", "127.0.0.1:7002")
	t.Setenv("UKAI_ISCSI_LISTEN", "127.0.0.1:3002")
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	Flags(fs)
	if err := fs.Parse([]string{"--iscsi.listen", "127.0.0.1:3003"}); err != nil {
		t.Fatal(err)
	}
	c, err := LoadConfig(p, fs)
	if err != nil {
		t.Fatal(err)
	}
	if c.Node.Name != "filename" || c.Node.DataDir != dir || c.Node.Labels["zone"] != "a" {
		t.Fatalf("file values lost: %+v", c.Node)
	}
	if c.API.Listen != "127.0.0.1:7002" {
		t.Fatalf("env did not beat the file: %s", c.API.Listen)
	}
	if c.ISCSI.Listen != "127.0.0.1:3003" {
		t.Fatalf("flag did not beat env: %s", c.ISCSI.Listen)
	}
	if c.ISCSI.IQNPrefix != "iqn.2026-11.io.ukai" || c.Metadata.Backend != "embedded" || c.Log.Level != "info" {
		t.Fatalf("defaults: %+v", c)
	}
}

func TestLoadConfigErrorsNameTheKey(t *testing.T) {
	dir := t.TempDir()
	ok := "node:\n  name: n1\n  data_dir: " + dir + "\n"
	for _, tc := range []struct{ body, want string }{
		{ok + "apii:\n  listen: 127.0.0.1:1\n", "unknown key(s) apii.listen"},
		{ok + "api:\n  listne: 127.0.0.1:1\n", "api.listne"},
		{"node:\n  name: n1\n  data_dir: " + dir + "/nope\n", "node.data_dir"},
		{"node:\n  data_dir: " + dir + "\n", "node.name: required"},
		{"node:\n  name: N_1\n  data_dir: " + dir + "\n", "node.name"},
		{ok + "api:\n  listen: localhost:80\n", "api.listen"},
		{ok + "api:\n  listen: 127.0.0.1\n", "api.listen"},
		{ok + "iscsi:\n  listen: 127.0.0.1:70000\n", "iscsi.listen"},
		{ok + "iscsi:\n  listen: 127.0.0.1:7700\n", "iscsi.listen: same address"},
		{ok + "iscsi:\n  iqn_prefix: foo\n", "iscsi.iqn_prefix"},
		{ok + "metadata:\n  backend: etcd\n", "metadata.backend"},
		{ok + "log:\n  level: loud\n", "log.level"},
		{ok + "node:\n  bad: [\n", "config file"},
	} {
		_, err := LoadConfig(writeCfg(t, tc.body), nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("config %q: error %v, want it to mention %q", tc.body, err, tc.want)
		}
	}
	if _, err := LoadConfig(filepath.Join(dir, "missing.yaml"), nil); err == nil {
		t.Error("a missing config file was accepted")
	}
}

// The example configurations in configs/ load as they are (their data
// dirs replaced by a temp dir).
func TestExampleConfigsLoad(t *testing.T) {
	files, _ := filepath.Glob("../configs/*.yaml")
	demo, _ := filepath.Glob("../configs/demo/*.yaml")
	files = append(files, demo...)
	if len(files) < 4 {
		t.Fatalf("example configs: %v", files)
	}
	t.Setenv("UKAI_NODE_DATA_DIR", t.TempDir())
	for _, f := range files {
		if _, err := LoadConfig(f, nil); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}
}

// A listener on a non-loopback address (wildcards included) without its
// protection is refused with the keys named, unless insecure: true, which
// loads and names every unsafe setting for the start-up warning.
func TestUnsafeSettingsRefused(t *testing.T) {
	dir := t.TempDir()
	secret := func(name string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	tlsKeys := "tls:\n  ca: " + secret("ca.pem") + "\n  cert: " + secret("n1.pem") + "\n  key: " + secret("n1-key.pem") + "\n"
	token := "  token_file: " + secret("api.token") + "\n"
	gossipKey := "  secret_key: " + base64.StdEncoding.EncodeToString(make([]byte, 32)) + "\n"
	ok := "node:\n  name: n1\n  data_dir: " + dir + "\n"
	for _, tc := range []struct {
		name, body string
		want       []string // in the error; nil: loads
	}{
		{"api wildcard", ok + "api:\n  listen: 0.0.0.0:7700\n", []string{"api.listen", "api.token_file"}},
		{"api v6 wildcard", ok + "api:\n  listen: '[::]:7700'\n", []string{"api.listen", "api.token_file"}},
		{"api address", ok + "api:\n  listen: 10.0.0.11:7700\n", []string{"api.listen", "api.token_file", "insecure: true"}},
		{"peer wildcard", ok + "peer:\n  listen: 0.0.0.0:7800\n", []string{"peer.listen", "tls.ca, tls.cert and tls.key"}},
		{"peer address", ok + "peer:\n  listen: 192.168.1.5:7800\n", []string{"peer.listen", "tls.ca"}},
		{"gossip wildcard", ok + "gossip:\n  bind: 0.0.0.0:7946\n", []string{"gossip.bind", "gossip.secret_key"}},
		{"gossip v6", ok + "gossip:\n  bind: '[fd00::1]:7946'\n", []string{"gossip.bind", "gossip.secret_key"}},
		{"insecure false", ok + "insecure: false\napi:\n  listen: 0.0.0.0:7700\n", []string{"api.token_file"}},
		{"all three", ok + "api:\n  listen: 0.0.0.0:7700\npeer:\n  listen: 0.0.0.0:7800\ngossip:\n  bind: 0.0.0.0:7946\n", []string{"api.token_file", "tls.ca", "gossip.secret_key"}},
		{"protected", ok + tlsKeys + "api:\n  listen: 0.0.0.0:7700\n" + token + "peer:\n  listen: 0.0.0.0:7800\ngossip:\n  bind: 0.0.0.0:7946\n" + gossipKey, nil},
		{"loopback", ok + "api:\n  listen: 127.0.0.2:7700\npeer:\n  listen: '[::1]:7800'\ngossip:\n  bind: 127.0.0.1:7946\n", nil},
	} {
		_, err := LoadConfig(writeCfg(t, tc.body), nil)
		if tc.want == nil {
			if err != nil {
				t.Errorf("%s: refused: %v", tc.name, err)
			}
			continue
		}
		if err == nil {
			t.Errorf("%s: loaded, want it refused naming %v", tc.name, tc.want)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q does not mention %q", tc.name, err, w)
			}
		}
	}

	// insecure: true loads, and every start names each unsafe setting.
	c, err := LoadConfig(writeCfg(t, ok+"insecure: true\napi:\n  listen: 0.0.0.0:7700\npeer:\n  listen: 10.0.0.11:7800\ngossip:\n  bind: '[::]:7946'\n"), nil)
	if err != nil {
		t.Fatalf("insecure: true refused: %v", err)
	}
	var buf bytes.Buffer
	c.WarnUnsafe(slog.New(slog.NewTextHandler(&buf, nil)))
	out := buf.String()
	for _, w := range []string{"api.listen", "api.token_file", "peer.listen", "tls.ca", "gossip.bind", "gossip.secret_key", "insecure"} {
		if !strings.Contains(out, w) {
			t.Errorf("start-up warning does not name %q:\n%s", w, out)
		}
	}
	if n := strings.Count(out, "level=WARN"); n != 3 {
		t.Errorf("%d warnings, want one per unsafe setting (3):\n%s", n, out)
	}
	// A safe configuration warns about nothing.
	c, err = LoadConfig(writeCfg(t, ok+"insecure: true\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	buf.Reset()
	c.WarnUnsafe(slog.New(slog.NewTextHandler(&buf, nil)))
	if buf.Len() != 0 {
		t.Errorf("warnings for a loopback-only node:\n%s", buf.String())
	}
}

func TestNeedRestartIgnoresWhatAReloadApplies(t *testing.T) {
	a := Config{}
	a.Log.Level, a.API.MetricsIO = "info", true
	b := a
	b.Log.Level, b.API.MetricsIO = "debug", false
	if got := a.NeedRestart(&b); len(got) != 0 {
		t.Fatalf("log.level and api.metrics_io need no restart: %v", got)
	}
	b.API.Pprof = true
	if got := a.NeedRestart(&b); len(got) != 1 || got[0] != "api" {
		t.Fatalf("api.pprof needs a restart: %v", got)
	}
}
