package node

import (
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
