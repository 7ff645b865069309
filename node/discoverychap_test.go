package node

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestDiscoveryCHAPConfig: iscsi.discovery_chap loads its secrets from
// files, and refuses world-readable or empty ones, half-given pairs and a
// mutual secret equal to the initiator's.
func TestDiscoveryCHAPConfig(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), mode); err != nil {
			t.Fatal(err)
		}
		os.Chmod(p, mode)
		return p
	}
	good := write("disc.secret", "discoverysecret1\n", 0o600)
	mutual := write("portal.secret", "portalsecret0001\n", 0o640)
	open := write("open.secret", "discoverysecret1\n", 0o644)
	empty := write("empty.secret", "\n", 0o600)
	base := "node:\n  name: n1\n  data_dir: " + dir + "\niscsi:\n  discovery_chap:\n"
	c, err := LoadConfig(writeCfg(t, base+"    user: disc\n    secret_file: "+good+"\n    mutual_user: portal\n    mutual_secret_file: "+mutual+"\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	sec, err := loadSecurity(c)
	if err != nil {
		t.Fatal(err)
	}
	if d := sec.discovery; d == nil || d.CHAPUser != "disc" || d.CHAPSecret != "discoverysecret1" || d.MutualUser != "portal" || d.MutualSecret != "portalsecret0001" {
		t.Fatalf("discovery CHAP %+v", sec.discovery)
	}
	// Without the key: no discovery CHAP.
	c, err = LoadConfig(writeCfg(t, "node:\n  name: n1\n  data_dir: "+dir+"\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if sec, err := loadSecurity(c); err != nil || sec.discovery != nil {
		t.Fatalf("no discovery_chap: %+v %v", sec.discovery, err)
	}
	for _, tc := range []struct{ body, want string }{
		{"    user: disc\n    secret_file: " + open + "\n", "iscsi.discovery_chap.secret_file: " + open + " is world-readable"},
		{"    user: disc\n", "iscsi.discovery_chap: user and secret_file go together"},
		{"    secret_file: " + good + "\n", "iscsi.discovery_chap: user and secret_file go together"},
		{"    user: disc\n    secret_file: " + good + "\n    mutual_user: portal\n", "mutual_user and mutual_secret_file go together"},
		{"    user: disc\n    secret_file: " + good + "\n    mutual_user: portal\n    mutual_secret_file: " + open + "\n", "iscsi.discovery_chap.mutual_secret_file: " + open + " is world-readable"},
		{"    user: disc\n    secret_file: " + filepath.Join(dir, "nope") + "\n", "iscsi.discovery_chap.secret_file"},
	} {
		_, err := LoadConfig(writeCfg(t, base+tc.body), nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("config %q: error %v, want it to mention %q", tc.body, err, tc.want)
		}
	}
	for _, tc := range []struct{ body, want string }{
		{"    user: disc\n    secret_file: " + empty + "\n", "is empty"},
		{"    user: disc\n    secret_file: " + good + "\n    mutual_user: portal\n    mutual_secret_file: " + write("same.secret", "discoverysecret1", 0o600) + "\n", "the same secret"},
	} {
		c, err := LoadConfig(writeCfg(t, base+tc.body), nil)
		if err != nil {
			t.Fatalf("config %q: %v", tc.body, err)
		}
		if _, err := loadSecurity(c); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("config %q: loadSecurity error %v, want it to mention %q", tc.body, err, tc.want)
		}
	}
}
